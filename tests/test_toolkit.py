"""Losses, penalties, n_critic, EMA, spectral norm and bfloat16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgan
from jaxgan import losses
from jaxgan import penalties
from conftest import copy_tree


def _softplus(x):
  return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


REAL = [2.0, -1.0]
FAKE = [0.5, -3.0]
MEAN_REAL, MEAN_FAKE = 0.5, -1.25

# loss name -> (D's loss, G's loss) on REAL and FAKE, computed by hand.
HAND_VALUES = {
    'minimax': ((_softplus(-2.0) + _softplus(1.0)) / 2
                + (_softplus(0.5) + _softplus(-3.0)) / 2,
                -(_softplus(0.5) + _softplus(-3.0)) / 2),
    'non_saturating': ((_softplus(-2.0) + _softplus(1.0)) / 2
                       + (_softplus(0.5) + _softplus(-3.0)) / 2,
                       (_softplus(-0.5) + _softplus(3.0)) / 2),
    # relu(1 - 2) = 0, relu(1 + 1) = 2; relu(1 + .5) = 1.5, relu(1 - 3) = 0.
    'hinge': ((0.0 + 2.0) / 2 + (1.5 + 0.0) / 2, -(0.5 - 3.0) / 2),
    'wasserstein': (-1.25 - 0.5, 1.25),
    # ((2-1)^2 + (-1-1)^2) / 2 = 2.5; (.25 + 9) / 2 = 4.625; halved.
    'least_squares': ((2.5 + 4.625) / 2,
                      ((0.5 - 1) ** 2 + (-3 - 1) ** 2) / 2 / 2),
    'relativistic_average': (
        (_softplus(-(2.0 - MEAN_FAKE)) + _softplus(-(-1.0 - MEAN_FAKE))) / 2
        + (_softplus(0.5 - MEAN_REAL) + _softplus(-3.0 - MEAN_REAL)) / 2,
        (_softplus(-(0.5 - MEAN_REAL)) + _softplus(-(-3.0 - MEAN_REAL))) / 2
        + (_softplus(2.0 - MEAN_FAKE) + _softplus(-1.0 - MEAN_FAKE)) / 2),
}


def test_every_registered_loss_has_hand_values():
  assert sorted(HAND_VALUES) == jaxgan.available_losses()


@pytest.mark.parametrize('name', sorted(HAND_VALUES))
def test_loss_values(name):
  loss = jaxgan.get_loss(name)
  real, fake = jnp.array(REAL), jnp.array(FAKE)
  want_d, want_g = HAND_VALUES[name]
  np.testing.assert_allclose(float(loss.discriminator(real, fake)), want_d,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(loss.generator(fake, real)), want_g,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(HAND_VALUES))
def test_loss_gradient_signs(name):
  """D gains by scoring real higher and fake lower; G by raising its score."""
  loss = jaxgan.get_loss(name)
  # Logits inside every loss's margins: |logit| < 1 for the hinge, between
  # the targets 0 and 1 for least squares.
  real, fake = jnp.array([0.3, 0.6]), jnp.array([0.1, 0.4])
  grad_real, grad_fake = jax.grad(loss.discriminator, argnums=(0, 1))(real,
                                                                      fake)
  assert bool(jnp.all(grad_real < 0)) and bool(jnp.all(grad_fake > 0))
  grad_g = jax.grad(loss.generator)(fake, real)
  assert bool(jnp.all(grad_g < 0))


def test_relativistic_generator_loss_requires_real_logits():
  assert jaxgan.get_loss('relativistic_average').generator_needs_real
  with pytest.raises(ValueError, match='logits_real'):
    losses.relativistic_generator_loss(jnp.zeros(2))


def test_minimax_generator_gradient_vanishes_when_d_rejects_samples():
  grad = jax.grad(losses.minimax_generator_loss)(jnp.array([-20.0]))
  assert abs(float(grad[0])) < 1e-8  # The reason non-saturating exists.


W = jnp.array([[[[0.5]], [[-1.0]]], [[[2.0]], [[0.0]]]])  # [2, 2, 1]-ish


def _linear(images):
  return jnp.sum(images * W[None, ..., 0], axis=(1, 2, 3))


def test_penalties_of_a_linear_discriminator():
  """D(x) = <w, x>: every input gradient is w, |w|^2 = 5.25."""
  key = jax.random.key(0)
  real = jax.random.normal(key, (3, 2, 2, 1))
  fake = jax.random.normal(jax.random.key(1), (3, 2, 2, 1))
  norm = math.sqrt(5.25)
  np.testing.assert_allclose(
      float(penalties.gradient_penalty(_linear, real, fake, key)),
      (norm - 1.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(float(penalties.r1_penalty(_linear, real)), 5.25,
                             rtol=1e-6)


def test_penalties_of_a_quadratic_discriminator():
  """D(x) = |x|^2 / 2: the input gradient is x itself."""
  quadratic = lambda x: 0.5 * jnp.sum(x ** 2, axis=(1, 2, 3))
  real = jnp.arange(8.0).reshape(2, 2, 2, 1) / 4
  norms = np.sqrt(np.sum(np.asarray(real).reshape(2, -1) ** 2, axis=1))
  np.testing.assert_allclose(float(penalties.r1_penalty(quadratic, real)),
                             np.mean(norms ** 2), rtol=1e-6)
  # Interpolating x with itself is x, whatever the weights.
  np.testing.assert_allclose(
      float(penalties.gradient_penalty(quadratic, real, real,
                                       jax.random.key(3))),
      np.mean((norms - 1.0) ** 2), rtol=1e-6)
  # Otherwise the interpolation weights come from the key.
  zeros = jnp.zeros_like(real)
  values = {float(penalties.gradient_penalty(quadratic, real, zeros,
                                             jax.random.key(k)))
            for k in range(3)}
  assert len(values) == 3


def test_lazy_penalty_is_applied_every_k_steps_scaled_by_k():
  penalty = penalties.Penalty('r1', 0.5, every=3).validate()
  real = jnp.ones((2, 2, 2, 1))
  values = [float(penalty(_linear, real, real, jax.random.key(0),
                          jnp.int32(step))) for step in range(6)]
  np.testing.assert_allclose(values, [0.5 * 3 * 5.25, 0, 0] * 2, rtol=1e-6)


@pytest.mark.parametrize('fields, message', [
    (dict(penalty='r2'), 'Unknown penalty'),
    (dict(penalty='r1', penalty_weight=0.0), 'weight must be positive'),
    (dict(penalty='r1', penalty_every=0), 'penalty_every'),
    (dict(n_critic=0), 'n_critic'),
    (dict(ema_decay=1.0), 'ema_decay'),
    (dict(compute_dtype='float16'), 'compute_dtype'),
    (dict(conv_kernel_grad='cudnn'), 'conv_kernel_grad must be one of'),
    (dict(spectral_norm=1), 'spectral_norm'),
])
def test_config_refuses_bad_toolkit_options(fields, message):
  with pytest.raises(ValueError, match=message):
    jaxgan.DCGANConfig(**fields)


def _states(seed=0, **fields):
  config = jaxgan.DCGANConfig(batch_size=8, **fields)
  return config, config.create_train_states(jax.random.key(seed))


@pytest.mark.parametrize('change, message', [
    (dict(penalty=penalties.Penalty('gradient_penality', 10.0)),
     'Unknown penalty'),
    (dict(penalty=penalties.Penalty('r1', -10.0)), 'weight must be positive'),
    (dict(penalty=penalties.Penalty('r1', 10.0, every=0)), 'interval'),
    (dict(penalty='r1'), 'must be a jaxgan.penalties.Penalty'),
    (dict(n_critic=0), 'n_critic'),
    (dict(n_critic=-1), 'n_critic'),
])
def test_steps_refuse_a_bad_objective_built_by_hand(change, message):
  """A GANLoss made with `_replace` skips DCGANConfig's checks; the steps
  check it while tracing instead of training on something else."""
  _, (g, d) = _states()
  loss = losses.get_loss('wasserstein')._replace(**change)
  batch, key = _real(8), jax.random.key(1)
  with pytest.raises(ValueError, match=message):
    jaxgan.train_step(g, d, batch, key, loss=loss)
  with pytest.raises(ValueError, match=message):
    jaxgan.discriminator_step(g, d, batch, key, loss=loss)
  with pytest.raises(ValueError, match=message):
    jaxgan.train_loop(g, d, _real(16), key, num_steps=1, batch_size=8,
                      loss=loss)
  # Nothing was consumed: the states still train.
  _, _, metrics = jaxgan.train_step(*copy_tree((g, d)), batch, key)
  assert np.isfinite(float(metrics['d_loss']))


def _real(num, seed=0):
  return jax.random.randint(jax.random.key(seed), (num, 28, 28, 1), 0, 256
                            ).astype(jnp.uint8)


def test_n_critic_runs_d_updates_on_their_own_batches():
  """n_critic=2: D's update 1 on the first batch, then the ordinary step."""
  config = jaxgan.DCGANConfig(batch_size=8, n_critic=2)
  # SGD: Adam would blow the rounding noise of zero gradients (biases in
  # front of BatchNorm) up to full-size updates.
  g, d = jaxgan.create_train_states(
      jax.random.key(0), config.generator(), config.discriminator(),
      optax.sgd(0.1), optax.sgd(0.1))
  loss = config.gan_loss()
  batch, key = _real(16), jax.random.key(5)
  got_g, got_d, _ = jaxgan.train_step(*copy_tree((g, d)), batch, key,
                                      loss=loss)
  assert int(got_g.step) == 1 and int(got_d.step) == 2

  # By hand: the extra D update against fresh samples from its own key,
  # then the one-critic step on the second half with the step's key.
  _, _, extra_fake_keys = jaxgan.step_keys(key, 2)
  z, _ = jaxgan.generator_inputs(extra_fake_keys[0], 8, 100)
  fake = g.apply_fn({'params': g.params, 'batch_stats': g.batch_stats}, z,
                    train=True, mutable=['batch_stats'])[0]
  single = loss._replace(n_critic=1)
  d1, _ = jax.jit(jaxgan.train._discriminator_update, static_argnums=3)(
      copy_tree(d), jaxgan.to_float_images(batch[:8]), fake, single,
      jax.random.key(0))
  want_g, want_d, _ = jaxgan.train_step(copy_tree(g), d1, batch[8:], key,
                                        loss=single)
  for want, got in ((want_d.params, got_d.params),
                    (want_g.params, got_g.params)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_n_critic_loop_equals_steps_on_the_same_batches():
  config, (g, d) = _states(n_critic=2, loss='wasserstein',
                           penalty='gradient_penalty',
                           discriminator_batch_norm=False)
  loss = config.gan_loss()
  images = _real(64)
  key = jax.random.key(1)
  loop_g, loop_d, metrics = jaxgan.train_loop(
      *copy_tree((g, d)), images, key, num_steps=3, batch_size=8, loss=loss)
  assert int(loop_g.step) == 3 and int(loop_d.step) == 6
  assert metrics['d_penalty'].shape == (3,)
  assert bool(jnp.all(metrics['d_penalty'] > 0))
  shuffle_key, step_key = jaxgan.loop_keys(key)
  order = jaxgan.epoch_permutation(shuffle_key, 0, 64)
  step_g, step_d = copy_tree((g, d))
  for step in range(3):
    batch = images[order[step * 16:(step + 1) * 16]]
    step_g, step_d, _ = jaxgan.train_step(
        step_g, step_d, batch, jax.random.fold_in(step_key, step), loss=loss)
  for a, b in zip(jax.tree.leaves((loop_g.params, loop_d.params)),
                  jax.tree.leaves((step_g.params, step_d.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ema_follows_the_incremental_update_and_is_sampled_by_default():
  decay = 0.7
  _, (g, d) = _states(ema_decay=decay)
  np.testing.assert_array_equal(jax.tree.leaves(g.ema_params)[0],
                                jax.tree.leaves(g.params)[0])
  ema = copy_tree(g.params)
  for step in range(1, 31):
    g, d, _ = jaxgan.train_step(g, d, _real(8, step), jax.random.key(step))
    # Warm-up: (1 + t) / (10 + t) until it reaches the decay (t = 20 here).
    rate = min(decay, (1 + step) / (10 + step))
    ema = jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, ema, g.params)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(g.ema_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  key = jax.random.key(9)
  averaged = jaxgan.sample(g, key, 4)
  live = jaxgan.sample(g, key, 4, use_ema=False)
  assert not np.allclose(averaged, live)
  by_hand = g.apply_fn({'params': g.ema_params, 'batch_stats': g.batch_stats},
                       jaxgan.generator_inputs(key, 4, 100)[0], train=False)
  np.testing.assert_allclose(averaged, by_hand, rtol=1e-5, atol=1e-6)


def test_ema_is_checkpointed(tmp_path):
  _, (g, d) = _states(ema_decay=0.99)
  g, d, _ = jaxgan.train_step(g, d, _real(8), jax.random.key(0))
  checkpointer = jaxgan.Checkpointer(str(tmp_path / 'ckpt'))
  checkpointer.save(1, g, d, jax.random.key(1), {'note': 'ema'})
  checkpointer.wait_until_finished()
  _, (g0, d0) = _states(ema_decay=0.99)
  restored_g, _, _, _ = checkpointer.restore(g0, d0)
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(g.ema_params),
                  jax.tree.leaves(restored_g.ema_params)):
    np.testing.assert_array_equal(a, b)


def test_spectral_norm_estimates_the_largest_singular_value():
  discriminator = jaxgan.Discriminator(spectral_norm=True)
  images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1), minval=-1)
  variables = discriminator.init(jax.random.key(1), images)
  apply = jax.jit(lambda v: discriminator.apply(v, images, train=True,
                                                mutable=['batch_stats'])[1])
  for _ in range(100):  # Power iterations, one per training call.
    variables = {**variables, **apply(variables)}
  stats = variables['batch_stats']
  for layer, kernel in (('SpectralNorm_0', 'Conv_0'),
                        ('SpectralNorm_1', 'Conv_1'),
                        ('SpectralNorm_2', 'Dense_0')):
    weights = np.asarray(variables['params'][kernel]['kernel'])
    largest = np.linalg.svd(weights.reshape(-1, weights.shape[-1]),
                            compute_uv=False)[0]
    # Power iteration approaches the largest singular value from below,
    # slowly where the top two are close.
    sigma = float(stats[layer][f'{kernel}/kernel/sigma'])
    assert sigma <= largest * (1 + 1e-5)
    np.testing.assert_allclose(sigma, largest, rtol=1e-2)
  # Evaluation leaves the power iteration state alone.
  _, updates = discriminator.apply(variables, images, train=False,
                                   mutable=['batch_stats'])
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_stays_finite_and_close_to_float32():
  config32, (g32, d32) = _states()
  config16 = jaxgan.DCGANConfig(batch_size=8, compute_dtype='bfloat16')
  g16, d16 = config16.create_train_states(jax.random.key(0))
  for leaf in jax.tree.leaves((g16.params, g16.opt_state, d16.params)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  z = jaxgan.sample_noise(jax.random.key(1), 8, 100)
  images32 = jaxgan.generate(g32, z)
  images16 = jaxgan.generate(g16, z)
  assert images16.dtype == jnp.float32
  np.testing.assert_allclose(images16, images32, atol=0.05)
  logits = [jax.nn.sigmoid(d.apply_fn(
      {'params': d.params, 'batch_stats': d.batch_stats}, images32))
            for d in (d32, d16)]
  np.testing.assert_allclose(*logits, atol=0.02)

  batch = _real(8)
  for step in range(3):
    key = jax.random.key(step)
    g32, d32, m32 = jaxgan.train_step(g32, d32, batch, key)
    g16, d16, m16 = jaxgan.train_step(g16, d16, batch, key)
  for name in ('d_loss', 'g_loss'):
    assert bool(jnp.isfinite(m16[name]))
    np.testing.assert_allclose(float(m16[name]), float(m32[name]), rtol=0.05)
  for leaf in jax.tree.leaves(g16.params):
    assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize('fields', [
    dict(loss='hinge', spectral_norm=True),
    dict(loss='least_squares', penalty='r1', penalty_weight=1.0,
         penalty_every=2, ema_decay=0.99),
    dict(loss='relativistic_average'),
    dict(loss='minimax'),
])
def test_toolkit_combinations_train_without_nans(fields):
  config, (g, d) = _states(**fields)
  g, d, metrics = jaxgan.train_loop(
      g, d, _real(64), jax.random.key(0), num_steps=4, batch_size=8,
      loss=config.gan_loss())
  assert bool(jnp.all(metrics['finite']))
  assert int(g.step) == 4
  for name, values in metrics.items():
    assert bool(jnp.all(jnp.isfinite(values.astype(jnp.float32)))), name


def test_seeds_in_one_program_match_separate_runs():
  """jax.vmap over 4 seeds: each run equals train_loop alone with its key.

  The batched and unbatched programs round differently, and a GAN step does
  not keep that small: from states equal to 1e-7, one step's updates have
  differed by a few percent of their size (a leaky ReLU input within
  rounding of zero takes the other slope in one program, moving a whole
  term of the gradient). Plain SGD with a small learning rate keeps the five
  steps well-conditioned; Adam's first updates are +-lr whatever the
  gradient's size, and SGD at 0.05 diverges here. The step-0 loss, before
  any update, is compared to float32 rounding; later losses and the trained
  states to well within the change that training made, which a wrong key,
  batch or gradient for any seed would not be.
  """
  config = jaxgan.DCGANConfig(batch_size=8, ema_decay=0.9)
  images = _real(64)
  optimizer = optax.sgd(1e-3)

  def states(seed):
    return jaxgan.create_train_states(
        jax.random.key(seed), config.generator(), config.discriminator(),
        optimizer, optimizer, ema_decay=0.9)

  def trained_leaves(state_g, state_d):
    return jax.tree.leaves((state_g.params, state_g.ema_params,
                            state_d.params, state_g.batch_stats))

  seeds = range(4)
  keys = [jax.random.key(100 + s) for s in seeds]
  stacked = jaxgan.stack_seeds([states(s) for s in seeds])
  g, d, metrics = jaxgan.train_loop_seeds(
      *stacked, images, jaxgan.stack_seeds(keys), num_steps=5, batch_size=8)
  assert metrics['d_loss'].shape == (4, 5)
  assert int(g.step[0]) == 5
  samples = jaxgan.sample_seeds(g, jax.random.key(7), 3)
  assert samples.shape == (4, 3, 28, 28, 1)
  finals = []
  for s in seeds:
    initial = trained_leaves(*states(s))
    alone_g, alone_d, alone_metrics = jaxgan.train_loop(
        *states(s), images, keys[s], num_steps=5, batch_size=8)
    np.testing.assert_allclose(metrics['d_loss'][s, 0],
                               alone_metrics['d_loss'][0], rtol=1e-5)
    for name in ('d_loss', 'g_loss'):
      # Measured over 32 seeds: at most 3e-4.
      np.testing.assert_allclose(metrics[name][s], alone_metrics[name],
                                 rtol=2e-3)
    mine = jaxgan.seed_slice((g, d), s)
    for before, a, b in zip(initial, trained_leaves(alone_g, alone_d),
                            trained_leaves(*mine)):
      # Measured over 32 seeds: at most 5% of the leaf's largest change.
      # Biases in front of BatchNorm hold only rounding noise (about 1e-9).
      change = float(np.max(np.abs(np.asarray(a) - np.asarray(before))))
      np.testing.assert_allclose(a, b, rtol=0, atol=0.2 * change + 1e-7)
    # Samples come from the EMA, which follows the last steps' parameters.
    np.testing.assert_allclose(samples[s],
                               jaxgan.sample(alone_g, jax.random.key(7), 3),
                               rtol=1e-4, atol=1e-3)
    finals.append(alone_metrics['g_loss'][-1])
  assert len(set(np.round(finals, 6))) == 4  # Four different runs.


def test_stack_seeds_refuses_different_structures():
  _, (g, _) = _states()
  _, (g_ema, _) = _states(ema_decay=0.5)
  with pytest.raises(ValueError, match='one structure'):
    jaxgan.stack_seeds([g, g_ema])


def _conditional_states(seed=0, optimizer=None):
  config = jaxgan.DCGANConfig(batch_size=8, conditional=True)
  if optimizer is None:
    return config, config.create_train_states(jax.random.key(seed))
  return config, jaxgan.create_train_states(
      jax.random.key(seed), config.generator(), config.discriminator(),
      optimizer, optimizer)


def test_conditional_models_need_and_use_labels():
  _, (g, d) = _conditional_states()
  z = jaxgan.sample_noise(jax.random.key(0), 4, 100)
  ones, twos = jnp.ones(4, jnp.int32), jnp.full(4, 2, jnp.int32)
  assert not np.allclose(jaxgan.generate(g, z, ones),
                         jaxgan.generate(g, z, twos))
  with pytest.raises(ValueError, match='conditional on 10 classes'):
    jaxgan.generate(g, z)
  with pytest.raises(ValueError, match='int labels of shape'):
    jaxgan.generate(g, z, jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match='unconditional'):
    _, (plain_g, _) = _states()
    jaxgan.generate(plain_g, z, ones)

  # Projection: changing the label moves the logit by <e(y1) - e(y2), phi>.
  images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1)
  variables = {'params': d.params, 'batch_stats': d.batch_stats}
  logit_1 = d.apply_fn(variables, images, ones)
  logit_2 = d.apply_fn(variables, images, twos)
  embedding = d.params['Embed_0']['embedding']
  flat = jax.nn.leaky_relu(_d_features(d, images), 0.2)
  np.testing.assert_allclose(
      logit_1 - logit_2, flat @ (embedding[1] - embedding[2]), rtol=1e-4,
      atol=1e-4)

  with pytest.raises(ValueError, match='num_classes'):
    jaxgan.create_train_states(
        jax.random.key(0), jaxgan.Generator(num_classes=10),
        jaxgan.Discriminator(), jaxgan.adam(), jaxgan.adam())


def _d_features(d, images):
  """D's features before its last layer (evaluation mode), `[B, 6272]`."""
  p, stats = d.params, d.batch_stats
  x = jax.lax.conv_general_dilated(
      images, p['Conv_0']['kernel'], (2, 2), ((1, 2), (1, 2)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['Conv_0']['bias']
  x = jax.nn.leaky_relu(x, 0.2)
  x = jax.lax.conv_general_dilated(
      x, p['Conv_1']['kernel'], (2, 2), ((1, 2), (1, 2)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['Conv_1']['bias']
  bn = stats['BatchNorm_0']
  x = ((x - bn['mean']) / jnp.sqrt(bn['var'] + 1e-5)
       * p['BatchNorm_0']['scale'] + p['BatchNorm_0']['bias'])
  return x.reshape(x.shape[0], -1)


def test_conditional_loop_gathers_labels_with_their_images():
  """The fused loop on (images, labels) equals steps on gathered pairs."""
  config, (g, d) = _conditional_states(optimizer=optax.sgd(0.05))
  images = _real(64)
  labels = jax.random.randint(jax.random.key(3), (64,), 0, 10)
  key = jax.random.key(4)
  loop_g, loop_d, _ = jaxgan.train_loop(
      *copy_tree((g, d)), (images, labels), key, num_steps=3, batch_size=8)
  shuffle_key, step_key = jaxgan.loop_keys(key)
  order = jaxgan.epoch_permutation(shuffle_key, 0, 64)
  step_g, step_d = copy_tree((g, d))
  for step in range(3):
    rows = order[step * 8:(step + 1) * 8]
    step_g, step_d, _ = jaxgan.train_step(
        step_g, step_d, (images[rows], labels[rows]),
        jax.random.fold_in(step_key, step))
  for a, b in zip(jax.tree.leaves((loop_g.params, loop_d.params)),
                  jax.tree.leaves((step_g.params, step_d.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(a))) + 1e-7)
  # Shuffled labels give another run: the labels do reach the models.
  other_g, _, _ = jaxgan.train_loop(
      *copy_tree((g, d)), (images, labels[::-1]), key, num_steps=3,
      batch_size=8)
  assert not np.allclose(other_g.params['Dense_0']['kernel'],
                         loop_g.params['Dense_0']['kernel'])
  with pytest.raises(ValueError, match='pass the batch as a tuple'):
    jaxgan.train_step(*copy_tree((g, d)), images[:8], key)


@pytest.mark.slow
def test_conditional_accuracy_of_perfect_and_ignoring_generators(
    mnist_data_dir):
  test_images, test_labels = jaxgan.load_mnist('test', data_dir=mnist_data_dir)
  by_class = [test_images[test_labels == c] for c in range(10)]

  def perfect(key, labels):
    del key
    counters = np.zeros(10, int)
    out = []
    for label in np.asarray(labels):
      out.append(by_class[label][counters[label]])
      counters[label] += 1
    return jaxgan.to_float_images(np.stack(out))

  result = jaxgan.metrics.conditional_accuracy(perfect, 100,
                                               jax.random.key(0),
                                               batch_size=300)
  assert result['accuracy'] > 0.97
  assert min(result['per_class_accuracy']) > 0.9

  eights = jaxgan.to_float_images(by_class[8][:1000])
  result = jaxgan.metrics.conditional_accuracy(
      lambda key, labels: eights[:len(labels)], 50, jax.random.key(0))
  assert result['per_class_accuracy'][8] > 0.95
  assert max(result['per_class_accuracy'][:8]) < 0.05
  assert result['accuracy'] == pytest.approx(
      np.mean(result['per_class_accuracy']))


def test_learning_rates_map_like_seeds():
  """Learning rates held in the optimiser state vmap like seeds do."""
  config = jaxgan.DCGANConfig(batch_size=8)
  images = _real(32)

  def states(learning_rate):
    optimizer = optax.inject_hyperparams(optax.sgd)(
        learning_rate=learning_rate)
    return jaxgan.create_train_states(
        jax.random.key(0), config.generator(), config.discriminator(),
        optimizer, optimizer)

  # Small enough for two well-conditioned steps: at 0.1 the batched and
  # unbatched programs' rounding grew to most of the tolerance below.
  rates = (0.001, 0.01)
  key = jax.random.key(5)
  g, _, _ = jaxgan.train_loop_seeds(
      *jaxgan.stack_seeds([states(r) for r in rates]), images,
      jaxgan.stack_seeds([key, key]), num_steps=2, batch_size=8)
  np.testing.assert_allclose(
      g.opt_state.hyperparams['learning_rate'], rates)
  for i, rate in enumerate(rates):
    alone, _, _ = jaxgan.train_loop(*states(rate), images, key, num_steps=2,
                                    batch_size=8)
    for a, b in zip(jax.tree.leaves(alone.params),
                    jax.tree.leaves(jaxgan.seed_slice(g.params, i))):
      np.testing.assert_allclose(a, b, rtol=1e-4,
                                 atol=1e-3 * float(np.max(np.abs(a))) + 1e-7)
