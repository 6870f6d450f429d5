"""Train states, the GAN train step, the discriminator-only step, fused loops.

Everything here is a pure function of explicit states, data and PRNG keys.
The public steps are jitted once at module level with the states donated:
the states passed in are consumed, so keep a copy (`jax.tree.map(jnp.copy,
state)`) if you need them again.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from jaxgan import checks
from jaxgan import losses as losses_lib
from jaxgan.errors import is_positive_integer
from jaxgan.models import IMAGE_SHAPE

Metrics = dict[str, jax.Array]


class GeneratorState(train_state.TrainState):
  """Generator parameters, optimiser state, step and BatchNorm statistics.

  Attributes:
    batch_stats: BatchNorm running averages (an empty dict without BatchNorm).
    ema_params: an exponential moving average of `params`, updated after
      every G update (with a warm-up, see `ema_decay_at`), or None (no EMA).
      Sampling uses it by default.
    noise_dim: size of the noise vector the generator takes (static).
    ema_decay: the EMA's decay per G update (static; 0 without EMA).
    num_classes: classes of a conditional generator (static; 0 if not).
  """

  batch_stats: Any = None
  ema_params: Any = None
  noise_dim: int = struct.field(pytree_node=False, default=100)
  ema_decay: float = struct.field(pytree_node=False, default=0.0)
  num_classes: int = struct.field(pytree_node=False, default=0)


class DiscriminatorState(train_state.TrainState):
  """Discriminator parameters, optimiser state, step and BatchNorm statistics.

  Attributes:
    batch_stats: BatchNorm running averages, updated only by training steps.
    image_shape: `(H, W, C)` of the images it scores (static).
    num_classes: classes of a conditional discriminator (static; 0 if not).
  """

  batch_stats: Any = None
  image_shape: tuple[int, ...] = struct.field(
      pytree_node=False, default=IMAGE_SHAPE)
  num_classes: int = struct.field(pytree_node=False, default=0)


def adam(learning_rate: float = 2e-4, beta1: float = 0.5,
         beta2: float = 0.999) -> optax.GradientTransformation:
  """Adam with DCGAN's defaults (the tutorial used beta1 = 0.9).

  Equal arguments give the same object: states made with it then share
  compiled programs (`create_train_states`, the steps), whose caches tell
  optimisers apart by identity.
  """
  try:
    return _adam(learning_rate, beta1, beta2)
  except TypeError:  # An unhashable argument, e.g. an array.
    return optax.adam(learning_rate, b1=beta1, b2=beta2)


@functools.cache
def _adam(learning_rate, beta1, beta2) -> optax.GradientTransformation:
  return optax.adam(learning_rate, b1=beta1, b2=beta2)


def create_train_states(
    key: jax.Array,
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: optax.GradientTransformation,
    optimizer_d: optax.GradientTransformation,
    image_shape: tuple[int, int, int] = IMAGE_SHAPE,
    ema_decay: float | None = None,
) -> tuple[GeneratorState, DiscriminatorState]:
  """Initialises both networks and their optimisers.

  All of it is one jitted program, compiled once per generator,
  discriminator, optimisers (told apart by identity: reuse the objects, or
  use `adam`), image shape and EMA setting; other keys reuse it.

  Args:
    key: a PRNG key; split once for the two networks.
    generator: a module mapping `[B, noise_dim]` to `[B, *image_shape]`, with
      a `noise_dim` attribute and a `train` argument.
    discriminator: a module mapping `[B, *image_shape]` to logits `[B]`, with
      a `train` argument.
    optimizer_g: the generator's optimiser.
    optimizer_d: the discriminator's optimiser.
    image_shape: `(H, W, C)` of real and generated images.
    ema_decay: keep an exponential moving average of G's parameters with
      this decay in [0, 1) (e.g. 0.999), or None for no average.

  Returns:
    `(state_g, state_d)`, with steps at 0.
  """
  if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1) or None, got {ema_decay}.')
  num_classes = int(getattr(generator, 'num_classes', 0))
  if num_classes != int(getattr(discriminator, 'num_classes', 0)):
    raise ValueError(
        f'The generator has num_classes={num_classes} but the discriminator '
        f'{getattr(discriminator, "num_classes", 0)}; a conditional GAN '
        'needs both conditional on the same classes.')
  statics = (generator, discriminator, optimizer_g, optimizer_d,
             tuple(image_shape), ema_decay)
  try:
    hash(statics)
  except TypeError:
    # A module or optimiser with unhashable fields: compiled for this call.
    return jax.jit(functools.partial(_initial_states, *statics))(key)
  return _initial_states_program(*statics, key)


def _initial_states(generator, discriminator, optimizer_g, optimizer_d,
                    image_shape, ema_decay, key):
  """`create_train_states`' work, as one program: a run's start-up then
  compiles (or loads) one program instead of one per optimiser leaf."""
  key_g, key_d = jax.random.split(key)
  noise_dim = int(generator.noise_dim)
  num_classes = int(getattr(generator, 'num_classes', 0))
  labels = _labels_kwargs(jnp.zeros((1,), jnp.int32) if num_classes else None)
  vars_g = generator.init(key_g, jnp.zeros((1, noise_dim)), train=False,
                          **labels)
  vars_d = discriminator.init(
      key_d, jnp.zeros((1, *image_shape)), train=False, **labels)
  generated = jax.eval_shape(
      lambda v: generator.apply(v, jnp.zeros((1, noise_dim)), **labels),
      vars_g)
  if generated.shape[1:] != tuple(image_shape):
    raise ValueError(
        f'The generator makes images of shape {generated.shape[1:]} but '
        f'image_shape is {tuple(image_shape)}; they must agree.')
  # A strongly typed int32 (not the weakly typed Python int 0 that
  # TrainState.create uses), so the first and later calls of a jitted step
  # see the same input types.
  zero = jnp.zeros((), jnp.int32)
  state_g = GeneratorState.create(
      apply_fn=generator.apply, params=vars_g['params'], tx=optimizer_g,
      batch_stats=vars_g.get('batch_stats', {}), noise_dim=noise_dim,
      ema_decay=0.0 if ema_decay is None else float(ema_decay),
      num_classes=num_classes,
  ).replace(step=zero)
  if ema_decay is not None:
    # The program's outputs are separate buffers, so the average survives
    # the steps' donation of `params`.
    state_g = state_g.replace(ema_params=state_g.params)
  state_d = DiscriminatorState.create(
      apply_fn=discriminator.apply, params=vars_d['params'], tx=optimizer_d,
      batch_stats=vars_d.get('batch_stats', {}),
      image_shape=tuple(image_shape), num_classes=num_classes
  ).replace(step=zero)
  return state_g, state_d


# Compiled once per model, optimisers, image shape and EMA setting.
_initial_states_program = jax.jit(_initial_states,
                                  static_argnums=(0, 1, 2, 3, 4, 5))


def sample_noise(key: jax.Array, num: int, noise_dim: int) -> jax.Array:
  """Draws generator noise `z ~ U(-1, 1)^noise_dim`.

  Args:
    key: a PRNG key.
    num: number of noise vectors.
    noise_dim: their size.

  Returns:
    `[num, noise_dim]` float32.
  """
  return jax.random.uniform(key, (num, noise_dim), jnp.float32, -1.0, 1.0)


def to_float_images(images: jax.typing.ArrayLike,
                    image_shape: tuple[int, ...] = IMAGE_SHAPE) -> jax.Array:
  """Checks a batch of images and returns it as float32 in [-1, 1].

  Args:
    images: `[B, H, W, C]`; uint8 in [0, 255] (rescaled here) or floating
      point already in [-1, 1] (passed through).
    image_shape: the expected `(H, W, C)`.

  Returns:
    `[B, H, W, C]` float32 in [-1, 1].

  Raises:
    ValueError: for a wrong rank, shape or dtype. Checked at trace time, so
      it costs nothing inside a compiled step. Float values outside
      [-1, 1] raise only under `jaxgan.checked`.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(
        f'Expected a batch of images of shape [B, {", ".join(map(str, image_shape))}]'
        f', got {tuple(images.shape)}. MNIST rows of 784 pixels must be '
        f'reshaped with images.reshape(-1, 28, 28, 1).')
  if images.shape[0] < 1:
    raise ValueError('The batch holds no images; a step needs at least one '
                     '(BatchNorm normalises over the batch).')
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f'Expected uint8 images in [0, 255] or float images in [-1, 1], got '
        f'dtype {images.dtype}.')
  checks.image_range(images)
  return images.astype(jnp.float32)


