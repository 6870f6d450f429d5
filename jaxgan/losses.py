"""GAN losses as pure functions of discriminator logits.

A `GANLoss` pairs the discriminator's and the generator's objective. It is a
hashable value, so it can be passed to the jitted steps as a static argument.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GANLoss(NamedTuple):
  """A discriminator loss and a generator loss, both to be minimised.

  Attributes:
    discriminator: `(logits_real [B], logits_fake [B]) -> scalar`.
    generator: `(logits_fake [B]) -> scalar`.
    name: a short identifier, used in logs and configs.
  """

  discriminator: Callable[[jax.Array, jax.Array], jax.Array]
  generator: Callable[[jax.Array], jax.Array]
  name: str


def non_saturating_discriminator_loss(
    logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Cross-entropy of D classifying real as 1 and fake as 0.

  Computed from logits (log-sigmoid) so that confident logits do not
  produce `log(0)`.

  Args:
    logits_real: D's logits on real images, `[B]`.
    logits_fake: D's logits on generated images, `[B]`.

  Returns:
    The scalar mean of both halves' binary cross-entropies summed:
    `mean(-log sigmoid(real)) + mean(-log(1 - sigmoid(fake)))`.
  """
  real = optax.sigmoid_binary_cross_entropy(
      logits_real, jnp.ones_like(logits_real))
  fake = optax.sigmoid_binary_cross_entropy(
      logits_fake, jnp.zeros_like(logits_fake))
  return jnp.mean(real) + jnp.mean(fake)


def non_saturating_generator_loss(logits_fake: jax.Array) -> jax.Array:
  """Non-saturating generator loss: `mean(-log sigmoid(D(G(z))))`.

  Unlike the minimax `log(1 - D(G(z)))`, its gradient does not vanish when
  the discriminator confidently rejects the samples.

  Args:
    logits_fake: D's logits on generated images, `[B]`.

  Returns:
    The scalar loss.
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      logits_fake, jnp.ones_like(logits_fake)))


NON_SATURATING = GANLoss(
    discriminator=non_saturating_discriminator_loss,
    generator=non_saturating_generator_loss,
    name='non_saturating')

_LOSSES = {NON_SATURATING.name: NON_SATURATING}


def get_loss(name: str) -> GANLoss:
  """Returns the registered `GANLoss` called `name`.

  Args:
    name: one of `available_losses()`.

  Returns:
    The loss pair.

  Raises:
    ValueError: for an unknown name; the message lists the known ones.
  """
  try:
    return _LOSSES[name]
  except KeyError:
    raise ValueError(
        f'Unknown GAN loss {name!r}; choose one of '
        f'{sorted(_LOSSES)}.') from None


def available_losses() -> list[str]:
  """Names accepted by `get_loss`."""
  return sorted(_LOSSES)
