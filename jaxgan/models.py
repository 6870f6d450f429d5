"""DCGAN generator and discriminator for 28x28 single-channel images.

Both modules are plain `flax.linen` modules used as pure functions: parameters
and BatchNorm statistics live in the train states, never in the module.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgan import checks
from jaxgan import layers

IMAGE_SHAPE = (28, 28, 1)
KERNEL_GRADS = ('auto', 'im2col', 'matmul', 'winograd', 'xla')
# Below this many output channels the im2col matmul is too narrow to pay for
# its patches (XLA:CPU, the generator's 1-channel output layer: 10x slower).
_IM2COL_MIN_FEATURES = 8
# On GPUs cuDNN's own convolution beat im2col only for the discriminator's
# 64 -> 128-channel layer (H200, forward + backward in lax.scan: 0.12 against
# 0.20 ms); im2col won the other three layers by 1.8-3x.
_GPU_XLA_MIN_FEATURES = 128


def auto_kernel_grad(transposed: bool, features: int,
                     backend: str | None = None) -> str:
  """What `conv_kernel_grad='auto'` picks for one layer.

  Args:
    transposed: whether the layer is a transposed convolution.
    features: the layer's output channels.
    backend: 'cpu', 'gpu', 'tpu'...; default: jax's default backend.

  Returns:
    'im2col', 'matmul' or 'xla'.
  """
  backend = backend or jax.default_backend()
  if backend == 'cpu':
    return 'im2col' if features >= _IM2COL_MIN_FEATURES else 'matmul'
  if backend == 'gpu':
    if not transposed and features >= _GPU_XLA_MIN_FEATURES:
      return 'xla'
    return 'im2col'
  return 'xla'


def _convolution(choice: str, transposed: bool, features: int):
  """The layer class for `conv_kernel_grad=choice` (see `Generator`)."""
  if choice not in KERNEL_GRADS:
    raise ValueError(f'conv_kernel_grad must be one of {KERNEL_GRADS}, got '
                     f'{choice!r}.')
  if choice == 'auto':
    choice = auto_kernel_grad(transposed, features)
  if choice == 'xla':
    return nn.ConvTranspose if transposed else nn.Conv
  layer = layers.ConvTranspose if transposed else layers.Conv
  return functools.partial(
      layer, implementation='matmul_grad' if choice == 'matmul' else choice)


class Generator(nn.Module):
  """Maps noise `z` in [-1, 1]^noise_dim to images in [-1, 1].

  Layers: Dense(hidden) -> Dense(7*7*base_channels) -> reshape [B, 7, 7, C]
  -> ConvTranspose(conv_channels, 5x5, stride 2) -> ConvTranspose(1, 5x5,
  stride 2) -> tanh, with leaky ReLU between layers. With `batch_norm=True`
  (the default) a BatchNorm follows each Dense layer and the first
  ConvTranspose; without it the generator is the tutorial's literal model,
  which collapses to a single blurred digit within the first epoch. With
  `num_classes > 0` it is class-conditional: the one-hot label is
  concatenated to `z`.

  Attributes:
    noise_dim: size of the noise vector `z`.
    num_classes: classes of a conditional generator; 0 for unconditional.
    hidden_dim: width of the first Dense layer.
    base_channels: channels of the 7x7 feature map.
    conv_channels: channels of the 14x14 feature map.
    batch_norm: whether to normalise hidden activations (see above).
    leaky_slope: negative slope of the leaky ReLUs.
    bn_momentum: decay of BatchNorm's running averages.
    dtype: computation dtype; parameters stay float32.
    conv_kernel_grad: how the transposed convolutions are computed:
      'im2col' (`jaxgan.layers.conv_transpose_im2col`: patches and one
      matmul over the stride phases), 'matmul' (an XLA convolution with a
      matmul kernel gradient, `jaxgan.layers.conv_matmul_grad`),
      'winograd' (`jaxgan.layers.conv_transpose_winograd`: the stride
      phases by Winograd's F(4, 3)), 'xla' (`flax.linen.ConvTranspose`)
      or 'auto' (`auto_kernel_grad`, which never picks 'winograd'): on CPU,
      'im2col' for layers with at least 8 output channels and 'matmul' for
      the others (XLA:CPU runs Flax's first layer, forward and backward,
      about 7x slower, and over 20x slower inside `lax.scan`; see
      benchmarks/RESULTS.md); on GPU, 'im2col' except for convolutions of
      128 or more output channels; 'xla' elsewhere. Parameters and results
      are the same either way.
  """

  noise_dim: int = 100
  num_classes: int = 0
  hidden_dim: int = 128
  base_channels: int = 128
  conv_channels: int = 64
  batch_norm: bool = True
  leaky_slope: float = 0.2
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  conv_kernel_grad: str = 'auto'

  def _normalize(self, x: jax.Array, train: bool) -> jax.Array:
    if not self.batch_norm:
      return x
    # The two-pass variance: E[x^2] - E[x]^2 cancels catastrophically when
    # a channel's mean is large against its spread, which made float32 steps
    # depend on how XLA happened to order the reductions.
    return nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        use_fast_variance=False, dtype=self.dtype)(x)

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Generates images.

    Args:
      z: noise, `[B, noise_dim]`.
      labels: int class labels `[B]` in [0, num_classes) for a conditional
        generator; None otherwise.
      train: use batch statistics (and return updated running averages
        when `batch_stats` is mutable) instead of the running averages.

    Returns:
      Images `[B, 28, 28, 1]` in [-1, 1], float32.
    """
    if z.ndim != 2 or z.shape[-1] != self.noise_dim:
      raise ValueError(
          f'Generator expects noise of shape [B, {self.noise_dim}], got '
          f'{z.shape}; sample it with jaxgan.sample_noise.')
    z = _with_labels(z, labels, self.num_classes, 'Generator')
    act = lambda x: nn.leaky_relu(x, self.leaky_slope)
    conv_transpose = functools.partial(_convolution, self.conv_kernel_grad,
                                       True)
    x = nn.Dense(self.hidden_dim, dtype=self.dtype)(z)
    x = act(self._normalize(x, train))
    x = nn.Dense(7 * 7 * self.base_channels, dtype=self.dtype)(x)
    x = act(self._normalize(x, train))
    x = x.reshape(x.shape[0], 7, 7, self.base_channels)
    x = conv_transpose(self.conv_channels)(
        self.conv_channels, (5, 5), strides=(2, 2), padding='SAME',
        dtype=self.dtype)(x)
    x = act(self._normalize(x, train))
    x = conv_transpose(IMAGE_SHAPE[-1])(
        IMAGE_SHAPE[-1], (5, 5), strides=(2, 2), padding='SAME',
        dtype=self.dtype)(x)
    return jnp.tanh(x).astype(jnp.float32)


def _check_labels(labels, batch: int, num_classes: int, who: str):
  if num_classes == 0:
    if labels is not None:
      raise ValueError(f'{who} is unconditional (num_classes=0) but was '
                       f'given labels.')
    return None
  if labels is None:
    raise ValueError(f'{who} is conditional on {num_classes} classes: pass '
                     f'int labels of shape [{batch}].')
  labels = jnp.asarray(labels)
  if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype,
                                                      jnp.integer):
    raise ValueError(f'{who} expects int labels of shape [{batch}], got '
                     f'{labels.dtype} {labels.shape}.')
  checks.label_range(labels, num_classes, who)
  return labels


