"""jaxgan.layers against flax.linen: same parameters, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgan import layers

CASES = [
    # kernel, stride, padding, input shape, features
    (5, 2, 'SAME', (4, 7, 7, 8), 6),      # the generator's first layer, small
    (5, 2, 'SAME', (3, 14, 14, 4), 1),    # the generator's last layer, small
    (3, 1, 'SAME', (2, 9, 9, 3), 5),
    (4, 2, 'VALID', (2, 9, 8, 3), 5),
    (3, 3, 'SAME', (2, 10, 10, 2), 4),
    (2, 2, 'SAME', (2, 5, 5, 3), 4),
    (5, 2, ((1, 3), (2, 2)), (2, 7, 6, 3), 4),
    (1, 2, 'VALID', (2, 6, 6, 3), 2),
]


def _compare(reference, candidate, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  params = reference.init(jax.random.key(1), x)
  # Same names, shapes and initial values: checkpoints are interchangeable.
  candidate_params = candidate.init(jax.random.key(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(candidate_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(candidate_params)):
    np.testing.assert_array_equal(a, b)

  out = reference.apply(params, x)
  cotangent = jax.random.normal(jax.random.key(2), out.shape)

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * cotangent),
                    argnums=(0, 1))(params, x)

  np.testing.assert_allclose(candidate.apply(params, x), out, rtol=1e-5,
                             atol=1e-5)
  (ref_params, ref_x), (got_params, got_x) = grads(reference), grads(candidate)
  np.testing.assert_allclose(got_x, ref_x, rtol=1e-5, atol=1e-5)
  for name in ('kernel', 'bias'):
    want = ref_params['params'][name]
    got = got_params['params'][name]
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=2e-6)


IMPLEMENTATIONS = pytest.mark.parametrize('implementation',
                                          layers.IMPLEMENTATIONS)


@IMPLEMENTATIONS
@pytest.mark.parametrize('kernel, stride, padding, shape, features', CASES)
def test_conv_transpose_matches_flax(kernel, stride, padding, shape, features,
                                     implementation):
  _compare(nn.ConvTranspose(features, (kernel, kernel), (stride, stride),
                            padding=padding),
           layers.ConvTranspose(features, (kernel, kernel), (stride, stride),
                                padding=padding,
                                implementation=implementation), shape)


@IMPLEMENTATIONS
@pytest.mark.parametrize('kernel, stride, padding, shape, features', CASES)
def test_conv_matches_flax(kernel, stride, padding, shape, features,
                           implementation):
  _compare(nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=padding),
           layers.Conv(features, (kernel, kernel), (stride, stride),
                       padding=padding, implementation=implementation), shape)


@IMPLEMENTATIONS
def test_non_square_kernels_and_strides(implementation):
  _compare(nn.ConvTranspose(3, (3, 5), (1, 2), padding='SAME'),
           layers.ConvTranspose(3, (3, 5), (1, 2), padding='SAME',
                                implementation=implementation),
           (2, 6, 5, 2))
  _compare(nn.Conv(3, (5, 3), (2, 1), padding='SAME'),
           layers.Conv(3, (5, 3), (2, 1), padding='SAME',
                       implementation=implementation), (2, 9, 7, 2))


@pytest.mark.parametrize('stride, padding', [
    (2, ((3, 2), (3, 2))), (2, ((0, 3), (2, 1))), (3, ((2, 2), (1, 0))),
    (2, ((4, 4), (4, 4))), (2, ((-1, 1), (5, -2))), (1, ((1, 1), (0, 2)))])
@pytest.mark.parametrize('transposed_conv', [layers.conv_transpose_im2col,
                                             layers.conv_transpose_winograd])
def test_transposed_phases_match_lax_for_explicit_paddings(stride, padding,
                                                           transposed_conv):
  """Every phase layout, including negative (cropping) and wide paddings."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
  kernel = jax.random.normal(jax.random.key(1), (4, 3, 3, 2))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, lhs_dilation=(stride, stride),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def candidate(x, kernel):
    return transposed_conv(x, kernel, (stride, stride), padding)

  want = reference(x, kernel)
  np.testing.assert_allclose(candidate(x, kernel), want, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(2), want.shape)
  for fn_grads in zip(*(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * cotangent),
                                 argnums=(0, 1))(x, kernel)
                        for f in (candidate, reference))):
    np.testing.assert_allclose(*fn_grads, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('tile, taps', [(2, 3), (4, 3), (4, 2), (3, 1),
                                        (1, 3), (2, 5)])
def test_winograd_transforms_compute_the_correlation(tile, taps):
  """A^T [(G g) * (B^T d)] is the correlation of d and g, in float64."""
  transform_out, transform_kernel, transform_in = layers.winograd_matrices(
      tile, taps)
  alpha = tile + taps - 1
  assert transform_out.shape == (tile, alpha)
  assert transform_kernel.shape == (alpha, taps)
  assert transform_in.shape == (alpha, alpha)
  rng = np.random.default_rng(tile * 10 + taps)
  d, g = rng.normal(size=alpha), rng.normal(size=taps)
  want = [sum(d[i + k] * g[k] for k in range(taps)) for i in range(tile)]
  got = transform_out @ ((transform_kernel @ g) * (transform_in @ d))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_winograd_refuses_tiles_beyond_its_points():
  with pytest.raises(ValueError, match='interpolation points'):
    layers.winograd_matrices(8, 3)


@pytest.mark.parametrize('transposed, x_shape, kernel_shape', [
    (True, (4, 7, 7, 128), (5, 5, 128, 64)),
    (False, (4, 14, 14, 64), (5, 5, 64, 128))])
def test_winograd_at_the_dcgan_shapes(transposed, x_shape, kernel_shape):
  """Full channel counts: the rounding of F(4, 3) stays at float32 level."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape) / np.sqrt(
      25 * kernel_shape[2])
  dimensions = ('NHWC', 'HWIO', 'NHWC')
  if transposed:
    padding = (layers.transpose_padding(5, 2, 'SAME'),) * 2

    def reference(x, kernel):
      return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                          lhs_dilation=(2, 2),
                                          dimension_numbers=dimensions)

    def candidate(x, kernel):
      return layers.conv_transpose_winograd(x, kernel, (2, 2), padding)
  else:
    padding = tuple(jax.lax.padtype_to_pads((14, 14), (5, 5), (2, 2),
                                            'SAME'))

    def reference(x, kernel):
      return jax.lax.conv_general_dilated(x, kernel, (2, 2), padding,
                                          dimension_numbers=dimensions)

    def candidate(x, kernel):
      return layers.conv_winograd(x, kernel, (2, 2), padding)

  want, reference_vjp = jax.vjp(reference, x, kernel)
  got, candidate_vjp = jax.vjp(candidate, x, kernel)
  cotangent = jax.random.normal(jax.random.key(2), want.shape)
  for a, b in zip((got, *candidate_vjp(cotangent)),
                  (want, *reference_vjp(cotangent))):
    assert a.shape == b.shape
    # Measured: up to 4.5e-6 of the largest value (XLA's float32
    # convolution: 5e-7 from the float64 result, F(4, 3): 4e-6).
    np.testing.assert_allclose(a, b, rtol=0,
                               atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize('conv', [layers.conv_im2col, layers.conv_winograd])
def test_an_empty_convolution_output_is_named(conv):
  with pytest.raises(ValueError, match='empty output'):
    conv(jnp.ones((1, 3, 3, 2)), jnp.ones((5, 5, 2, 4)), (1, 1),
         ((0, 0), (0, 0)))


@pytest.mark.parametrize('conv', [layers.conv_transpose_im2col,
                                  layers.conv_transpose_winograd])
def test_an_empty_transposed_convolution_output_is_named(conv):
  with pytest.raises(ValueError, match='empty output'):
    conv(jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 2, 4)), (2, 2),
         ((-3, -3), (0, 0)))


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match='implementation must be one of'):
    layers.Conv(2, (3, 3), implementation='fft').init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize('make', [
    lambda cls: cls(3, (3, 3), (2, 2)),
])
@pytest.mark.parametrize('pair', [(nn.Conv, layers.Conv),
                                  (nn.ConvTranspose, layers.ConvTranspose)])
@IMPLEMENTATIONS
def test_gradient_penalty_style_second_order_gradients(make, pair,
                                                        implementation):
  """Penalties like R1 differentiate an input gradient w.r.t. the parameters."""
  reference = make(pair[0])
  candidate = make(pair[1]).clone(implementation=implementation)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  params = reference.init(jax.random.key(1), x)

  def penalty_grad(module):
    def penalty(p):
      grad_x = jax.grad(lambda x: jnp.sum(jnp.tanh(module.apply(p, x))))(x)
      return jnp.sum(grad_x ** 2)
    return jax.grad(penalty)(params)['params']['kernel']

  want = penalty_grad(reference)
  np.testing.assert_allclose(penalty_grad(candidate), want, rtol=1e-4,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))


@IMPLEMENTATIONS
def test_bfloat16_inputs(implementation):
  layer = layers.ConvTranspose(4, (5, 5), (2, 2), dtype=jnp.bfloat16,
                               implementation=implementation)
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  params = layer.init(jax.random.key(1), x)
  grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x).astype(jnp.float32)))(
      params)
  assert grads['params']['kernel'].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(grads['params']['kernel'])))
  reference = jax.grad(lambda p: jnp.sum(layers.ConvTranspose(
      4, (5, 5), (2, 2)).apply(p, x)))(params)
  np.testing.assert_allclose(grads['params']['kernel'],
                             reference['params']['kernel'], rtol=0.05,
                             atol=0.5)


def test_invalid_padding_is_named():
  with pytest.raises(ValueError, match='padding'):
    layers.Conv(2, (3, 3), padding='FULL').init(jax.random.key(0),
                                                jnp.ones((1, 4, 4, 1)))