def _generator_vars(state_g: GeneratorState, params=None,
                    use_ema: bool = False) -> dict:
  if params is None:
    params = (state_g.ema_params if use_ema and state_g.ema_params is not None
              else state_g.params)
  return {'params': params, 'batch_stats': state_g.batch_stats}


def ema_decay_at(ema_decay: float, step: jax.Array) -> jax.Array:
  """The EMA's decay after G update `step` (1, 2, ...), with a warm-up.

  `min(ema_decay, (1 + step) / (10 + step))`, as TensorFlow's
  ExponentialMovingAverage does with `num_updates`: with a plain 0.999 the
  average would still hold 39% of the random initialisation after an epoch
  of 937 steps.
  """
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def _labels_kwargs(labels) -> dict:
  """Keyword arguments that pass labels to conditional models only."""
  return {} if labels is None else {'labels': labels}


def sample_labels(key: jax.Array, num: int, num_classes: int) -> jax.Array:
  """Class labels drawn uniformly from [0, num_classes), `[num]` int32."""
  return jax.random.randint(key, (num,), 0, num_classes, jnp.int32)


def generator_inputs(key: jax.Array, num: int, noise_dim: int,
                     num_classes: int = 0
                     ) -> tuple[jax.Array, jax.Array | None]:
  """Draws G's inputs for `num` samples as the train step and `sample` do.

  A key in JAX is either drawn from or split, never both: `split(key)[i]`
  is `fold_in(key, i)`, and both share threefry evaluations with the values
  drawn from `key` itself. So `key` is only split here, into one key for the
  noise and one for the labels.

  Args:
    key: a PRNG key, used up here.
    num: number of samples (static).
    noise_dim: length of each noise vector.
    num_classes: the generator's classes (0: unconditional, no labels).

  Returns:
    `(noise [num, noise_dim], labels [num] int32 or None)`.
  """
  noise_key, label_key = jax.random.split(key)
  labels = (sample_labels(label_key, num, num_classes) if num_classes
            else None)
  return sample_noise(noise_key, num, noise_dim), labels


def _fake_inputs(state_g, key, num):
  return generator_inputs(key, num, state_g.noise_dim, state_g.num_classes)


