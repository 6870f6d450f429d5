"""jaxgan: GANs in JAX and Flax."""

from jaxgan import classifier
from jaxgan import data
from jaxgan import images
from jaxgan import metrics
from jaxgan import parallel
from jaxgan import penalties
from jaxgan.checkpoint import Checkpointer
from jaxgan.checks import checked
from jaxgan.config import DCGANConfig
from jaxgan.data import load_mnist
from jaxgan.data import prepare_mnist
from jaxgan.errors import CheckpointError
from jaxgan.errors import DataError
from jaxgan.errors import JaxganError

from jaxgan.losses import GANLoss
from jaxgan.losses import NON_SATURATING
from jaxgan.losses import available_losses
from jaxgan.losses import get_loss
from jaxgan.losses import non_saturating_discriminator_loss
from jaxgan.losses import non_saturating_generator_loss
from jaxgan.penalties import Penalty
from jaxgan.penalties import gradient_penalty
from jaxgan.penalties import r1_penalty
from jaxgan.metrics import EvalResult
from jaxgan.metrics import FeatureStatistics
from jaxgan.metrics import evaluate
from jaxgan.metrics import frechet_distance
from jaxgan.metrics import mnist_reference_statistics
from jaxgan.models import Discriminator
from jaxgan.models import Generator
from jaxgan.models import IMAGE_SHAPE
from jaxgan.train import DiscriminatorState
from jaxgan.train import GeneratorState
from jaxgan.train import adam
from jaxgan.train import create_train_states
from jaxgan.train import discriminate
from jaxgan.train import discriminator_loop
from jaxgan.train import discriminator_step
from jaxgan.train import epoch_permutation
from jaxgan.train import generate
from jaxgan.train import generator_inputs
from jaxgan.train import loop_keys
from jaxgan.train import sample
from jaxgan.train import sample_seeds
from jaxgan.train import seed_slice
from jaxgan.train import step_keys
from jaxgan.train import stack_seeds
from jaxgan.train import sample_noise
from jaxgan.train import to_float_images
from jaxgan.train import train_loop
from jaxgan.train import train_loop_seeds
from jaxgan.train import discriminator_loop_seeds
from jaxgan.train import train_step

__version__ = '0.1.0'
