"""Non-saturating GAN losses against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgan

LOG2 = math.log(2.0)


def _softplus(x):
  return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


@pytest.mark.parametrize('real, fake, expected', [
    ([0.0, 0.0], [0.0, 0.0], 2 * LOG2),
    ([2.0], [-3.0], _softplus(-2.0) + _softplus(-3.0)),
    ([1.0, -1.0], [0.5, 4.0],
     (_softplus(-1.0) + _softplus(1.0)) / 2 + (_softplus(0.5) + _softplus(4.0)) / 2),
    ([100.0], [-100.0], 0.0),  # Perfect D: loss 0, not NaN.
    ([-100.0], [100.0], 200.0),  # Hopeless D: finite, not inf.
])
def test_discriminator_loss_values(real, fake, expected):
  loss = jaxgan.non_saturating_discriminator_loss(jnp.array(real),
                                                  jnp.array(fake))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fake, expected', [
    ([0.0], LOG2),
    ([3.0, -2.0], (_softplus(-3.0) + _softplus(2.0)) / 2),
    ([100.0], 0.0),
    ([-100.0], 100.0),
])
def test_generator_loss_values(fake, expected):
  loss = jaxgan.non_saturating_generator_loss(jnp.array(fake))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)


def test_generator_gradient_does_not_vanish_when_d_rejects_samples():
  grad = jax.grad(jaxgan.non_saturating_generator_loss)(jnp.array([-20.0]))
  # d/dx softplus(-x) = -sigmoid(-x) -> -1 for confidently rejected samples.
  np.testing.assert_allclose(float(grad[0]), -1.0, atol=1e-6)


def test_loss_registry():
  assert jaxgan.get_loss('non_saturating') is jaxgan.NON_SATURATING
  assert 'non_saturating' in jaxgan.available_losses()
  with pytest.raises(ValueError, match='non_saturating'):
    jaxgan.get_loss('wasserstein-typo')