def split_batch(batch: Any, num_classes: int = 0,
                image_shape: tuple[int, ...] = IMAGE_SHAPE):
  """`(images, labels)` of a batch: float images and int labels or None.

  Args:
    batch: images `[B, H, W, C]` for an unconditional model, or the pair
      `(images, labels [B])` for a conditional one.
    num_classes: the model's classes (0: unconditional).
    image_shape: `(H, W, C)`.

  Returns:
    Float images in [-1, 1] and int labels `[B]` (None if unconditional).
  """
  paired = isinstance(batch, (tuple, list))
  if num_classes and not (paired and len(batch) == 2):
    raise ValueError(f'A conditional model ({num_classes} classes) trains on '
                     '(images, labels) pairs; pass the batch as a tuple.')
  if not num_classes and paired:
    raise ValueError('This model is unconditional: pass the images alone, '
                     'or build it with num_classes to train on labels.')
  images, labels = batch if paired else (batch, None)
  images = to_float_images(images, image_shape)
  if labels is not None:
    labels = jnp.asarray(labels)
    if (labels.shape != images.shape[:1]
        or not jnp.issubdtype(labels.dtype, jnp.integer)):
      raise ValueError(f'Expected int labels of shape [{images.shape[0]}], '
                       f'got {labels.dtype} {tuple(labels.shape)}.')
  return images, labels


def _discriminator_update(state_d, real, fake, loss, key, real_labels=None,
                          fake_labels=None):
  """One optimiser step of D on a real and a generated batch."""

  def loss_fn(params):
    # Real and fake go through D separately, as in the tutorial and DCGAN, so
    # each is normalised with its own batch statistics.
    logits_real, updates = state_d.apply_fn(
        {'params': params, 'batch_stats': state_d.batch_stats}, real,
        train=True, mutable=['batch_stats'], **_labels_kwargs(real_labels))
    logits_fake, updates = state_d.apply_fn(
        {'params': params, 'batch_stats': updates['batch_stats']}, fake,
        train=True, mutable=['batch_stats'], **_labels_kwargs(fake_labels))
    adversarial = loss.discriminator(logits_real, logits_fake)
    penalty = jnp.zeros((), jnp.float32)
    if loss.penalty is not None:
      def discriminator_fn(images):
        # The penalty's own passes leave the running averages alone; its
        # images (real, or interpolates from real) take the real labels.
        return state_d.apply_fn(
            {'params': params, 'batch_stats': state_d.batch_stats}, images,
            train=True, mutable=['batch_stats'],
            **_labels_kwargs(real_labels))[0]
      penalty = loss.penalty(discriminator_fn, real, fake, key, state_d.step)
    return adversarial + penalty, (updates['batch_stats'], adversarial,
                                   penalty, logits_real, logits_fake)

  (_, (batch_stats, d_loss, penalty, logits_real, logits_fake)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state_d.params))
  state_d = state_d.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {
      'd_loss': d_loss,
      'd_real': jnp.mean(jax.nn.sigmoid(logits_real)),
      'd_fake': jnp.mean(jax.nn.sigmoid(logits_fake)),
  }
  if loss.penalty is not None:
    metrics['d_penalty'] = penalty
  return state_d, metrics


def _split_critic_batches(batch, state_d, n_critic):
  """`[n_critic * B, ...]` images (and labels) -> `n_critic` batches."""
  real, labels = split_batch(batch, state_d.num_classes, state_d.image_shape)
  if real.shape[0] % n_critic:
    raise ValueError(
        f'With n_critic={n_critic} a step takes n_critic batches at once: '
        f'the batch of {real.shape[0]} images must be a multiple of '
        f'{n_critic}.')
  size = real.shape[0] // n_critic
  real = real.reshape(n_critic, size, *real.shape[1:])
  if labels is None:
    return real, [None] * n_critic
  return real, labels.reshape(n_critic, size)


