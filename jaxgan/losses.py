"""GAN losses as pure functions of discriminator logits.

A `GANLoss` pairs the discriminator's and the generator's objective. It is a
hashable value, so it can be passed to the jitted steps as a static argument.
Every loss is to be minimised and takes D's raw outputs ("logits" for the
probabilistic losses, critic values for Wasserstein and hinge), shape `[B]`.

| name | D minimises | G minimises |
|---|---|---|
| minimax | -log D(x) - log(1 - D(G(z))) | log(1 - D(G(z))) |
| non_saturating | as minimax | -log D(G(z)) |
| hinge | relu(1 - C(x)) + relu(1 + C(G(z))) | -C(G(z)) |
| wasserstein | C(G(z)) - C(x) | -C(G(z)) |
| least_squares | ((C(x) - 1)^2 + C(G(z))^2) / 2 | (C(G(z)) - 1)^2 / 2 |
| relativistic_average | -log s(C(x) - m_f) - log(1 - s(C(G(z)) - m_r)) | the same with real and fake swapped |

with D = sigmoid(C), s the sigmoid, m_r and m_f the batch means of C on real
and generated images; each term is averaged over its batch.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgan.errors import is_positive_integer
from jaxgan.penalties import Penalty


class GANLoss(NamedTuple):
  """The adversarial objective of a train step.

  A discriminator loss and a generator loss, both to be minimised, and how D
  is trained against them: an optional penalty and the number of D updates
  per G update. Build variants with `_replace`, e.g.
  `get_loss('wasserstein')._replace(penalty=Penalty('gradient_penalty', 10.),
  n_critic=5)`.

  Attributes:
    discriminator: `(logits_real [B], logits_fake [B]) -> scalar`.
    generator: `(logits_fake [B], logits_real [B] or None) -> scalar`.
    name: a short identifier, used in logs and configs.
    generator_needs_real: whether `generator` reads `logits_real` (the
      relativistic loss); the train step then scores the real batch with the
      updated D for G's update too.
    penalty: a `jaxgan.penalties.Penalty` added to D's loss, or None.
    n_critic: D updates per G update. Each train step then consumes
      `n_critic` batches: the first `n_critic - 1` against fresh samples of
      G, the last against the samples G is then updated with.
  """

  discriminator: Callable[[jax.Array, jax.Array], jax.Array]
  generator: Callable[..., jax.Array]
  name: str
  generator_needs_real: bool = False
  penalty: Penalty | None = None
  n_critic: int = 1

  def validate(self) -> 'GANLoss':
    """Returns self; raises ValueError naming a bad penalty or n_critic.

    The jitted steps call it while tracing, so a misspelt penalty or a
    non-positive `n_critic` fails at once instead of training on something
    else.
    """
    if not is_positive_integer(self.n_critic):
      raise ValueError(f'n_critic (D updates per G update) must be a '
                       f'positive integer, got {self.n_critic!r}.')
    if self.penalty is not None:
      if not isinstance(self.penalty, Penalty):
        raise ValueError(f'penalty must be a jaxgan.penalties.Penalty or '
                         f'None, got {self.penalty!r}.')
      self.penalty.validate()
    return self


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


def non_saturating_generator_loss(logits_fake: jax.Array,
                                  logits_real: jax.Array | None = None
                                  ) -> jax.Array:
  """Non-saturating generator loss: `mean(-log sigmoid(D(G(z))))`.

  Unlike the minimax `log(1 - D(G(z)))`, its gradient does not vanish when
  the discriminator confidently rejects the samples.

  Args:
    logits_fake: D's logits on generated images, `[B]`.
    logits_real: unused (the signature is shared by all generator losses).

  Returns:
    The scalar loss.
  """
  del logits_real
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      logits_fake, jnp.ones_like(logits_fake)))


def minimax_generator_loss(logits_fake: jax.Array,
                           logits_real: jax.Array | None = None) -> jax.Array:
  """The original minimax generator loss: `mean(log(1 - D(G(z))))`.

  Computed as `-softplus(logits)`. Its gradient vanishes when D confidently
  rejects the samples, which is why `non_saturating` is the default.

  Args:
    logits_fake: D's logits on generated images, `[B]`.
    logits_real: unused.

  Returns:
    The scalar loss (at most 0).
  """
  del logits_real
  return -jnp.mean(jax.nn.softplus(logits_fake))


def hinge_discriminator_loss(logits_real: jax.Array,
                             logits_fake: jax.Array) -> jax.Array:
  """Hinge loss: `mean(relu(1 - C(x))) + mean(relu(1 + C(G(z))))`.

  Args:
    logits_real: critic values on real images, `[B]`.
    logits_fake: critic values on generated images, `[B]`.

  Returns:
    The scalar loss.
  """
  return (jnp.mean(jax.nn.relu(1.0 - logits_real))
          + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def wasserstein_discriminator_loss(logits_real: jax.Array,
                                   logits_fake: jax.Array) -> jax.Array:
  """Negative Wasserstein-1 estimate: `mean(C(G(z))) - mean(C(x))`.

  Only meaningful with a Lipschitz constraint on the critic (a gradient
  penalty or spectral normalisation).

  Args:
    logits_real: critic values on real images, `[B]`.
    logits_fake: critic values on generated images, `[B]`.

  Returns:
    The scalar loss.
  """
  return jnp.mean(logits_fake) - jnp.mean(logits_real)


def critic_generator_loss(logits_fake: jax.Array,
                          logits_real: jax.Array | None = None) -> jax.Array:
  """Generator loss of the hinge and Wasserstein GANs: `-mean(C(G(z)))`.

  Args:
    logits_fake: critic values on generated images, `[B]`.
    logits_real: unused.

  Returns:
    The scalar loss.
  """
  del logits_real
  return -jnp.mean(logits_fake)


def least_squares_discriminator_loss(logits_real: jax.Array,
                                     logits_fake: jax.Array) -> jax.Array:
  """LSGAN (targets 1 for real, 0 for fake), halved as in Mao et al.

  Args:
    logits_real: D's raw outputs on real images, `[B]`.
    logits_fake: D's raw outputs on generated images, `[B]`.

  Returns:
    `(mean((C(x) - 1)^2) + mean(C(G(z))^2)) / 2`.
  """
  return 0.5 * (jnp.mean((logits_real - 1.0) ** 2)
                + jnp.mean(logits_fake ** 2))


def least_squares_generator_loss(logits_fake: jax.Array,
                                 logits_real: jax.Array | None = None
                                 ) -> jax.Array:
  """LSGAN generator loss: `mean((C(G(z)) - 1)^2) / 2`.

  Args:
    logits_fake: D's raw outputs on generated images, `[B]`.
    logits_real: unused.

  Returns:
    The scalar loss.
  """
  del logits_real
  return 0.5 * jnp.mean((logits_fake - 1.0) ** 2)


def _relativistic(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """-mean(log s(a - mean b)) - mean(log(1 - s(b - mean a)))."""
  return (jnp.mean(jax.nn.softplus(-(logits_a - jnp.mean(logits_b))))
          + jnp.mean(jax.nn.softplus(logits_b - jnp.mean(logits_a))))


def relativistic_discriminator_loss(logits_real: jax.Array,
                                    logits_fake: jax.Array) -> jax.Array:
  """Relativistic average loss (RaSGAN, Jolicoeur-Martineau 2018) for D.

  D estimates how much more realistic a real image is than the average
  generated one, and the reverse.

  Args:
    logits_real: D's logits on real images, `[B]`.
    logits_fake: D's logits on generated images, `[B]`.

  Returns:
    `mean(softplus(-(C(x) - m_f))) + mean(softplus(C(G(z)) - m_r))`.
  """
  return _relativistic(logits_real, logits_fake)


def relativistic_generator_loss(logits_fake: jax.Array,
                                logits_real: jax.Array | None = None
                                ) -> jax.Array:
  """Relativistic average loss for G: D's loss with real and fake swapped.

  Args:
    logits_fake: D's logits on generated images, `[B]`.
    logits_real: D's logits on a real batch, `[B]` (required).

  Returns:
    `mean(softplus(-(C(G(z)) - m_r))) + mean(softplus(C(x) - m_f))`.
  """
  if logits_real is None:
    raise ValueError('The relativistic generator loss needs logits_real, '
                     "D's logits on a real batch.")
  return _relativistic(logits_fake, logits_real)


NON_SATURATING = GANLoss(
    discriminator=non_saturating_discriminator_loss,
    generator=non_saturating_generator_loss,
    name='non_saturating')
MINIMAX = GANLoss(
    discriminator=non_saturating_discriminator_loss,
    generator=minimax_generator_loss,
    name='minimax')
HINGE = GANLoss(
    discriminator=hinge_discriminator_loss,
    generator=critic_generator_loss,
    name='hinge')
WASSERSTEIN = GANLoss(
    discriminator=wasserstein_discriminator_loss,
    generator=critic_generator_loss,
    name='wasserstein')
LEAST_SQUARES = GANLoss(
    discriminator=least_squares_discriminator_loss,
    generator=least_squares_generator_loss,
    name='least_squares')
RELATIVISTIC_AVERAGE = GANLoss(
    discriminator=relativistic_discriminator_loss,
    generator=relativistic_generator_loss,
    name='relativistic_average',
    generator_needs_real=True)

_LOSSES = {loss.name: loss for loss in (
    NON_SATURATING, MINIMAX, HINGE, WASSERSTEIN, LEAST_SQUARES,
    RELATIVISTIC_AVERAGE)}


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
