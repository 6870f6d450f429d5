"""Generator and Discriminator: shapes, ranges, dtypes and BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgan


def _init(module, x):
  return module.init(jax.random.key(0), x, train=False)


def test_generator_shape_range_and_dtype():
  generator = jaxgan.Generator()
  z = jaxgan.sample_noise(jax.random.key(1), 16, 100)
  variables = _init(generator, z)
  images = generator.apply(variables, z)
  assert images.shape == (16, 28, 28, 1)
  assert images.dtype == jnp.float32
  assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
  # Different noise gives different images.
  assert float(jnp.abs(images[0] - images[1]).max()) > 1e-4


def test_noise_is_uniform_in_unit_box():
  z = jaxgan.sample_noise(jax.random.key(0), 4096, 100)
  assert z.shape == (4096, 100)
  assert float(z.min()) >= -1.0 and float(z.max()) <= 1.0
  np.testing.assert_allclose(float(z.mean()), 0.0, atol=0.01)
  np.testing.assert_allclose(float(z.var()), 1.0 / 3.0, rtol=0.02)


@pytest.mark.parametrize('fields', [
    dict(noise_dim=16, hidden_dim=32, base_channels=8, conv_channels=4),
    dict(batch_norm=False),
])
def test_generator_fields_change_the_model(fields):
  generator = jaxgan.Generator(**fields)
  z = jnp.zeros((2, generator.noise_dim))
  variables = _init(generator, z)
  assert generator.apply(variables, z).shape == (2, 28, 28, 1)
  if not generator.batch_norm:
    assert 'batch_stats' not in variables
  kernel = variables['params']['Dense_0']['kernel']
  assert kernel.shape == (generator.noise_dim, generator.hidden_dim)


def test_generator_rejects_wrong_noise_shape():
  generator = jaxgan.Generator()
  variables = _init(generator, jnp.zeros((1, 100)))
  with pytest.raises(ValueError, match=r'\[B, 100\]'):
    generator.apply(variables, jnp.zeros((1, 99)))


def test_discriminator_gives_one_logit_per_image():
  discriminator = jaxgan.Discriminator(channels_1=8, channels_2=16)
  images = jax.random.uniform(jax.random.key(0), (5, 28, 28, 1), minval=-1)
  variables = _init(discriminator, images)
  logits = discriminator.apply(variables, images)
  assert logits.shape == (5,) and logits.dtype == jnp.float32
  assert variables['params']['Conv_0']['kernel'].shape == (5, 5, 1, 8)
  with pytest.raises(ValueError, match='channel axis'):
    discriminator.apply(variables, images[..., 0])


def test_bfloat16_computation_keeps_float32_params_and_outputs():
  generator = jaxgan.Generator(dtype=jnp.bfloat16)
  z = jnp.ones((2, 100)) * 0.5
  variables = _init(generator, z)
  assert variables['params']['Dense_0']['kernel'].dtype == jnp.float32
  images = generator.apply(variables, z)
  assert images.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(images)))
  reference = jaxgan.Generator().apply(variables, z)
  np.testing.assert_allclose(images, reference, atol=0.1)


def test_discriminator_batchnorm_train_and_eval_modes():
  discriminator = jaxgan.Discriminator()
  images = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1), minval=-1)
  variables = _init(discriminator, images)
  stats = variables['batch_stats']

  # Training mode updates the running averages...
  logits_train, updates = discriminator.apply(
      variables, images, train=True, mutable=['batch_stats'])
  assert not jnp.array_equal(updates['batch_stats']['BatchNorm_0']['mean'],
                             stats['BatchNorm_0']['mean'])
  # ...and normalises with the batch's own statistics, so an image's logit
  # depends on the rest of the batch.
  other, _ = discriminator.apply(
      variables, jnp.concatenate([images[:4], -images[4:]]), train=True,
      mutable=['batch_stats'])
  assert float(jnp.abs(other[:4] - logits_train[:4]).max()) > 1e-5

  # Evaluation mode uses the running averages: per-image, batch-independent.
  eval_full = discriminator.apply(variables, images, train=False)
  eval_half = discriminator.apply(variables, images[:4], train=False)
  np.testing.assert_allclose(eval_full[:4], eval_half, rtol=1e-5, atol=1e-6)
  assert not np.allclose(eval_full, logits_train)


def test_auto_picks_per_layer_and_backend():
  pick = jaxgan.models.auto_kernel_grad
  # The DCGAN's layers: (transposed, output channels).
  layers = [(True, 64), (True, 1), (False, 64), (False, 128)]
  assert [pick(*l, backend='cpu') for l in layers] == [
      'im2col', 'matmul', 'im2col', 'im2col']
  assert [pick(*l, backend='gpu') for l in layers] == [
      'im2col', 'im2col', 'im2col', 'xla']
  assert [pick(*l, backend='tpu') for l in layers] == ['xla'] * 4
  assert pick(True, 64) == pick(True, 64, backend=jax.default_backend())


def test_config_passes_the_implementation_to_both_models():
  config = jaxgan.DCGANConfig(conv_kernel_grad='xla')
  assert config.generator().conv_kernel_grad == 'xla'
  assert config.discriminator().conv_kernel_grad == 'xla'
  assert jaxgan.DCGANConfig().generator().conv_kernel_grad == 'auto'


@pytest.mark.parametrize('choice', ['matmul', 'im2col', 'winograd', 'auto'])
def test_kernel_gradient_implementations_agree(choice):
  """jaxgan's and XLA's convolutions: same parameters, outputs, gradients."""
  z = jaxgan.sample_noise(jax.random.key(0), 4, 100)
  images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1)
  for make, x in ((jaxgan.Generator, z), (jaxgan.Discriminator, images)):
    fast, plain = make(conv_kernel_grad=choice), make(conv_kernel_grad='xla')
    variables = _init(fast, x)
    for a, b in zip(jax.tree.leaves(variables),
                    jax.tree.leaves(_init(plain, x))):
      np.testing.assert_array_equal(a, b)

    def grads(module):
      # One program each: op by op, the im2col layers are many small calls.
      return jax.jit(jax.grad(lambda p: jnp.sum(module.apply(
          {**variables, 'params': p}, x, train=True,
          mutable=['batch_stats'])[0] ** 2)))(variables['params'])

    np.testing.assert_allclose(jax.jit(fast.apply)(variables, x),
                               jax.jit(plain.apply)(variables, x), atol=1e-5)
    want = jax.tree.leaves(grads(plain))
    # Biases right before a BatchNorm have a zero gradient up to rounding,
    # so rounding is judged against the largest gradient of the model.
    scale = max(float(jnp.max(jnp.abs(b))) for b in want)
    for a, b in zip(jax.tree.leaves(grads(fast)), want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  with pytest.raises(ValueError, match='conv_kernel_grad'):
    _init(jaxgan.Generator(conv_kernel_grad='fast'), z)
