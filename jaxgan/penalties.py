"""Regularisers of the discriminator, as pure functions of D.

Each takes `discriminator_fn`, a function from images `[B, H, W, C]` to
logits `[B]` (D with its parameters bound), so the penalty can be added to
D's loss and differentiated with respect to those parameters (a
second-order gradient).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxgan.errors import is_positive_integer

DiscriminatorFn = Callable[[jax.Array], jax.Array]
PENALTIES = ('gradient_penalty', 'r1')


def _input_gradients(discriminator_fn: DiscriminatorFn,
                     images: jax.Array) -> jax.Array:
  """d(sum of logits)/d(images): each image's own gradient, `[B, -1]`.

  With BatchNorm in training mode an image's logit also depends on the rest
  of its batch; the sum then includes those cross terms.
  """
  grads = jax.grad(lambda x: jnp.sum(discriminator_fn(x)))(images)
  return grads.reshape(grads.shape[0], -1)


def gradient_penalty(discriminator_fn: DiscriminatorFn, real: jax.Array,
                     fake: jax.Array, key: jax.Array,
                     target: float = 1.0) -> jax.Array:
  """WGAN-GP (Gulrajani et al. 2017): `mean((|grad D(x_hat)| - target)^2)`.

  `x_hat = e * real + (1 - e) * fake` with one `e ~ U(0, 1)` per image,
  drawn from `key`. The generated images are treated as constants.

  Args:
    discriminator_fn: images `[B, H, W, C]` -> logits `[B]`.
    real: real images `[B, H, W, C]`.
    fake: generated images, same shape.
    key: PRNG key for the interpolation weights.
    target: the gradient norm the penalty pulls towards.

  Returns:
    The scalar penalty (not yet multiplied by its weight).
  """
  if real.shape != fake.shape:
    raise ValueError(f'real {real.shape} and fake {fake.shape} images must '
                     f'have the same shape for the gradient penalty.')
  weights = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1),
                               real.dtype)
  fake = jax.lax.stop_gradient(fake)
  interpolates = weights * real + (1.0 - weights) * fake
  norms = jnp.linalg.norm(_input_gradients(discriminator_fn, interpolates),
                          axis=-1)
  return jnp.mean((norms - target) ** 2)


def r1_penalty(discriminator_fn: DiscriminatorFn,
               real: jax.Array) -> jax.Array:
  """R1 (Mescheder et al. 2018): `mean(|grad D(x)|^2)` on real images.

  The usual weight is `gamma / 2`.

  Args:
    discriminator_fn: images `[B, H, W, C]` -> logits `[B]`.
    real: real images `[B, H, W, C]`.

  Returns:
    The scalar penalty (not yet multiplied by its weight).
  """
  return jnp.mean(jnp.sum(_input_gradients(discriminator_fn, real) ** 2,
                          axis=-1))


class Penalty(NamedTuple):
  """A penalty on D's loss: which, how strong, how often.

  Hashable, so it can be part of a jitted step's static arguments.

  Attributes:
    name: 'gradient_penalty' (WGAN-GP) or 'r1'.
    weight: multiplies the penalty (10 for WGAN-GP; gamma / 2 for R1).
    every: lazy regularisation (Karras et al. 2020): applied on D steps
      divisible by `every`, multiplied by `every` so that its average
      strength is unchanged.
  """

  name: str
  weight: float
  every: int = 1

  def validate(self) -> 'Penalty':
    """Returns self; raises ValueError for an unknown name, a weight that
    is not positive or an interval that is not a positive integer."""
    if self.name not in PENALTIES:
      raise ValueError(f'Unknown penalty {self.name!r}; choose one of '
                       f'{PENALTIES}.')
    if not self.weight > 0:
      raise ValueError(f'The penalty weight must be positive, got '
                       f'{self.weight}.')
    if not is_positive_integer(self.every):
      raise ValueError(f'The penalty interval must be a positive integer, '
                       f'got {self.every!r}.')
    return self

  def __call__(self, discriminator_fn: DiscriminatorFn, real: jax.Array,
               fake: jax.Array, key: jax.Array,
               step: jax.Array) -> jax.Array:
    """The weighted penalty for D step `step` (0 on skipped lazy steps)."""
    self.validate()  # While tracing: an unknown name must not fall to R1.

    def compute():
      if self.name == 'gradient_penalty':
        value = gradient_penalty(discriminator_fn, real, fake, key)
      else:
        value = r1_penalty(discriminator_fn, real)
      return (self.weight * self.every) * value.astype(jnp.float32)

    if self.every == 1:
      return compute()
    return jax.lax.cond(step % self.every == 0, compute,
                        lambda: jnp.zeros((), jnp.float32))
