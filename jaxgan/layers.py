"""Convolutions whose kernel gradient is one matrix product.

XLA:CPU lowers the kernel gradient of a strided convolution, and still more of
a transposed convolution, to a slow generic loop: at batch 64 the gradient of
the generator's 7x7x128 -> 14x14x64 ConvTranspose took about 300 ms, against
about 35 ms in PyTorch, and inside `lax.scan` the discriminator's convolution
gradients slowed down by up to 14x. Here the forward pass and the input
gradient stay XLA convolutions, and the kernel gradient is computed from
image patches (`lax.conv_general_dilated_patches`) and a single matmul, which
every backend runs well.

`conv_im2col` and `conv_transpose_im2col` go further and express the whole
layer as image patches gathered with slices, one matrix product and (for the
transposed convolution) an interleave of the stride phases; their gradients
are matrix products and pads. A stride-s transposed convolution is s*s
ordinary convolutions with sub-kernels, one per output phase; all phases share
one window of the undilated input, so one matmul computes them together
instead of multiplying the zeros of the dilated input.

`Conv` and `ConvTranspose` are drop-in replacements for the Flax layers of the
same names: same parameter names, shapes, initialisers and numerics, so
checkpoints are interchangeable.
"""

import functools
from typing import Any, Sequence

import numpy as np

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')
Padding = tuple[tuple[int, int], ...]


def _conv(x, kernel, strides, padding, lhs_dilation):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      lhs_dilation=lhs_dilation, dimension_numbers=_DIMENSIONS)


def _strided_conv_kernel_grad(x, grad, kernel_shape, strides, padding):
  """dK for y = conv(x, K) with window strides and no input dilation.

  dK[u, v, c, o] = sum_{b,i,j} xpad[b, s*i + u, s*j + v, c] * dy[b, i, j, o]:
  the patches of x under each output position, contracted with dy.
  """
  kh, kw, channels, features = kernel_shape
  patches = lax.conv_general_dilated_patches(
      x, (kh, kw), strides, padding, dimension_numbers=_DIMENSIONS)
  # Patch features are ordered (c, u, v).
  grad_kernel = jnp.einsum('bijp,bijo->po', patches, grad)
  return grad_kernel.reshape(channels, kh, kw, features).transpose(1, 2, 0, 3)


