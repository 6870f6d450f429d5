"""The configuration of a DCGAN run, and the objects it builds."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgan import losses
from jaxgan import models
from jaxgan import penalties
from jaxgan import train
from jaxgan.errors import is_positive_integer

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NUM_CLASSES = 10


# Widths and batch sizes beyond this are typos, not experiments: they would
# only fail later, out of memory.
_MAX_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class DCGANConfig:
  """Model and optimisation settings of a DCGAN run.

  The defaults are the tutorial's model with BatchNorm in the generator
  (without it the model collapses), DCGAN's Adam (2e-4, beta1 0.5), batch 64.

  The toolkit options (see the README's table):
    loss: one of `jaxgan.available_losses()`.
    penalty: 'none', 'gradient_penalty' (WGAN-GP) or 'r1', with
      `penalty_weight` (10 for WGAN-GP, gamma / 2 for R1) and
      `penalty_every` (lazy regularisation).
    n_critic: D updates per G update; a step then reads n_critic batches.
    ema_decay: keep an EMA of G's parameters (0: none), used for sampling.
    spectral_norm: spectral normalisation of D's layers.
    conditional: class-conditional G (one-hot label input) and projection
      D; batches are then `(images, labels)` pairs.
    discriminator_batch_norm: BatchNorm in D (the tutorial's model).
    compute_dtype: 'float32' or 'bfloat16' (parameters and optimiser state
      stay float32).
    conv_kernel_grad: how both models compute their convolutions: 'auto'
      (per layer and backend, see `jaxgan.models.auto_kernel_grad`),
      'im2col', 'matmul', 'winograd' or 'xla'. The parameters are the same
      either way, and the results agree to float rounding.
  """

  noise_dim: int = 100
  generator_hidden_dim: int = 128
  generator_base_channels: int = 128
  generator_conv_channels: int = 64
  generator_batch_norm: bool = True
  discriminator_channels_1: int = 64
  discriminator_channels_2: int = 128
  discriminator_batch_norm: bool = True
  spectral_norm: bool = False
  conditional: bool = False
  loss: str = 'non_saturating'
  penalty: str = 'none'
  penalty_weight: float = 10.0
  penalty_every: int = 1
  n_critic: int = 1
  ema_decay: float = 0.0
  compute_dtype: str = 'float32'
  conv_kernel_grad: str = 'auto'
  learning_rate: float = 2e-4
  beta1: float = 0.5
  batch_size: int = 64

  # Fields that fix the shapes of the checkpointed states or the data order;
  # a run can only resume under the same values.
  RESUME_FIELDS = (
      'noise_dim', 'generator_hidden_dim', 'generator_base_channels',
      'generator_conv_channels', 'generator_batch_norm',
      'discriminator_channels_1', 'discriminator_channels_2',
      'discriminator_batch_norm', 'spectral_norm', 'conditional', 'n_critic',
      'ema_decay', 'batch_size')

  def __post_init__(self):
    for name in ('noise_dim', 'generator_hidden_dim',
                 'generator_base_channels', 'generator_conv_channels',
                 'discriminator_channels_1', 'discriminator_channels_2',
                 'batch_size', 'penalty_every', 'n_critic'):
      value = getattr(self, name)
      if not is_positive_integer(value) or value > _MAX_SIZE:
        raise ValueError(f'{name} must be an integer in [1, {_MAX_SIZE}], '
                         f'got {value!r}.')
    for name in ('generator_batch_norm', 'discriminator_batch_norm',
                 'spectral_norm', 'conditional'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{name} must be True or False, got '
                         f'{getattr(self, name)!r}.')
    if self.penalty != 'none':
      penalties.Penalty(self.penalty, self.penalty_weight,
                        self.penalty_every).validate()
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f'ema_decay must be in [0, 1) (0: no EMA), got '
                       f'{self.ema_decay}.')
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f'compute_dtype must be one of '
                       f'{sorted(COMPUTE_DTYPES)}, got '
                       f'{self.compute_dtype!r}.')
    if self.conv_kernel_grad not in models.KERNEL_GRADS:
      raise ValueError(f'conv_kernel_grad must be one of '
                       f'{list(models.KERNEL_GRADS)}, got '
                       f'{self.conv_kernel_grad!r}.')
    if not 0.0 < self.learning_rate < 1.0:
      raise ValueError(
          f'learning_rate must be in (0, 1), got {self.learning_rate}.')
    if not 0.0 <= self.beta1 < 1.0:
      raise ValueError(f'beta1 must be in [0, 1), got {self.beta1}.')
    losses.get_loss(self.loss)  # Raises for an unknown name.

  @property
  def num_classes(self) -> int:
    """MNIST's 10 digits for a conditional GAN, else 0."""
    return NUM_CLASSES if self.conditional else 0

  def generator(self) -> models.Generator:
    return models.Generator(
        noise_dim=self.noise_dim, hidden_dim=self.generator_hidden_dim,
        base_channels=self.generator_base_channels,
        conv_channels=self.generator_conv_channels,
        batch_norm=self.generator_batch_norm, num_classes=self.num_classes,
        dtype=COMPUTE_DTYPES[self.compute_dtype],
        conv_kernel_grad=self.conv_kernel_grad)

  def discriminator(self) -> models.Discriminator:
    return models.Discriminator(
        channels_1=self.discriminator_channels_1,
        channels_2=self.discriminator_channels_2,
        batch_norm=self.discriminator_batch_norm,
        spectral_norm=self.spectral_norm, num_classes=self.num_classes,
        dtype=COMPUTE_DTYPES[self.compute_dtype],
        conv_kernel_grad=self.conv_kernel_grad)

  def optimizer(self) -> optax.GradientTransformation:
    return train.adam(self.learning_rate, self.beta1)

  def gan_loss(self) -> losses.GANLoss:
    """The objective: loss pair, penalty and D updates per G update."""
    penalty = (None if self.penalty == 'none' else penalties.Penalty(
        self.penalty, float(self.penalty_weight), self.penalty_every))
    return losses.get_loss(self.loss)._replace(penalty=penalty,
                                               n_critic=self.n_critic)

  def create_train_states(self, key: jax.Array):
    """`(state_g, state_d)` for this config, initialised from `key`."""
    optimizer = self.optimizer()
    return train.create_train_states(
        key, self.generator(), self.discriminator(), optimizer, optimizer,
        ema_decay=self.ema_decay or None)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> 'DCGANConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})

  def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
    """Describes each resume-relevant field where `saved` differs."""
    # A field the saved config predates had its default value then.
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    saved = {name: saved.get(name, defaults[name])
             for name in self.RESUME_FIELDS}
    return [f'{name}: checkpoint has {saved[name]!r}, now '
            f'{getattr(self, name)!r}'
            for name in self.RESUME_FIELDS
            if saved[name] != getattr(self, name)]
