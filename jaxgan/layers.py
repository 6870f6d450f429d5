"""Convolutions whose kernel gradient is one matrix product.

XLA:CPU lowers the kernel gradient of a strided convolution, and still more of
a transposed convolution, to a slow generic loop: at batch 64 the gradient of
the generator's 7x7x128 -> 14x14x64 ConvTranspose took about 300 ms, against
about 35 ms in PyTorch, and inside `lax.scan` the discriminator's convolution
gradients slowed down by up to 14x. Here the forward pass and the input
gradient stay XLA convolutions, and the kernel gradient is computed from
image patches (`lax.conv_general_dilated_patches`) and a single matmul, which
every backend runs well.

`Conv` and `ConvTranspose` are drop-in replacements for the Flax layers of the
same names: same parameter names, shapes, initialisers and numerics, so
checkpoints are interchangeable.
"""

import functools
from typing import Any, Sequence

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
    y = conv_matmul_grad(x, kernel, window_strides, padding, lhs_dilation)
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
  """

  def _named_geometry(self, spatial_shape, kernel_size, strides, mode):
    del spatial_shape  # The padding of a transposed conv needs no input size.
    padding = tuple(transpose_padding(k, s, mode)
                    for k, s in zip(kernel_size, strides))
    return (1, 1), padding, strides