def step_keys(key: jax.Array, n_critic: int = 1
              ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
  """The keys of a step's random draws, each folded from the step's key.

  Args:
    key: the step's PRNG key; only folded, never drawn from.
    n_critic: D updates per step.

  Returns:
    `(fake_key, penalty_keys, extra_fake_keys)`: the `generator_inputs` key
    of the batch G is updated on, the penalty key of each D update (the
    last one is the update on that batch) and the `generator_inputs` keys
    of the `n_critic - 1` extra D updates' batches. The last D update and
    G's update take the keys of a step with `n_critic=1`, whatever
    `n_critic` is.
  """
  fold = functools.partial(jax.random.fold_in, key)
  extra = range(n_critic - 1)
  return (fold(0), [fold(2 + 2 * i) for i in extra] + [fold(1)],
          [fold(3 + 2 * i) for i in extra])


def _train_step(state_g: GeneratorState, state_d: DiscriminatorState,
                batch: jax.Array, key: jax.Array,
                loss: losses_lib.GANLoss = losses_lib.NON_SATURATING):
  loss.validate()
  reals, real_labels = _split_critic_batches(batch, state_d, loss.n_critic)
  batch_size = reals.shape[1]
  fake_key, penalty_keys, extra_fake_keys = step_keys(key, loss.n_critic)

  # The extra critic updates: fresh samples, G's statistics untouched.
  for i in range(loss.n_critic - 1):
    z, fake_labels = _fake_inputs(state_g, extra_fake_keys[i], batch_size)
    fake, _ = state_g.apply_fn(_generator_vars(state_g), z, train=True,
                               mutable=['batch_stats'],
                               **_labels_kwargs(fake_labels))
    state_d, _ = _discriminator_update(
        state_d, reals[i], jax.lax.stop_gradient(fake), loss,
        penalty_keys[i], real_labels[i], fake_labels)

  real, labels = reals[-1], real_labels[-1]
  z, fake_labels = _fake_inputs(state_g, fake_key, batch_size)

  def generate(params):
    fake, updates = state_g.apply_fn(
        _generator_vars(state_g, params), z, train=True,
        mutable=['batch_stats'], **_labels_kwargs(fake_labels))
    return fake, updates.get('batch_stats', {})

  # One forward pass of G serves both updates: its output feeds D's update,
  # and its VJP turns dLoss_G/dfake into G's parameter gradients afterwards.
  fake, generator_vjp, batch_stats_g = jax.vjp(
      generate, state_g.params, has_aux=True)

  state_d, metrics = _discriminator_update(
      state_d, real, fake, loss, penalty_keys[-1], labels, fake_labels)

  def score(images, image_labels):
    # D runs in training mode, as during its own update, but these passes
    # only serve G's gradient: D's running averages are left as they are.
    return state_d.apply_fn(
        {'params': state_d.params, 'batch_stats': state_d.batch_stats},
        images, train=True, mutable=['batch_stats'],
        **_labels_kwargs(image_labels))[0]

  logits_real = (jax.lax.stop_gradient(score(real, labels))
                 if loss.generator_needs_real else None)
  g_loss, grad_fake = jax.value_and_grad(
      lambda fake: loss.generator(score(fake, fake_labels), logits_real))(fake)
  (grads_g,) = generator_vjp(grad_fake)
  state_g = state_g.apply_gradients(grads=grads_g, batch_stats=batch_stats_g)
  if state_g.ema_params is not None:
    state_g = state_g.replace(ema_params=optax.incremental_update(
        state_g.params, state_g.ema_params,
        1.0 - ema_decay_at(state_g.ema_decay, state_g.step)))
  metrics['g_loss'] = g_loss
  return state_g, state_d, metrics


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=('loss',))
def train_step(state_g: GeneratorState, state_d: DiscriminatorState,
               batch: jax.Array, key: jax.Array,
               loss: losses_lib.GANLoss = losses_lib.NON_SATURATING
               ) -> tuple[GeneratorState, DiscriminatorState, Metrics]:
  """One discriminator update, then one generator update, on one batch.

  Order, as in the tutorial: (1) draw `z ~ U(-1, 1)` and generate
  `G(z)` with G in training mode (its BatchNorm statistics are updated once
  per step); (2) update D on the real batch and `G(z)`, each passed through
  D separately in training mode; (3) update G on the same `G(z)` against the
  already updated D, then its EMA if it keeps one. G's `step` increases by
  one, D's by `loss.n_critic` (with `n_critic > 1`, that many D updates
  precede (2), each on its own slice of the batch and fresh samples of G).

  Jitted with both states donated; `loss` is static. Same inputs and key
  give bit-identical outputs.

  Args:
    state_g: generator state (consumed).
    state_d: discriminator state (consumed).
    batch: real images `[n_critic * B, 28, 28, 1]`, uint8 in [0, 255] or
      float in [-1, 1]; for a conditional GAN the pair `(images, labels)`
      with int labels `[n_critic * B]` (G's labels are drawn uniformly).
    key: PRNG key for this step, e.g. `jax.random.fold_in(run_key, step)`;
      split by `step_keys` into the keys of G's inputs and the penalties.
    loss: the GAN objective: loss pair, penalty, `n_critic`.

  Returns:
    `(state_g, state_d, metrics)`; metrics are device scalars: `d_loss`
    (adversarial part), `g_loss`, `d_real` (mean D(x)), `d_fake` (mean
    D(G(z)) before D's update) and, with a penalty, `d_penalty` (weighted);
    all of the step's last D update.
  """
  return _train_step(state_g, state_d, batch, key, loss)


def _discriminator_step(state_g, state_d, batch, key,
                        loss=losses_lib.NON_SATURATING):
  loss.validate()
  real, labels = split_batch(batch, state_d.num_classes, state_d.image_shape)
  fake_key, (penalty_key,), _ = step_keys(key)
  z, fake_labels = _fake_inputs(state_g, fake_key, real.shape[0])
  fake = state_g.apply_fn(_generator_vars(state_g), z, train=False,
                          **_labels_kwargs(fake_labels))
  return _discriminator_update(state_d, real, fake, loss, penalty_key, labels,
                               fake_labels)


@functools.partial(jax.jit, donate_argnums=(1,), static_argnames=('loss',))
def discriminator_step(state_g: GeneratorState, state_d: DiscriminatorState,
                       batch: jax.Array, key: jax.Array,
                       loss: losses_lib.GANLoss = losses_lib.NON_SATURATING
                       ) -> tuple[DiscriminatorState, Metrics]:
  """One discriminator update against a frozen generator (phase two).

  G runs in evaluation mode (running BatchNorm averages) and is not changed.

  Args:
    state_g: generator state (read only, not donated).
    state_d: discriminator state (consumed).
    batch: real images, as for `train_step`.
    key: PRNG key of the step, split by `step_keys`: G's noise (and
      labels) and the penalty's randomness.
    loss: the GAN loss pair; only its discriminator half is used.

  Returns:
    `(state_d, metrics)` with `d_loss`, `d_real`, `d_fake`.
  """
  return _discriminator_step(state_g, state_d, batch, key, loss)