def _with_labels(z, labels, num_classes: int, who: str):
  """z, with the one-hot labels appended for a conditional model."""
  labels = _check_labels(labels, z.shape[0], num_classes, who)
  if labels is None:
    return z
  return jnp.concatenate(
      [z, jax.nn.one_hot(labels, num_classes, dtype=z.dtype)], axis=-1)


class Discriminator(nn.Module):
  """Maps images in [-1, 1] to one real-vs-fake logit each.

  Layers: Conv(channels_1, 5x5, stride 2) -> leaky ReLU -> Conv(channels_2,
  5x5, stride 2) -> BatchNorm (optional) -> leaky ReLU -> flatten ->
  Dense(1), each layer optionally spectrally normalised.

  Attributes:
    channels_1: channels of the first convolution.
    channels_2: channels of the second convolution.
    leaky_slope: negative slope of the leaky ReLUs.
    bn_momentum: decay of BatchNorm's running averages.
    dtype: computation dtype; parameters stay float32.
    conv_kernel_grad: 'im2col', 'matmul', 'winograd', 'xla' or 'auto', as
      for the `Generator`. On XLA:CPU, 'xla' is about 10x slower inside
      `lax.scan` than in a plain step; 'auto' avoids that trap in the fused
      loops.
    batch_norm: normalise the second convolution's output (the tutorial's
      model). Without it each image's logit depends on that image alone, as
      gradient penalties assume.
    spectral_norm: divide every layer's kernel by its largest singular
      value (Miyato et al. 2018). One power iteration per training call;
      its vectors live in `batch_stats` and stay fixed in evaluation mode.
    num_classes: classes of a conditional (projection) discriminator
      (Miyato & Koyama 2018): the logit gains `<embed(y), phi(x)>`, phi the
      features before the last layer; 0 for unconditional.
  """

  channels_1: int = 64
  channels_2: int = 128
  leaky_slope: float = 0.2
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  conv_kernel_grad: str = 'auto'
  batch_norm: bool = True
  spectral_norm: bool = False
  num_classes: int = 0

  @nn.compact
  def __call__(self, images: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Scores images.

    Args:
      images: `[B, H, W, C]` float images in [-1, 1].
      labels: int class labels `[B]` for a conditional discriminator; None
        otherwise.
      train: normalise with batch statistics (updating the running averages
        when `batch_stats` is mutable) instead of the running averages.

    Returns:
      Logits `[B]`, float32; the probability of "real" is their sigmoid.
    """
    if images.ndim != 4:
      raise ValueError(
          f'Discriminator expects images of shape [B, H, W, C], got '
          f'{images.shape}; add the channel axis with images[..., None].')
    conv = functools.partial(_convolution, self.conv_kernel_grad, False)

    def layer(module, x):
      if not self.spectral_norm:
        return module(x)
      return nn.SpectralNorm(module)(x, update_stats=train)

    x = images.astype(self.dtype)
    x = layer(conv(self.channels_1)(self.channels_1, (5, 5), strides=(2, 2),
                                    padding='SAME', dtype=self.dtype), x)
    x = nn.leaky_relu(x, self.leaky_slope)
    x = layer(conv(self.channels_2)(self.channels_2, (5, 5), strides=(2, 2),
                                    padding='SAME', dtype=self.dtype), x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=self.bn_momentum, use_fast_variance=False,
                       dtype=self.dtype)(x)
    x = nn.leaky_relu(x, self.leaky_slope)
    x = x.reshape(x.shape[0], -1)
    logits = layer(nn.Dense(1, dtype=self.dtype), x)[:, 0]
    labels = _check_labels(labels, x.shape[0], self.num_classes,
                           'Discriminator')
    if labels is not None:
      # Scaled like the Dense head's initial weights (lecun normal).
      embed = nn.Embed(self.num_classes, x.shape[-1], dtype=self.dtype,
                       embedding_init=nn.initializers.normal(
                           x.shape[-1] ** -0.5))
      logits = logits + jnp.sum(embed(labels) * x, axis=-1)
    return logits.astype(jnp.float32)
