"""The train step, the discriminator-only step, the fused loops and sampling."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgan
from conftest import copy_tree, leaves_equal, make_states


# A program compiled anew, or fetched from the persistent compilation cache
# the test session keeps (conftest): either way, jit did not reuse it.
_COMPILE_EVENTS = ('/jax/core/compile/backend_compile_duration',
                   '/jax/compilation_cache/cache_retrieval_time_sec')


class CompileCounter:
  """Counts XLA programs compiled or fetched from the cache while active."""

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self.active and event in _COMPILE_EVENTS:
      self.count += 1

  @contextlib.contextmanager
  def counting(self):
    """Counts from zero within the block; read `count` after it."""
    self.count, self.active = 0, True
    try:
      yield self
    finally:
      self.active = False


_COUNTER = CompileCounter()


def _step(states, batch, key):
  state_g, state_d = copy_tree(states)
  return jaxgan.train_step(state_g, state_d, batch, key)


def test_step_is_deterministic(states, real_batch):
  key = jax.random.key(7)
  first = _step(states, real_batch, key)
  second = _step(states, real_batch, key)
  assert leaves_equal(first, second)


def test_step_depends_on_key(states, real_batch):
  g1, d1, m1 = _step(states, real_batch, jax.random.key(1))
  g2, d2, m2 = _step(states, real_batch, jax.random.key(2))
  assert not leaves_equal(g1.params, g2.params)
  assert not leaves_equal(d1.params, d2.params)
  assert float(m1['g_loss']) != float(m2['g_loss'])


def test_step_updates_both_networks_and_counters(states, real_batch):
  state_g, state_d, metrics = _step(states, real_batch, jax.random.key(3))
  g0, d0 = states
  for before, after in ((g0.params, state_g.params),
                        (d0.params, state_d.params)):
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert all(jax.tree.leaves(changed)), changed
  assert int(state_g.step) == 1 and int(state_d.step) == 1
  # BatchNorm running averages move in both networks during training.
  assert not leaves_equal(g0.batch_stats, state_g.batch_stats)
  assert not leaves_equal(d0.batch_stats, state_d.batch_stats)
  assert set(metrics) == {'d_loss', 'g_loss', 'd_real', 'd_fake'}
  for name, value in metrics.items():
    assert value.shape == () and isinstance(value, jax.Array), name
    assert bool(jnp.isfinite(value)), name
  assert 0.0 < float(metrics['d_real']) < 1.0
  assert 0.0 < float(metrics['d_fake']) < 1.0


def test_step_matches_a_hand_written_reference(sgd_states, real_batch):
  """D update on real + G(z), then G update against the new D, same G(z)."""
  key = jax.random.key(5)
  states = sgd_states
  # One program: run op by op, the reference took over 40 s on a CPU.
  new_g, new_d, g_updates = jax.jit(_hand_written_step)(
      copy_tree(states), real_batch, key)

  got_g, got_d, _ = _step(states, real_batch, key)
  for want, got in ((new_d.params, got_d.params), (new_g.params, got_g.params)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_updates['batch_stats']),
                  jax.tree.leaves(got_g.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _hand_written_step(states, real_batch, key):
  """The default step spelled out with Flax's apply and optax's updates."""
  state_g, state_d = states
  z, _ = jaxgan.generator_inputs(jaxgan.step_keys(key)[0], 64, 100)
  fake, g_updates = state_g.apply_fn(
      {'params': state_g.params, 'batch_stats': state_g.batch_stats}, z,
      train=True, mutable=['batch_stats'])

  def d_loss(params):
    real_logits, upd = state_d.apply_fn(
        {'params': params, 'batch_stats': state_d.batch_stats}, real_batch,
        train=True, mutable=['batch_stats'])
    fake_logits, upd = state_d.apply_fn(
        {'params': params, 'batch_stats': upd['batch_stats']}, fake,
        train=True, mutable=['batch_stats'])
    return jaxgan.non_saturating_discriminator_loss(real_logits, fake_logits)

  d_grads = jax.grad(d_loss)(state_d.params)
  new_d = state_d.apply_gradients(grads=d_grads)

  def g_loss(params):
    images = state_g.apply_fn(
        {'params': params, 'batch_stats': state_g.batch_stats}, z,
        train=True, mutable=['batch_stats'])[0]
    logits = new_d.apply_fn(
        {'params': new_d.params, 'batch_stats': state_d.batch_stats}, images,
        train=True, mutable=['batch_stats'])[0]
    return jaxgan.non_saturating_generator_loss(logits)

  g_grads = jax.grad(g_loss)(state_g.params)
  return state_g.apply_gradients(grads=g_grads), new_d, g_updates


def test_uint8_batches_are_rescaled_to_minus_one_one(sgd_states):
  pixels = jax.random.randint(jax.random.key(0), (64, 28, 28, 1), 0, 256
                              ).astype(jnp.uint8)
  as_float = pixels.astype(jnp.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(jaxgan.to_float_images(pixels), as_float)
  assert float(as_float.min()) >= -1.0 and float(as_float.max()) <= 1.0
  key = jax.random.key(9)
  # Equal up to rounding: XLA may fuse the rescaling into the first layer.
  for a, b in zip(jax.tree.leaves(_step(sgd_states, pixels, key)),
                  jax.tree.leaves(_step(sgd_states, as_float, key))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape, dtype, message', [
    ((64, 784), jnp.float32, 'reshape'),
    ((64, 28, 28), jnp.float32, r'\[B, 28, 28, 1\]'),
    ((64, 14, 14, 1), jnp.float32, r'\(64, 14, 14, 1\)'),
    ((64, 28, 28, 1), jnp.int32, 'dtype int32'),
    ((0, 28, 28, 1), jnp.uint8, 'no images'),
])
def test_step_rejects_bad_batches(states, shape, dtype, message):
  with pytest.raises(ValueError, match=message):
    _step(states, jnp.zeros(shape, dtype), jax.random.key(0))


def test_second_call_does_not_compile(real_batch):
  state_g, state_d = make_states(seed=11)
  state_g, state_d, _ = jaxgan.train_step(state_g, state_d, real_batch,
                                          jax.random.key(0))
  keys = [jax.random.fold_in(jax.random.key(0), i) for i in (1, 2)]
  with _COUNTER.counting():
    for key in keys:
      state_g, state_d, metrics = jaxgan.train_step(
          state_g, state_d, real_batch, key)
    jax.block_until_ready(metrics)
  assert _COUNTER.count == 0
  assert int(state_g.step) == 3


def test_states_of_another_seed_reuse_every_program(real_batch):
  config = jaxgan.DCGANConfig(ema_decay=0.999)
  state_g, state_d = config.create_train_states(jax.random.key(20))
  jaxgan.train_step(state_g, state_d, real_batch, jax.random.key(0))
  with _COUNTER.counting():
    state_g, state_d = config.create_train_states(jax.random.key(21))
    jax.block_until_ready((state_g, state_d))
  assert _COUNTER.count == 0
  # The values are the modules' own initialisation, from the split key.
  key_g, key_d = jax.random.split(jax.random.key(21))
  variables_g = config.generator().init(key_g, jnp.zeros((1, 100)),
                                        train=False)
  variables_d = config.discriminator().init(
      key_d, jnp.zeros((1, 28, 28, 1)), train=False)
  assert leaves_equal(state_g.params, variables_g['params'])
  assert leaves_equal(state_g.batch_stats, variables_g['batch_stats'])
  assert leaves_equal(state_d.params, variables_d['params'])
  assert leaves_equal(state_g.ema_params, state_g.params)
  assert leaves_equal(state_g.opt_state, config.optimizer().init(
      variables_g['params']))
  assert int(state_g.step) == int(state_d.step) == 0
  # Separate buffers: a step donates `params` and keeps the average.
  pointers = lambda tree: {leaf.unsafe_buffer_pointer()
                           for leaf in jax.tree.leaves(tree)}
  assert not pointers(state_g.ema_params) & pointers(state_g.params)
  assert not pointers(state_g.step) & pointers(state_d.step)
  with _COUNTER.counting():
    jax.block_until_ready(jaxgan.train_step(state_g, state_d, real_batch,
                                            jax.random.key(0)))
  assert _COUNTER.count == 0  # A weakly typed step counter would recompile.


def test_states_are_donated(states, real_batch):
  state_g, state_d = copy_tree(states)
  jaxgan.train_step(state_g, state_d, real_batch, jax.random.key(0))
  if jax.default_backend() != 'cpu' or state_g.params['Dense_0'][
      'kernel'].is_deleted():
    assert state_d.params['Conv_0']['kernel'].is_deleted()


def test_discriminator_step_trains_only_d(states, real_batch):
  state_g, state_d = copy_tree(states)
  new_d, metrics = jaxgan.discriminator_step(state_g, state_d, real_batch,
                                             jax.random.key(0))
  assert leaves_equal(state_g, states[0])  # G untouched, not donated.
  assert not leaves_equal(new_d.params, states[1].params)
  assert int(new_d.step) == 1
  assert set(metrics) == {'d_loss', 'd_real', 'd_fake'}


def _dataset(num=200):
  return jax.random.randint(jax.random.key(1), (num, 28, 28, 1), 0, 256
                            ).astype(jnp.uint8)


@pytest.fixture(scope='module')
def loop_states():
  """Plain SGD for comparing many steps (see conftest.sgd_states).

  A small learning rate keeps the GAN's dynamics from amplifying the rounding
  differences of two separately compiled programs: at 1e-3 they stay at one
  float32 ulp over five steps, at 1e-2 they grow about 4x a step.
  """
  return make_states(optimizer=optax.sgd(1e-3))


@pytest.mark.parametrize('first_step,num_steps', [(2, 1), (2, 5), (3, 3)])
def test_fused_loop_equals_single_steps(loop_states, first_step, num_steps):
  """200 images, batch 64, 3 steps per epoch.

  From step 2, five steps cross two epoch boundaries; from step 3 (an
  epoch's start), three steps stay in one epoch, so the loop leaves the
  epoch after it unshuffled.
  """
  images, batch_size, steps_per_epoch = _dataset(), 64, 3
  loop_key = jax.random.key(21)
  # Start at a later step, so the loop continues a run.
  state_g, state_d = copy_tree(loop_states)
  state_g = state_g.replace(step=jnp.int32(first_step))
  fused_g, fused_d, fused_metrics = jaxgan.train_loop(
      *copy_tree((state_g, state_d)), images, loop_key, num_steps=num_steps,
      batch_size=batch_size, steps_per_epoch=steps_per_epoch)

  shuffle_key, step_key = jaxgan.loop_keys(loop_key)
  per_step = []
  for step in range(first_step, first_step + num_steps):
    epoch, position = divmod(step, steps_per_epoch)
    order = jaxgan.epoch_permutation(shuffle_key, epoch, len(images))
    batch = images[order[position * batch_size:(position + 1) * batch_size]]
    state_g, state_d, metrics = jaxgan.train_step(
        state_g, state_d, batch, jax.random.fold_in(step_key, step))
    per_step.append(metrics)

  assert int(fused_g.step) == first_step + num_steps
  for want, got in ((state_g, fused_g), (state_d, fused_d)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert fused_metrics.pop('finite').tolist() == [True] * num_steps
  for name, values in fused_metrics.items():
    assert values.shape == (num_steps,)
    np.testing.assert_allclose(values, [float(m[name]) for m in per_step],
                               rtol=1e-5, atol=1e-6)


def _nan_in_second_batch():
  """Three batches of 64 and a loop key whose step 1 batch holds a NaN."""
  images = np.array(jaxgan.to_float_images(_dataset()[:192]))
  loop_key = jax.random.key(5)
  shuffle_key, _ = jaxgan.loop_keys(loop_key)
  order = np.asarray(jaxgan.epoch_permutation(shuffle_key, 0, len(images)))
  images[order[64 + 10]] = np.nan
  return images, loop_key


def test_fused_loop_stops_updating_at_the_first_non_finite_step(loop_states):
  """A NaN image in the second batch: the loop keeps the first step's states."""
  images, loop_key = _nan_in_second_batch()
  kwargs = dict(batch_size=64, steps_per_epoch=3)
  fused_g, fused_d, metrics = jaxgan.train_loop(
      *copy_tree(loop_states), images, loop_key, num_steps=3, **kwargs)
  assert metrics['finite'].tolist() == [True, False, False]
  assert np.isfinite(metrics['d_loss'][0]) and np.isnan(metrics['d_loss'][1])
  assert int(fused_g.step) == int(fused_d.step) == 1
  one_g, one_d, _ = jaxgan.train_loop(
      *copy_tree(loop_states), images, loop_key, num_steps=1, **kwargs)
  for want, got in ((one_g, fused_g), (one_d, fused_d)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      assert np.all(np.isfinite(b))
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_detect_guard_flags_the_same_step_and_does_not_freeze(loop_states):
  """guard='detect' marks the first NaN step as 'freeze' does, but the states
  go on updating through it (no select): they end non-finite."""
  images, loop_key = _nan_in_second_batch()
  kwargs = dict(num_steps=3, batch_size=64, steps_per_epoch=3)
  _, _, frozen = jaxgan.train_loop(
      *copy_tree(loop_states), images, loop_key, guard='freeze', **kwargs)
  detect_g, detect_d, detected = jaxgan.train_loop(
      *copy_tree(loop_states), images, loop_key, guard='detect', **kwargs)
  assert detected['finite'].tolist() == frozen['finite'].tolist() == [
      True, False, False]
  for name in ('d_loss', 'g_loss', 'd_real', 'd_fake'):
    np.testing.assert_allclose(detected[name][0], frozen[name][0], rtol=1e-6)
  assert int(detect_g.step) == int(detect_d.step) == 3
  assert not all(np.all(np.isfinite(leaf))
                 for leaf in jax.tree.leaves(detect_d.params))
  _, d_metrics = jaxgan.discriminator_loop(
      detect_g, detect_d, images, loop_key, 0, guard='detect', **kwargs)
  assert d_metrics['finite'].tolist() == [False] * 3


def test_fused_loops_reject_an_unknown_guard(states):
  with pytest.raises(ValueError, match="guard must be one of.*'skip'"):
    jaxgan.train_loop(*copy_tree(states), _dataset(), jax.random.key(0),
                      num_steps=2, batch_size=64, guard='skip')


def test_fused_loop_visits_each_example_once_per_epoch():
  order = jaxgan.epoch_permutation(jax.random.key(0), 3, 200)
  assert sorted(np.asarray(order).tolist()) == list(range(200))
  other = jaxgan.epoch_permutation(jax.random.key(0), 4, 200)
  assert not np.array_equal(order, other)


def test_fused_loop_rejects_bad_steps_per_epoch(states):
  with pytest.raises(ValueError, match='steps_per_epoch'):
    jaxgan.train_loop(*copy_tree(states), _dataset(), jax.random.key(0),
                      num_steps=2, batch_size=64, steps_per_epoch=4)
  images = _dataset()
  with pytest.raises(ValueError, match=f'holds {len(images)} images, fewer '
                     'than one step takes'):
    jaxgan.train_loop(*copy_tree(states), images, jax.random.key(0),
                      num_steps=2, batch_size=len(images) + 1)


def test_discriminator_loop_equals_discriminator_steps(loop_states):
  images, batch_size = _dataset(), 64
  loop_key = jax.random.key(3)
  state_g, state_d = copy_tree(loop_states)
  fused_d, metrics = jaxgan.discriminator_loop(
      state_g, copy_tree(state_d), images, loop_key, 1, num_steps=3,
      batch_size=batch_size)
  shuffle_key, step_key = jaxgan.loop_keys(loop_key)
  for step in range(1, 4):
    epoch, position = divmod(step, 3)
    order = jaxgan.epoch_permutation(shuffle_key, epoch, len(images))
    batch = images[order[position * batch_size:(position + 1) * batch_size]]
    state_d, _ = jaxgan.discriminator_step(
        state_g, state_d, batch, jax.random.fold_in(step_key, step))
  for a, b in zip(jax.tree.leaves(state_d), jax.tree.leaves(fused_d)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert metrics['d_loss'].shape == (3,)
  assert metrics['finite'].tolist() == [True] * 3


def test_sample_uses_eval_mode_and_is_deterministic(states):
  state_g = states[0]
  a = jaxgan.sample(state_g, jax.random.key(0), 8)
  b = jaxgan.sample(state_g, jax.random.key(0), 8)
  c = jaxgan.sample(state_g, jax.random.key(1), 8)
  assert a.shape == (8, 28, 28, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Evaluation mode: an image does not depend on the others in its batch.
  z, _ = jaxgan.generator_inputs(jax.random.key(0), 8, 100)
  np.testing.assert_allclose(jaxgan.generate(state_g, z)[:3],
                             jaxgan.generate(state_g, z[:3]), atol=1e-6)
  np.testing.assert_array_equal(a, jaxgan.generate(state_g, z))
  probabilities = jaxgan.discriminate(states[1], a)
  assert probabilities.shape == (8,)
  assert bool(jnp.all((probabilities > 0) & (probabilities < 1)))
