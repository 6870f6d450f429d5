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

`conv_winograd` and `conv_transpose_winograd` compute the same stride-phase
correlations by Winograd's minimal filtering algorithm F(4, 3): for 5x5
stride-2 layers, 36% of the direct convolution's multiplications (a quarter
of the transposed im2col's, which also multiplies its phase matrix's zeros),
at about 7x the rounding error of a direct sum (a few 1e-6 of the largest
output). Fewer products do not make a faster step on XLA:CPU: the
transforms move as much memory as the products save (benchmarks/RESULTS.md).

`Conv` and `ConvTranspose` are drop-in replacements for the Flax layers of the
same names: same parameter names, shapes, initialisers and numerics, so
checkpoints are interchangeable.
"""

import functools
from fractions import Fraction
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


def _conv_output_shape(x_shape, kernel_shape, strides, padding
                       ) -> tuple[int, int]:
  """`(H', W')` of a strided convolution; refuses an empty output."""
  sizes = [(size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(
      x_shape[1:3], kernel_shape[:2], strides, padding)]
  if min(sizes) < 1:
    raise ValueError(f'Convolution of {tuple(x_shape)} with kernel '
                     f'{tuple(kernel_shape)} and padding {padding} has an '
                     f'empty output.')
  return sizes[0], sizes[1]


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
  sh, sw = strides
  out_h, out_w = _conv_output_shape(x.shape, kernel.shape, strides, padding)
  padded = _pad(x, padding)
  columns = [lax.slice(padded, (0, u, v, 0),
                       (batch, u + sh * (out_h - 1) + 1,
                        v + sw * (out_w - 1) + 1, channels), (1, sh, sw, 1))
             for u in range(kh) for v in range(kw)]
  patches = jnp.concatenate(columns, axis=-1)  # Features ordered (u, v, c).
  return jnp.einsum('bijp,po->bijo', patches,
                    kernel.reshape(kh * kw * channels, features))


# Interpolation points of the Cook-Toom (Winograd) algorithms, in order of
# use. For F(4, 3) the first five gave the smallest float32 error of the sets
# tried on the discriminator's 64 -> 128-channel layer (0, 1, -1, 1/2, -2:
# 4.2e-5 at outputs up to 9.7; 0, 1, -1, 2, -2: 6.9e-5).
_WINOGRAD_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(1, 2),
                    Fraction(-2), Fraction(2), Fraction(-1, 2))
WINOGRAD_TILE = 4


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
  """The exact inverse of a square matrix of Fractions (Gauss-Jordan)."""
  size = len(matrix)
  rows = [list(row) + [Fraction(int(i == j)) for j in range(size)]
          for i, row in enumerate(matrix)]
  for col in range(size):
    pivot = next(i for i in range(col, size) if rows[i][col] != 0)
    rows[col], rows[pivot] = rows[pivot], rows[col]
    rows[col] = [value / rows[col][col] for value in rows[col]]
    for i in range(size):
      if i != col and rows[i][col] != 0:
        factor = rows[i][col]
        rows[i] = [a - factor * b for a, b in zip(rows[i], rows[col])]
  return [row[size:] for row in rows]


@functools.cache
def winograd_matrices(tile: int, taps: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The transforms of the 1-D Winograd correlation F(tile, taps).

  With `alpha = tile + taps - 1` inputs `d` and kernel `g`, the correlation
  `y[i] = sum_k d[i + k] g[k]`, `i < tile`, is `A^T [(G g) * (B^T d)]`: a
  product of polynomials evaluated at `alpha - 1` points and infinity, read
  backwards. `tile * taps` products become `alpha`.

  Args:
    tile: outputs per tile.
    taps: kernel size.

  Returns:
    float64 `A^T [tile, alpha]`, `G [alpha, taps]`, `B^T [alpha, alpha]`.
  """
  alpha = tile + taps - 1
  if alpha - 1 > len(_WINOGRAD_POINTS):
    raise ValueError(f'F({tile}, {taps}) needs {alpha - 1} interpolation '
                     f'points; at most {len(_WINOGRAD_POINTS)} are defined.')
  points = _WINOGRAD_POINTS[:alpha - 1]

  def vandermonde(columns):
    # The last row, the point at infinity, takes the leading coefficient.
    return ([[point ** i for i in range(columns)] for point in points]
            + [[Fraction(int(i == columns - 1)) for i in range(columns)]])

  transform_in = np.array(_inverse(vandermonde(alpha)), dtype=float).T
  transform_out = np.array(vandermonde(tile), dtype=float).T
  transform_kernel = np.array(vandermonde(taps), dtype=float)
  return transform_out, transform_kernel, transform_in


def _tiles(x, tile_h, tile_w, alpha_h, alpha_w, tiles_h, tiles_w):
  """Overlapping `[alpha_h, alpha_w]` windows of x at strides of one tile.

  Returns:
    `[alpha_h, alpha_w, B, tiles_h, tiles_w, C]`.
  """
  rows = jnp.stack([x[:, i * tile_h:i * tile_h + alpha_h]
                    for i in range(tiles_h)], axis=1)
  windows = jnp.stack([rows[:, :, :, j * tile_w:j * tile_w + alpha_w]
                       for j in range(tiles_w)], axis=3)
  return windows.transpose(2, 4, 0, 1, 3, 5)


