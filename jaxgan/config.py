"""The configuration of a DCGAN run, and the objects it builds."""

import dataclasses
from typing import Any

import jax
import optax

from jaxgan import losses
from jaxgan import models
from jaxgan import train


# Widths and batch sizes beyond this are typos, not experiments: they would
# only fail later, out of memory.
_MAX_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class DCGANConfig:
  """Model and optimisation settings of a DCGAN run.

  The defaults are the tutorial's model with BatchNorm in the generator
  (without it the model collapses), DCGAN's Adam (2e-4, beta1 0.5), batch 64.
  """

  noise_dim: int = 100
  generator_hidden_dim: int = 128
  generator_base_channels: int = 128
  generator_conv_channels: int = 64
  generator_batch_norm: bool = True
  discriminator_channels_1: int = 64
  discriminator_channels_2: int = 128
  loss: str = 'non_saturating'
  learning_rate: float = 2e-4
  beta1: float = 0.5
  batch_size: int = 64

  # Fields that fix the shapes of the checkpointed states or the data order;
  # a run can only resume under the same values.
  RESUME_FIELDS = (
      'noise_dim', 'generator_hidden_dim', 'generator_base_channels',
      'generator_conv_channels', 'generator_batch_norm',
      'discriminator_channels_1', 'discriminator_channels_2', 'batch_size')

  def __post_init__(self):
    for name in ('noise_dim', 'generator_hidden_dim',
                 'generator_base_channels', 'generator_conv_channels',
                 'discriminator_channels_1', 'discriminator_channels_2',
                 'batch_size'):
      value = getattr(self, name)
      if (not isinstance(value, int) or isinstance(value, bool) or value < 1
          or value > _MAX_SIZE):
        raise ValueError(f'{name} must be an integer in [1, {_MAX_SIZE}], '
                         f'got {value!r}.')
    if not isinstance(self.generator_batch_norm, bool):
      raise ValueError(f'generator_batch_norm must be True or False, got '
                       f'{self.generator_batch_norm!r}.')
    if not 0.0 < self.learning_rate < 1.0:
      raise ValueError(
          f'learning_rate must be in (0, 1), got {self.learning_rate}.')
    if not 0.0 <= self.beta1 < 1.0:
      raise ValueError(f'beta1 must be in [0, 1), got {self.beta1}.')
    losses.get_loss(self.loss)  # Raises for an unknown name.

  def generator(self) -> models.Generator:
    return models.Generator(
        noise_dim=self.noise_dim, hidden_dim=self.generator_hidden_dim,
        base_channels=self.generator_base_channels,
        conv_channels=self.generator_conv_channels,
        batch_norm=self.generator_batch_norm)

  def discriminator(self) -> models.Discriminator:
    return models.Discriminator(
        channels_1=self.discriminator_channels_1,
        channels_2=self.discriminator_channels_2)

  def optimizer(self) -> optax.GradientTransformation:
    return train.adam(self.learning_rate, self.beta1)

  def gan_loss(self) -> losses.GANLoss:
    return losses.get_loss(self.loss)

  def create_train_states(self, key: jax.Array):
    """`(state_g, state_d)` for this config, initialised from `key`."""
    optimizer = self.optimizer()
    return train.create_train_states(
        key, self.generator(), self.discriminator(), optimizer, optimizer)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> 'DCGANConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})

  def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
    """Describes each resume-relevant field where `saved` differs."""
    return [f'{name}: checkpoint has {saved.get(name)!r}, now '
            f'{getattr(self, name)!r}'
            for name in self.RESUME_FIELDS
            if saved.get(name) != getattr(self, name)]