def _dilated_conv_kernel_grad(x, grad, kernel_shape, lhs_dilation, padding):
  """dK for y = conv(dilate(x), K) with unit window strides (a transposed conv).

  With xpad = pad(dilate(x, d), lo), only xpad[d*m + lo] = x[m] is non-zero, so
  dK[u, v, c, o] = sum_{b,m,n} x[b, m, n, c] * dy[b, d*m + lo - u, d*n + lo - v,
  o]: the patches of dy, taken with stride d and the window reversed, under
  each input position, contracted with x.
  """
  kh, kw, channels, features = kernel_shape
  pads = []
  for size_x, size_y, k, d, (lo, _) in zip(
      x.shape[1:3], grad.shape[1:3], (kh, kw), lhs_dilation, padding):
    before = k - 1 - lo
    pads.append((before, d * (size_x - 1) + k - size_y - before))
  # lax.pad crops for negative widths, which patches' padding would not.
  grad = lax.pad(grad, jnp.zeros((), grad.dtype),
                 [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
  patches = lax.conv_general_dilated_patches(
      grad, (kh, kw), lhs_dilation, 'VALID', dimension_numbers=_DIMENSIONS)
  # Patch features are ordered (o, u', v') with u' = kh - 1 - u.
  grad_kernel = jnp.einsum('bmnc,bmnp->cp', x, patches)
  grad_kernel = grad_kernel.reshape(channels, features, kh, kw)[:, :, ::-1, ::-1]
  return grad_kernel.transpose(2, 3, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_grad(x: jax.Array, kernel: jax.Array,
                     strides: tuple[int, int], padding: Padding,
                     lhs_dilation: tuple[int, int]) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) with a matmul kernel gradient.

  Either `strides` or `lhs_dilation` must be all ones: the first case is an
  ordinary (strided) convolution, the second a transposed one.

  Args:
    x: input `[B, H, W, C]`.
    kernel: `[kh, kw, C, O]`.
    strides: window strides.
    padding: explicit `((lo, hi), (lo, hi))`.
    lhs_dilation: input dilation (the stride of a transposed convolution).

  Returns:
    `[B, H', W', O]`, exactly `lax.conv_general_dilated`'s result.
  """
  return _forward(x, kernel, strides, padding, lhs_dilation)[0]


def _forward(x, kernel, strides, padding, lhs_dilation):
  if any(s != 1 for s in strides) and any(d != 1 for d in lhs_dilation):
    raise NotImplementedError(
        'conv_matmul_grad supports window strides or input dilation, not both.')
  return _conv(x, kernel, strides, padding, lhs_dilation), (x, kernel)


def _backward(strides, padding, lhs_dilation, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(
      lambda x: _conv(x, kernel, strides, padding, lhs_dilation), x)
  (grad_x,) = input_vjp(grad)
  if all(d == 1 for d in lhs_dilation):
    grad_kernel = _strided_conv_kernel_grad(x, grad, kernel.shape, strides,
                                            padding)
  else:
    grad_kernel = _dilated_conv_kernel_grad(x, grad, kernel.shape,
                                            lhs_dilation, padding)
  return grad_x, grad_kernel.astype(kernel.dtype)


conv_matmul_grad.defvjp(_forward, _backward)


def _pad(x, pads):
  """Zero-pads (or, for negative widths, crops) the spatial axes of NHWC."""
  return lax.pad(x, jnp.zeros((), x.dtype),
                 [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: Padding) -> jax.Array:
  """A strided convolution as patches (strided slices) times the kernel.

  Args:
    x: input `[B, H, W, C]`.
    kernel: `[kh, kw, C, O]`.
    strides: window strides.
    padding: explicit `((lo, hi), (lo, hi))`.

  Returns:
    `[B, H', W', O]`, `lax.conv_general_dilated`'s result to float32
    rounding.
  """
  batch, height, width, channels = x.shape
  kh, kw, _, features = kernel.shape
  (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)) = strides, padding
  out_h = (height + lo_h + hi_h - kh) // sh + 1
  out_w = (width + lo_w + hi_w - kw) // sw + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f'Convolution of {x.shape} with kernel {kernel.shape} '
                     f'and padding {padding} has an empty output.')
  padded = _pad(x, padding)
  columns = [lax.slice(padded, (0, u, v, 0),
                       (batch, u + sh * (out_h - 1) + 1,
                        v + sw * (out_w - 1) + 1, channels), (1, sh, sw, 1))
             for u in range(kh) for v in range(kw)]
  patches = jnp.concatenate(columns, axis=-1)  # Features ordered (u, v, c).
  return jnp.einsum('bijp,po->bijo', patches,
                    kernel.reshape(kh * kw * channels, features))


def _phase_geometry(size: int, kernel_size: int, stride: int,
                    padding: tuple[int, int]):
  """How each output phase of a transposed convolution reads its input.

  Output p = stride*i + r (phase r) of the transposed convolution is
  sum_u xpad[p + u] K[u] over the dilated, padded input, whose only non-zero
  entries are xpad[lo + stride*m] = x[m]. So phase r sees x[i + offset + t]
  through the taps u = u0 + stride*t with u0 = (lo - r) mod stride.

  Returns:
    `(out, blocks, pads, window, taps)`: the output size; the blocks of
    `stride` outputs; the (before, after) zero padding of x; the input window
    all phases of a block share; `taps[a, r]`, the kernel tap that window
    position a feeds into phase r, or -1.
  """
  lo, hi = padding
  out = stride * (size - 1) + 1 + lo + hi - kernel_size + 1
  blocks = -(-out // stride)
  phases = []
  for r in range(stride):
    u0 = (lo - r) % stride
    phases.append(((r + u0 - lo) // stride, range(u0, kernel_size, stride)))
  first = min(offset for offset, _ in phases)
  last = max(offset + len(taps) - 1 for offset, taps in phases)
  window = last - first + 1
  taps = np.full((window, stride), -1)
  for r, (offset, phase_taps) in enumerate(phases):
    for t, u in enumerate(phase_taps):
      taps[offset + t - first, r] = u
  return out, blocks, (-first, blocks - 1 + last - (size - 1)), window, taps


def conv_transpose_im2col(x: jax.Array, kernel: jax.Array,
                          strides: tuple[int, int],
                          padding: Padding) -> jax.Array:
  """A transposed convolution as one matmul over all stride phases.

  Computes `lax.conv_general_dilated(x, kernel, (1, 1), padding,
  lhs_dilation=strides)`, i.e. `flax.linen.ConvTranspose` with the kernel
  unflipped, without multiplying the dilated input's zeros: the kernel is
  rearranged into a `[window_h * window_w * C, sh * sw * O]` matrix (zeros
  where a phase has fewer taps), applied to patches of the undilated input,
  and the phases are interleaved into the output.

  Args:
    x: input `[B, H, W, C]`.
    kernel: `[kh, kw, C, O]`.
    strides: upsampling factors.
    padding: explicit `((lo, hi), (lo, hi))` of the dilated input.

  Returns:
    `[B, H', W', O]`, with `H' = sh * (H - 1) + 1 + lo + hi - kh + 1`.
  """
  batch, height, width, channels = x.shape
  kh, kw, _, features = kernel.shape
  sh, sw = strides
  out_h, blocks_h, pads_h, window_h, taps_h = _phase_geometry(
      height, kh, sh, padding[0])
  out_w, blocks_w, pads_w, window_w, taps_w = _phase_geometry(
      width, kw, sw, padding[1])
  if out_h < 1 or out_w < 1:
    raise ValueError(f'Transposed convolution of {x.shape} with kernel '
                     f'{kernel.shape} and padding {padding} has an empty '
                     f'output.')
  padded = _pad(x, (pads_h, pads_w))
  columns = [padded[:, a:a + blocks_h, b:b + blocks_w, :]
             for a in range(window_h) for b in range(window_w)]
  patches = jnp.concatenate(columns, axis=-1)  # Features ordered (a, b, c).
  # Tap index kh (or kw) selects an appended zero row (or column).
  padded_kernel = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  rows = np.where(taps_h < 0, kh, taps_h)[:, None, :, None]
  cols = np.where(taps_w < 0, kw, taps_w)[None, :, None, :]
  matrix = padded_kernel[rows, cols]  # [window_h, window_w, sh, sw, C, O]
  matrix = matrix.transpose(0, 1, 4, 2, 3, 5).reshape(
      window_h * window_w * channels, sh * sw * features)
  y = jnp.einsum('bijp,pq->bijq', patches, matrix)
  y = y.reshape(batch, blocks_h, blocks_w, sh, sw, features)
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, blocks_h * sh, blocks_w * sw, features)
  return y[:, :out_h, :out_w, :]


IMPLEMENTATIONS = ('matmul_grad', 'im2col')


def _same_or_valid(padding: str | Sequence[tuple[int, int]]) -> str | None:
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, "
                       f'got {padding!r}.')
    return padding.upper()
  return None


def transpose_padding(kernel_size: int, stride: int, padding: str
                      ) -> tuple[int, int]:
  """The (lo, hi) padding `lax.conv_transpose` uses for 'SAME' or 'VALID'."""
  if padding == 'SAME':
    total = kernel_size + stride - 2
    lo = kernel_size - 1 if stride > kernel_size - 1 else -(-total // 2)
  else:
    total = kernel_size + stride - 2 + max(kernel_size - stride, 0)
    lo = kernel_size - 1
  return lo, total - lo


class _Convolution(nn.Module):
  """Parameters and call shared by `Conv` and `ConvTranspose`."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  implementation: str = 'matmul_grad'

  def _named_geometry(self, spatial_shape, kernel_size, strides, mode):
    """`(window_strides, padding, lhs_dilation)` for 'SAME' or 'VALID'."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = tuple(self.kernel_size)
    strides = tuple(self.strides)
    kernel = self.param('kernel', self.kernel_init,
                        (*kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    mode = _same_or_valid(self.padding)
    window_strides, padding, lhs_dilation = self._named_geometry(
        x.shape[1:3], kernel_size, strides, mode or 'VALID')
    if mode is None:
      padding = tuple(tuple(pair) for pair in self.padding)
    if self.implementation == 'matmul_grad':
      y = conv_matmul_grad(x, kernel, window_strides, padding, lhs_dilation)
    elif self.implementation != 'im2col':
      raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, '
                       f'got {self.implementation!r}.')
    elif any(d != 1 for d in lhs_dilation):
      y = conv_transpose_im2col(x, kernel, lhs_dilation, padding)
    else:
      y = conv_im2col(x, kernel, window_strides, padding)
    return y if bias is None else y + bias


class Conv(_Convolution):
  """2-D convolution, NHWC, like `flax.linen.Conv` (same parameters).

  Called on `[B, H, W, C]`, returns `[B, H', W', features]`.

  Attributes:
    features: output channels.
    kernel_size: `(kh, kw)`.
    strides: window strides.
    padding: 'SAME', 'VALID' or `((lo, hi), (lo, hi))`.
    use_bias: add a bias.
    dtype: computation dtype (None: from the inputs and parameters).
    param_dtype: parameter dtype.
    kernel_init: kernel initialiser (Flax's default).
    bias_init: bias initialiser.
    implementation: 'matmul_grad' (XLA convolution, kernel gradient from
      patches and one matmul) or 'im2col' (the whole layer as patches and
      matmuls; faster on XLA:CPU when there are many output channels).
  """

  def _named_geometry(self, spatial_shape, kernel_size, strides, mode):
    padding = tuple(lax.padtype_to_pads(spatial_shape, kernel_size, strides,
                                        mode))
    return strides, padding, (1, 1)


class ConvTranspose(_Convolution):
  """Transposed 2-D convolution, like `flax.linen.ConvTranspose`.

  Same parameters and numerics as Flax's layer with `transpose_kernel=False`
  (its default): the kernel `[kh, kw, C, F]` is applied, unflipped, to the
  input dilated by `strides`. Called on `[B, H, W, C]`, returns
  `[B, H*s, W*s, features]` with 'SAME' padding.

  Attributes:
    features: output channels.
    kernel_size: `(kh, kw)`.
    strides: upsampling factors.
    padding: 'SAME', 'VALID' or explicit `((lo, hi), (lo, hi))`.
    use_bias: add a bias.
    dtype: computation dtype (None: from the inputs and parameters).
    param_dtype: parameter dtype.
    kernel_init: kernel initialiser (Flax's default).
    bias_init: bias initialiser.
    implementation: 'matmul_grad' (XLA convolution, kernel gradient from
      patches and one matmul) or 'im2col' (the whole layer as patches and
      matmuls; faster on XLA:CPU when there are many output channels).
  """

  def _named_geometry(self, spatial_shape, kernel_size, strides, mode):
    del spatial_shape  # The padding of a transposed conv needs no input size.
    padding = tuple(transpose_padding(k, s, mode)
                    for k, s in zip(kernel_size, strides))
    return (1, 1), padding, strides