def epoch_permutation(key: jax.Array, epoch: jax.typing.ArrayLike,
                      num_examples: int, num_shards: int = 1) -> jax.Array:
  """The order in which epoch `epoch` visits the dataset.

  With `num_shards=S > 1` the dataset is S contiguous blocks of `N / S`
  examples (one per data-parallel shard, see `jaxgan.parallel`), each
  shuffled on its own, and a batch takes `B / S` examples from every block:
  no example crosses devices or hosts, and the order depends on S but not on
  how many devices hold the blocks.

  Args:
    key: the shuffle key of the run.
    epoch: epoch index (may be traced).
    num_examples: dataset size `N` (a multiple of `num_shards`).
    num_shards: S, the number of blocks.

  Returns:
    `[N]` int32 for one shard: a permutation of `arange(N)`. Otherwise
    `[S, N / S]`: row k is a permutation of block k's indices `arange(N / S)`
    (local to the block).
  """
  epoch_key = jax.random.fold_in(key, epoch)
  if num_shards == 1:
    return jax.random.permutation(epoch_key, num_examples)
  block = num_examples // num_shards
  return jax.vmap(lambda k: jax.random.permutation(
      jax.random.fold_in(epoch_key, k), block))(jnp.arange(num_shards))


def loop_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits a loop key into `(shuffle_key, step_key)`.

  The fused loops shuffle epoch `e` with `epoch_permutation(shuffle_key, e,
  N)` and give step `s` the key `jax.random.fold_in(step_key, s)`, so any
  step's data and randomness depend only on `key` and `s`.
  """
  shuffle_key, step_key = jax.random.split(key)
  return shuffle_key, step_key


def _all_finite(tree) -> jax.Array:
  """Whether every floating-point value in `tree` is finite (a bool scalar)."""
  checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


GUARDS = ('freeze', 'detect')


def _check_guard(guard: str) -> None:
  if guard not in GUARDS:
    raise ValueError(f'guard must be one of {GUARDS}, got {guard!r}: '
                     "'freeze' keeps the last finite states, 'detect' only "
                     'flags the first non-finite step.')


def _guarded(step_fn, guard: str = 'freeze'):
  """Wraps a loop step with the divergence check.

  The carry becomes `(carry, diverged)`. A step whose metrics or new states
  hold a NaN or an infinity sets `diverged`, and the per-step `finite`
  metric (False from that step on) tells the host where it went wrong, with
  no host round trip inside the loop. With `guard='freeze'` the carry is
  then left as it was before that step, so the loop returns the last finite
  states: a select per state array, every step. With `guard='detect'` the
  states go on updating (and hold NaN or infinity after the bad step), for
  callers that restore a checkpoint on divergence and never read them.
  """

  def guarded(carry, batch, key):
    state, diverged = carry
    new_state, metrics = step_fn(state, batch, key)
    finite = _all_finite((new_state, metrics))
    diverged = diverged | ~finite
    if guard == 'freeze':
      new_state = jax.tree.map(lambda old, new: jnp.where(diverged, old, new),
                               state, new_state)
    return (new_state, diverged), {**metrics, 'finite': ~diverged}

  return guarded


def _scan_steps(step_fn, carry, images, key, first_step, num_steps,
                batch_size, steps_per_epoch, unroll, num_shards=1, groups=1,
                guard='freeze'):
  """Runs `step_fn` for steps first_step .. first_step + num_steps - 1.

  Steps are guarded (see `_guarded`): with `guard='freeze'` the returned
  carry is that of the last finite step; either way the metrics gain a
  per-step bool `finite`. Each step takes `batch_size` images made of
  `groups` sub-batches (the D updates of one step with `n_critic = groups`),
  each spread evenly over the shards.
  """
  # `images` may be a pytree of arrays with one row per example (the pair
  # (images, labels) of a conditional GAN); rows are gathered alike.
  num_examples = jax.tree.leaves(images)[0].shape[0]
  if (num_examples % num_shards or batch_size % groups
      or (batch_size // groups) % num_shards):
    raise ValueError(
        f'With {num_shards} data shards the dataset size ({num_examples}) and '
        f'the batch size ({batch_size // groups}) must both be multiples of '
        f'{num_shards}; drop the remainder of the dataset '
        f'(jaxgan.parallel.shard_dataset does) and pick a batch size that '
        f'divides evenly.')
  if num_examples < batch_size:
    raise ValueError(
        f'The dataset holds {num_examples} images, fewer than one step takes '
        f'({batch_size}); pass more images or a smaller batch_size.')
  if steps_per_epoch is None:
    steps_per_epoch = num_examples // batch_size
  if not 1 <= steps_per_epoch <= num_examples // batch_size:
    raise ValueError(
        f'steps_per_epoch must be in [1, {num_examples // batch_size}] for '
        f'{num_examples} images in batches of {batch_size}, got '
        f'{steps_per_epoch}.')
  shuffle_key, step_key = loop_keys(key)
  first_step = jnp.asarray(first_step, jnp.int32)
  first_epoch = first_step // steps_per_epoch
  # Every epoch this call can touch, shuffled once up front: a static bound
  # keeps shapes fixed and avoids a conditional inside the loop.
  num_epochs_touched = -(-(num_steps - 1) // steps_per_epoch) + 1
  permute = jax.vmap(
      lambda e: epoch_permutation(shuffle_key, e, num_examples, num_shards))
  permutations = permute(first_epoch + jnp.arange(num_epochs_touched - 1))
  # The bound counts one epoch more than a call that starts at an epoch's
  # first step touches; shuffle that one only when the call reaches it (a
  # shuffle is a sort of the whole dataset: on a CPU, 30 ms for 60,000).
  last_epoch = first_epoch + num_epochs_touched - 1
  last = jax.lax.cond(
      (first_step + num_steps - 1) // steps_per_epoch == last_epoch,
      lambda: permute(last_epoch[None]),
      lambda: jnp.zeros((1, *permutations.shape[1:]), permutations.dtype))
  permutations = jnp.concatenate([permutations, last])
  # [S, N / S, ...]: block k lives on data shard k.
  blocks = jax.tree.map(
      lambda a: a.reshape(num_shards, num_examples // num_shards,
                          *a.shape[1:]), images)
  shard_batch = batch_size // num_shards

  _check_guard(guard)
  guarded_step = _guarded(step_fn, guard)

  def body(carry, offset):
    step = first_step + offset
    epoch, position = jnp.divmod(step, steps_per_epoch)
    order = permutations[epoch - first_epoch]
    if num_shards == 1:
      indices = jax.lax.dynamic_slice_in_dim(order, position * batch_size,
                                             batch_size)
      batch = jax.tree.map(lambda a: jnp.take(a, indices, axis=0), images)
    else:
      # Each block gives B / S examples, gathered where the block lives.
      indices = jax.lax.dynamic_slice_in_dim(
          order, position * shard_batch, shard_batch, axis=1)
      def gather(blocks_of_leaf):
        rows = jax.vmap(lambda block, i: jnp.take(block, i, axis=0))(
            blocks_of_leaf, indices)
        rows = rows.reshape(num_shards, groups, shard_batch // groups,
                            *rows.shape[2:]).swapaxes(0, 1)
        return rows.reshape(batch_size, *rows.shape[3:])

      batch = jax.tree.map(gather, blocks)
    return guarded_step(carry, batch, jax.random.fold_in(step_key, step))

  carry = (carry, jnp.array(False))
  if num_steps == 1:
    # jax keeps a one-trip while loop even when fully unrolled, and XLA:CPU
    # compiles convolution gradients inside loop bodies several times slower.
    (carry, _), metrics = body(carry, jnp.zeros((), jnp.int32))
    return carry, jax.tree.map(lambda m: m[None], metrics)
  (carry, _), metrics = jax.lax.scan(
      body, carry, jnp.arange(num_steps, dtype=jnp.int32), unroll=unroll)
  return carry, metrics


@functools.partial(
    jax.jit, donate_argnums=(0, 1),
    static_argnames=('num_steps', 'batch_size', 'steps_per_epoch', 'loss',
                     'unroll', 'num_shards', 'guard'))
def train_loop(state_g: GeneratorState, state_d: DiscriminatorState,
               images: jax.Array, key: jax.Array, *, num_steps: int,
               batch_size: int, steps_per_epoch: int | None = None,
               loss: losses_lib.GANLoss = losses_lib.NON_SATURATING,
               unroll: int | bool = 1, num_shards: int = 1,
               guard: str = 'freeze',
               ) -> tuple[GeneratorState, DiscriminatorState, Metrics]:
  """Runs `num_steps` train steps in one compiled call (`lax.scan`).

  The dataset stays on the device; batches are gathered by index. The run
  continues at step `s = state_g.step`: step `s` belongs to epoch
  `s // steps_per_epoch` and takes that epoch's batch number
  `s % steps_per_epoch`. See `loop_keys` for the keys, so the result equals
  calling `train_step` on the same batches with the same keys.

  Divergence is caught inside the loop: `metrics['finite']` marks the first
  step that yields a NaN or an infinity in a loss or a state. With the
  default `guard='freeze'` the remaining steps of the call leave the states
  untouched, so the call returns the last finite states (their `step` tells
  how far they got).

  Args:
    state_g: generator state (consumed).
    state_d: discriminator state (consumed).
    images: the whole dataset, `[N, 28, 28, 1]` uint8 (or float in [-1, 1]),
      ideally already on the device.
    key: the loop key of the run; constant across calls.
    num_steps: steps in this call (static).
    batch_size: images per D update (static); a step takes
      `batch_size * loss.n_critic`.
    steps_per_epoch: steps per epoch, at most `N // (batch_size * n_critic)`
      (the default): the remainder of each shuffled epoch is dropped.
    loss: the GAN objective (static).
    unroll: `lax.scan`'s unroll (static); `benchmarks/loop_variants.py`
      measures what it buys. XLA's own convolution gradients run several
      times slower inside loop bodies on CPU, which the models'
      `conv_kernel_grad='auto'` avoids.
    num_shards: data-parallel shards the dataset is split into (static);
      see `epoch_permutation`. `jaxgan.parallel` sets it to the mesh size.
    guard: 'freeze' (keep the last finite states: a select per state array
      every step) or 'detect' (only flag the step; the returned states are
      then unusable), for callers that restore a checkpoint on divergence
      (static).

  Returns:
    `(state_g, state_d, metrics)`, metrics stacked per step: `[num_steps]`
    arrays `d_loss`, `g_loss`, `d_real`, `d_fake` and the bool `finite`
    (False from the first diverged step on).
  """

  loss.validate()  # Before n_critic sizes the batches.

  def step_fn(carry, batch, step_key):
    state_g, state_d = carry
    state_g, state_d, metrics = _train_step(
        state_g, state_d, batch, step_key, loss)
    return (state_g, state_d), metrics

  (state_g, state_d), metrics = _scan_steps(
      step_fn, (state_g, state_d), images, key, state_g.step, num_steps,
      batch_size * loss.n_critic, steps_per_epoch, unroll, num_shards,
      groups=loss.n_critic, guard=guard)
  return state_g, state_d, metrics


@functools.partial(
    jax.jit, donate_argnums=(1,),
    static_argnames=('num_steps', 'batch_size', 'steps_per_epoch', 'loss',
                     'unroll', 'num_shards', 'guard'))
def discriminator_loop(state_g: GeneratorState, state_d: DiscriminatorState,
                       images: jax.Array, key: jax.Array,
                       first_step: jax.typing.ArrayLike, *, num_steps: int,
                       batch_size: int, steps_per_epoch: int | None = None,
                       loss: losses_lib.GANLoss = losses_lib.NON_SATURATING,
                       unroll: int | bool = 1, num_shards: int = 1,
                       guard: str = 'freeze',
                       ) -> tuple[DiscriminatorState, Metrics]:
  """Runs `num_steps` discriminator-only steps in one compiled call.

  Same data order, keys and divergence guard as `train_loop`, counted from
  `first_step` (the step within the discriminator phase, traced: changing
  it does not recompile).

  Args:
    state_g: generator state (read only).
    state_d: discriminator state (consumed).
    images: the whole dataset, as for `train_loop`.
    key: the loop key of the phase.
    first_step: index of the first step of this call within the phase.
    num_steps: steps in this call (static).
    batch_size: images per step (static).
    steps_per_epoch: batches per epoch (static), as for `train_loop`.
    loss: the GAN loss pair (static).
    unroll: `lax.scan`'s unroll (static), as for `train_loop`.
    num_shards: data shards (static), as for `train_loop`.
    guard: 'freeze' or 'detect' (static), as for `train_loop`.

  Returns:
    `(state_d, metrics)`, metrics stacked per step: `[num_steps]` arrays
    `d_loss`, `d_real`, `d_fake` and the bool `finite`.
  """

  def step_fn(state_d, batch, step_key):
    return _discriminator_step(state_g, state_d, batch, step_key, loss)

  return _scan_steps(step_fn, state_d, images, key, first_step, num_steps,
                     batch_size, steps_per_epoch, unroll, num_shards,
                     guard=guard)


def stack_seeds(trees: Any) -> Any:
  """Stacks per-run pytrees (states, keys) along a new leading seed axis.

  Args:
    trees: a sequence of pytrees of the same structure, e.g. one
      `(state_g, state_d)` per seed.

  Returns:
    One pytree whose arrays are `[num_seeds, ...]`; static fields come from
    the first tree.
  """
  trees = list(trees)
  treedef = jax.tree.structure(trees[0])
  # By leaves, not tree.map: the states' static fields (apply_fn, the
  # optimiser) come from the first tree, whatever the others hold.
  leaves = [jax.tree.leaves(tree) for tree in trees]
  if any(len(l) != len(leaves[0]) for l in leaves):
    raise ValueError('stack_seeds needs trees of one structure (states of '
                     'one config).')
  return jax.tree.unflatten(treedef, [jnp.stack(column)
                                      for column in zip(*leaves)])


def seed_slice(tree: Any, index: int) -> Any:
  """The run `index` of a pytree stacked by `stack_seeds`.

  Args:
    tree: a pytree whose arrays are `[num_seeds, ...]`.
    index: which run, in `[0, num_seeds)`.

  Returns:
    The same pytree with arrays `[...]`: that run's states (or keys).
  """
  return jax.tree.map(lambda leaf: leaf[index], tree)


@functools.partial(
    jax.jit, donate_argnums=(0, 1),
    static_argnames=('num_steps', 'batch_size', 'steps_per_epoch', 'loss',
                     'unroll', 'num_shards', 'guard'))
def train_loop_seeds(state_g: GeneratorState, state_d: DiscriminatorState,
                     images: jax.Array, keys: jax.Array, *, num_steps: int,
                     batch_size: int, steps_per_epoch: int | None = None,
                     loss: losses_lib.GANLoss = losses_lib.NON_SATURATING,
                     unroll: int | bool = 1, num_shards: int = 1,
                     guard: str = 'freeze',
                     ) -> tuple[GeneratorState, DiscriminatorState, Metrics]:
  """`train_loop` for several independent runs in one compiled program.

  The whole loop is mapped with `jax.vmap` over a leading seed axis of the
  states and keys: run i equals `train_loop` on `seed_slice(states, i)` with
  `keys[i]` (its own data order, noise and divergence guard), while the
  dataset is shared. Different initial states, e.g. other learning rates
  held in `optax.inject_hyperparams` state, map the same way.

  Args:
    state_g: generator states stacked by `stack_seeds` (consumed).
    state_d: discriminator states stacked the same way (consumed).
    images: the shared dataset, as for `train_loop`.
    keys: the runs' loop keys, `[num_seeds]`.
    num_steps: steps in this call (static).
    batch_size: images per D update and run (static).
    steps_per_epoch: as for `train_loop` (static).
    loss: the GAN objective (static).
    unroll: `lax.scan`'s unroll (static).
    num_shards: data shards (static).
    guard: 'freeze' or 'detect' (static), as for `train_loop`.

  Returns:
    `(state_g, state_d, metrics)` with metrics `[num_seeds, num_steps]`.
  """
  def one_run(state_g, state_d, key):
    return train_loop.__wrapped__(
        state_g, state_d, images, key, num_steps=num_steps,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, loss=loss,
        unroll=unroll, num_shards=num_shards, guard=guard)

  return jax.vmap(one_run)(state_g, state_d, keys)


@functools.partial(
    jax.jit, donate_argnums=(1,),
    static_argnames=('num_steps', 'batch_size', 'steps_per_epoch', 'loss',
                     'unroll', 'num_shards', 'guard'))
def discriminator_loop_seeds(
    state_g: GeneratorState, state_d: DiscriminatorState, images: jax.Array,
    keys: jax.Array, first_step: jax.typing.ArrayLike, *, num_steps: int,
    batch_size: int, steps_per_epoch: int | None = None,
    loss: losses_lib.GANLoss = losses_lib.NON_SATURATING,
    unroll: int | bool = 1, num_shards: int = 1, guard: str = 'freeze',
) -> tuple[DiscriminatorState, Metrics]:
  """`discriminator_loop` for several runs at once (see `train_loop_seeds`).

  Args:
    state_g: generator states stacked by `stack_seeds` (read only).
    state_d: discriminator states stacked the same way (consumed).
    images: the shared dataset, as for `train_loop`.
    keys: the runs' loop keys of the phase, `[num_seeds]`.
    first_step: index of the first step of this call within the phase.
    num_steps, batch_size, steps_per_epoch, loss, unroll, num_shards, guard:
      as for `discriminator_loop` (static).

  Returns:
    `(state_d, metrics)` with metrics `[num_seeds, num_steps]`.
  """
  def one_run(state_g, state_d, key):
    return discriminator_loop.__wrapped__(
        state_g, state_d, images, key, first_step, num_steps=num_steps,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, loss=loss,
        unroll=unroll, num_shards=num_shards, guard=guard)

  return jax.vmap(one_run)(state_g, state_d, keys)


@functools.partial(jax.jit, static_argnames=('num', 'use_ema'))
def sample_seeds(state_g: GeneratorState, key: jax.Array, num: int,
                 use_ema: bool = True) -> jax.Array:
  """`sample` from every run of stacked generator states, same noise.

  Args:
    state_g: generator states stacked by `stack_seeds` (not modified).
    key: PRNG key of the noise (and labels) all runs share.
    num: images per run (static).
    use_ema: use each run's EMA of G's parameters when kept (static).

  Returns:
    `[num_seeds, num, 28, 28, 1]` float32 in [-1, 1].
  """
  noise, labels = _fake_inputs(state_g, key, num)
  return jax.vmap(lambda g: generate.__wrapped__(g, noise, labels, use_ema))(
      state_g)


@functools.partial(jax.jit, static_argnames=('num', 'use_ema'))
def sample(state_g: GeneratorState, key: jax.Array, num: int,
           labels: jax.Array | None = None,
           use_ema: bool = True) -> jax.Array:
  """Generates `num` images with G in evaluation mode.

  Args:
    state_g: generator state (not modified).
    key: PRNG key of G's inputs (see `generator_inputs`): the noise and,
      for a conditional G without `labels`, labels drawn uniformly as in
      training.
    num: number of images (static).
    labels: int labels `[num]` for a conditional G, or None.
    use_ema: use the EMA of G's parameters when the state keeps one (static).

  Returns:
    `[num, 28, 28, 1]` float32 in [-1, 1].
  """
  if not is_positive_integer(num):
    raise ValueError(f'num (images to sample) must be a positive integer, '
                     f'got {num!r}.')
  noise, drawn_labels = _fake_inputs(state_g, key, num)
  return generate(state_g, noise, drawn_labels if labels is None else labels,
                  use_ema=use_ema)


@functools.partial(jax.jit, static_argnames=('use_ema',))
def generate(state_g: GeneratorState, noise: jax.Array,
             labels: jax.Array | None = None,
             use_ema: bool = True) -> jax.Array:
  """Generates images from given noise with G in evaluation mode.

  With `use_ema` and an EMA in the state, the averaged parameters are used
  with the running BatchNorm averages of the trained G.

  Args:
    state_g: generator state (not modified).
    noise: `[B, noise_dim]`.
    labels: int labels `[B]` for a conditional G (required), or None.
    use_ema: use the EMA of G's parameters when the state keeps one (static).

  Returns:
    `[B, 28, 28, 1]` float32 in [-1, 1].
  """
  return state_g.apply_fn(_generator_vars(state_g, use_ema=use_ema), noise,
                          train=False, **_labels_kwargs(labels))


@jax.jit
def discriminate(state_d: DiscriminatorState, images: jax.Array,
                 labels: jax.Array | None = None) -> jax.Array:
  """D's probability that each image is real, in evaluation mode.

  Args:
    state_d: discriminator state (not modified).
    images: `[B, 28, 28, 1]`, uint8 or float in [-1, 1].
    labels: int labels `[B]` for a conditional D (required), or None.

  Returns:
    `[B]` float32 probabilities.
  """
  images = to_float_images(images, state_d.image_shape)
  logits = state_d.apply_fn(
      {'params': state_d.params, 'batch_stats': state_d.batch_stats}, images,
      train=False, **_labels_kwargs(labels))
  return jax.nn.sigmoid(logits)