def _winograd_correlate(x: jax.Array, kernel: jax.Array, tile: int
                        ) -> jax.Array:
  """VALID stride-1 correlation of an already padded x, by F(tile, taps).

  Args:
    x: `[B, H, W, C]`.
    kernel: `[rh, rw, C, O]`.
    tile: outputs per tile and axis.

  Returns:
    `[B, H - rh + 1, W - rw + 1, O]` in x's dtype, computed in at least
    float32.
  """
  batch, height, width, channels = x.shape
  taps_h, taps_w, _, features = kernel.shape
  out_h, out_w = height - taps_h + 1, width - taps_w + 1
  tile_h, tile_w = min(tile, out_h), min(tile, out_w)
  tiles_h, tiles_w = -(-out_h // tile_h), -(-out_w // tile_w)
  alpha_h, alpha_w = tile_h + taps_h - 1, tile_w + taps_w - 1
  out_h_t, kernel_h_t, in_h_t = winograd_matrices(tile_h, taps_h)
  out_w_t, kernel_w_t, in_w_t = winograd_matrices(tile_w, taps_w)
  # The transforms' rounding is amplified in the products; bfloat16 would
  # lose most of its 8 bits, so narrower inputs are computed in float32.
  out_dtype = x.dtype
  dtype = jnp.promote_types(out_dtype, jnp.float32)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  x = _pad(x, ((0, tiles_h * tile_h + taps_h - 1 - height),
               (0, tiles_w * tile_w + taps_w - 1 - width)))
  windows = _tiles(x, tile_h, tile_w, alpha_h, alpha_w, tiles_h, tiles_w)
  count = batch * tiles_h * tiles_w
  # One matrix product applies the 2-D transform B^T d B to every window.
  transformed = (jnp.asarray(np.kron(in_h_t, in_w_t), dtype)
                 @ windows.reshape(alpha_h * alpha_w, count * channels))
  transformed = transformed.reshape(alpha_h * alpha_w, count, channels)
  transformed_kernel = jnp.einsum(
      'xa,yb,abco->xyco', jnp.asarray(kernel_h_t, dtype),
      jnp.asarray(kernel_w_t, dtype), kernel).reshape(
          alpha_h * alpha_w, channels, features)
  products = jnp.einsum('xnc,xco->xno', transformed, transformed_kernel)
  y = (jnp.asarray(np.kron(out_h_t, out_w_t), dtype)
       @ products.reshape(alpha_h * alpha_w, count * features))
  y = y.reshape(tile_h, tile_w, batch, tiles_h, tiles_w, features)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(
      batch, tiles_h * tile_h, tiles_w * tile_w, features)
  return y[:, :out_h, :out_w].astype(out_dtype)


def conv_winograd(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  padding: Padding, tile: int = WINOGRAD_TILE) -> jax.Array:
  """A strided convolution by Winograd's minimal filtering algorithm.

  The stride phases of the padded input become channels (space to depth)
  and the kernel is cut into one sub-kernel per phase, so a stride-s
  convolution with a k-tap kernel is a stride-1 one with ceil(k / s) taps and
  s*s times the channels; that is computed by F(tile, taps) in both axes:
  `(tile + taps - 1)^2` batched matrix products per tile instead of
  `(tile * taps)^2` multiplications per channel pair. For a 5x5 stride-2
  layer and tile 4 that is 36 x 4 against the direct 16 x 25 per input and
  output channel. Its gradients are matrix products too.

  Args:
    x: input `[B, H, W, C]`.
    kernel: `[kh, kw, C, O]`.
    strides: window strides.
    padding: explicit `((lo, hi), (lo, hi))`.
    tile: outputs per tile and axis; larger tiles save more products and
      round more (about 7x the direct convolution's error at 4).

  Returns:
    `[B, H', W', O]`, `lax.conv_general_dilated`'s result to float32
    rounding.
  """
  batch, height, width, channels = x.shape
  kh, kw, _, features = kernel.shape
  sh, sw = strides
  out_h, out_w = _conv_output_shape(x.shape, kernel.shape, strides, padding)
  taps_h, taps_w = -(-kh // sh), -(-kw // sw)
  # The rows and columns the output reads, in whole stride phases.
  rows, cols = (out_h + taps_h - 1) * sh, (out_w + taps_w - 1) * sw
  (lo_h, _), (lo_w, _) = padding
  padded = _pad(x, ((lo_h, rows - height - lo_h), (lo_w, cols - width - lo_w)))
  phases = padded.reshape(batch, rows // sh, sh, cols // sw, sw, channels)
  phases = phases.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, rows // sh, cols // sw, sh * sw * channels)
  sub_kernels = jnp.pad(kernel, ((0, taps_h * sh - kh), (0, taps_w * sw - kw),
                                 (0, 0), (0, 0)))
  sub_kernels = sub_kernels.reshape(taps_h, sh, taps_w, sw, channels,
                                    features)
  sub_kernels = sub_kernels.transpose(0, 2, 1, 3, 4, 5).reshape(
      taps_h, taps_w, sh * sw * channels, features)
  return _winograd_correlate(phases, sub_kernels, tile)


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


def _transpose_phases(x, kernel, strides, padding):
  """The stride phases of a transposed convolution as one correlation.

  Returns:
    `(padded, matrix, finish)`: the padded undilated input; the phase kernel
    `[window_h, window_w, C, sh * sw * O]` (zeros where a phase has fewer
    taps), whose VALID correlation with `padded` gives every phase of every
    block of outputs; and `finish`, which interleaves those phases into the
    output.
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
  # Tap index kh (or kw) selects an appended zero row (or column).
  padded_kernel = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  rows = np.where(taps_h < 0, kh, taps_h)[:, None, :, None]
  cols = np.where(taps_w < 0, kw, taps_w)[None, :, None, :]
  matrix = padded_kernel[rows, cols]  # [window_h, window_w, sh, sw, C, O]
  matrix = matrix.transpose(0, 1, 4, 2, 3, 5).reshape(
      window_h, window_w, channels, sh * sw * features)

  def finish(y):
    y = y.reshape(batch, blocks_h, blocks_w, sh, sw, features)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, blocks_h * sh, blocks_w * sw, features)
    return y[:, :out_h, :out_w, :]

  return _pad(x, (pads_h, pads_w)), matrix, finish


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
  padded, matrix, finish = _transpose_phases(x, kernel, strides, padding)
  window_h, window_w, channels, phase_features = matrix.shape
  blocks_h = padded.shape[1] - window_h + 1
  blocks_w = padded.shape[2] - window_w + 1
  columns = [padded[:, a:a + blocks_h, b:b + blocks_w, :]
             for a in range(window_h) for b in range(window_w)]
  patches = jnp.concatenate(columns, axis=-1)  # Features ordered (a, b, c).
  return finish(jnp.einsum(
      'bijp,pq->bijq', patches,
      matrix.reshape(window_h * window_w * channels, phase_features)))


def conv_transpose_winograd(x: jax.Array, kernel: jax.Array,
                            strides: tuple[int, int], padding: Padding,
                            tile: int = WINOGRAD_TILE) -> jax.Array:
  """A transposed convolution by Winograd's algorithm over its stride phases.

  The same phase kernel as `conv_transpose_im2col` (for the generator's 5x5
  stride-2 layers, a 3x3 window of the undilated input feeding 4 phases),
  correlated with the input by F(tile, window) instead of one matmul: with
  tile 4 and a 3x3 window, 36 multiplications per 4x4 block of positions
  and entry of the phase matrix, against im2col's 144.

  Args:
    x: input `[B, H, W, C]`.
    kernel: `[kh, kw, C, O]`.
    strides: upsampling factors.
    padding: explicit `((lo, hi), (lo, hi))` of the dilated input.
    tile: outputs per tile and axis (see `conv_winograd`).

  Returns:
    `[B, H', W', O]`, `conv_transpose_im2col`'s result to float32 rounding.
  """
  padded, matrix, finish = _transpose_phases(x, kernel, strides, padding)
  return finish(_winograd_correlate(padded, matrix, tile))


IMPLEMENTATIONS = ('matmul_grad', 'im2col', 'winograd')


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
    transposed = any(d != 1 for d in lhs_dilation)
    if self.implementation == 'matmul_grad':
      y = conv_matmul_grad(x, kernel, window_strides, padding, lhs_dilation)
    elif self.implementation == 'im2col':
      y = (conv_transpose_im2col(x, kernel, lhs_dilation, padding)
           if transposed else conv_im2col(x, kernel, window_strides, padding))
    elif self.implementation == 'winograd':
      y = (conv_transpose_winograd(x, kernel, lhs_dilation, padding)
           if transposed else conv_winograd(x, kernel, window_strides,
                                            padding))
    else:
      raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, '
                       f'got {self.implementation!r}.')
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
      patches and one matmul), 'im2col' (the whole layer as patches and
      matmuls; faster on XLA:CPU when there are many output channels) or
      'winograd' (Winograd's algorithm over the stride phases: fewer
      products for 3x3 and stride-2 5x5 kernels, a little more rounding).
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
      patches and one matmul), 'im2col' (the whole layer as patches and
      matmuls; faster on XLA:CPU when there are many output channels) or
      'winograd' (Winograd's algorithm over the stride phases: fewer
      products for 3x3 and stride-2 5x5 kernels, a little more rounding).
  """

  def _named_geometry(self, spatial_shape, kernel_size, strides, mode):
    del spatial_shape  # The padding of a transposed conv needs no input size.
    padding = tuple(transpose_padding(k, s, mode)
                    for k, s in zip(kernel_size, strides))
    return (1, 1), padding, strides
