"""A small MNIST classifier: the feature extractor of jaxgan's metrics.

The weights ship inside the package (`jaxgan/assets/mnist_classifier.msgpack`)
with a JSON record of how they were made; `examples/mnist_classifier.py`
trains them again from real MNIST with a fixed seed and measures their test
accuracy. Loading them needs no network.

The network sees images as the generator makes them: float `[B, 28, 28, 1]`
in [-1, 1]. Its 128-wide penultimate layer (after ReLU) gives the features of
the Frechet classifier distance; its softmax gives the classifier score and
the mode coverage (`jaxgan.metrics`).
"""

import functools
import hashlib
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgan import layers
from jaxgan.errors import JaxganError

NUM_CLASSES = 10
ASSET_DIR = os.path.join(os.path.dirname(__file__), 'assets')
WEIGHTS_FILE = 'mnist_classifier.msgpack'
INFO_FILE = 'mnist_classifier.json'


class MNISTClassifier(nn.Module):
  """Three 3x3 conv blocks with max pooling, then Dense(128) and Dense(10).

  `[B, 28, 28, 1]` -> conv 32 -> pool -> conv 64 -> pool -> conv 128 -> pool
  -> `[B, 3, 3, 128]` -> Dense(features) -> ReLU -> Dense(10). About 241k
  parameters. The convolutions are `jaxgan.layers.Conv` (flax's parameters
  and numerics, faster kernel gradients on CPU).

  Attributes:
    features: width of the penultimate layer (the FCD features).
  """

  features: int = 128

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Classifies images.

    Args:
      images: float `[B, 28, 28, 1]` in [-1, 1].

    Returns:
      `(features, logits)`: `[B, features]` penultimate activations (after
      ReLU) and `[B, 10]` class logits.
    """
    x = images
    for channels in (32, 64, 128):
      x = layers.Conv(channels, (3, 3))(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.features)(x))
    logits = nn.Dense(NUM_CLASSES)(features)
    return features, logits


class Classifier(NamedTuple):
  """A classifier module with its parameters and provenance.

  Attributes:
    module: the flax module.
    params: its parameters.
    info: how the parameters were made (script, seed, test accuracy, sha256).
  """
  module: MNISTClassifier
  params: Any
  info: dict[str, Any]


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def save_classifier(params: Any, info: dict[str, Any],
                    directory: str = ASSET_DIR) -> str:
  """Writes parameters (msgpack) and `info` plus their sha256 (JSON).

  Returns:
    The path of the weights file.
  """
  os.makedirs(directory, exist_ok=True)
  data = flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, params))
  path = os.path.join(directory, WEIGHTS_FILE)
  with open(path, 'wb') as f:
    f.write(data)
  with open(os.path.join(directory, INFO_FILE), 'w') as f:
    json.dump({**info, 'weights_sha256': _sha256(data)}, f, indent=2,
              sort_keys=True)
    f.write('\n')
  return path


@functools.lru_cache(maxsize=4)
def load_classifier(directory: str = ASSET_DIR) -> Classifier:
  """Loads the shipped MNIST classifier (or one saved in `directory`).

  Args:
    directory: folder with the weights and info files.

  Returns:
    The classifier, its parameters on the default device.

  Raises:
    JaxganError: the files are missing, or the weights do not match the
      sha256 recorded beside them (a damaged or replaced file).
  """
  weights_path = os.path.join(directory, WEIGHTS_FILE)
  info_path = os.path.join(directory, INFO_FILE)
  try:
    with open(weights_path, 'rb') as f:
      data = f.read()
    with open(info_path) as f:
      info = json.load(f)
  except OSError as e:
    raise JaxganError(
        f'Cannot read the MNIST classifier in {directory}: {e.strerror} '
        f'({e.filename}). Reinstall jaxgan, or recreate the weights with '
        'examples/mnist_classifier.py --phase=train.') from None
  except ValueError as e:  # json.JSONDecodeError
    raise JaxganError(
        f'{info_path} is not valid JSON ({e}). Reinstall jaxgan, or recreate '
        'the weights with examples/mnist_classifier.py --phase=train.'
    ) from None
  if _sha256(data) != info.get('weights_sha256'):
    raise JaxganError(
        f'{weights_path} does not match the sha256 recorded in {info_path}; '
        'the file is damaged or was replaced. Reinstall jaxgan, or recreate '
        'the weights with examples/mnist_classifier.py --phase=train.')
  module = MNISTClassifier(features=info.get('features', 128))
  params = jax.tree.map(jnp.asarray,
                        flax.serialization.msgpack_restore(data))
  return Classifier(module, params, info)


@functools.partial(jax.jit, static_argnums=0)
def classify(module: MNISTClassifier, params: Any, images: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Features and class probabilities of float images.

  Args:
    module: the classifier module (static).
    params: its parameters.
    images: float `[B, 28, 28, 1]` in [-1, 1].

  Returns:
    `(features, probabilities)`: `[B, features]` and `[B, 10]`.
  """
  features, logits = module.apply({'params': params}, images)
  return features, jax.nn.softmax(logits)


# Training. ------------------------------------------------------------------


class TrainConfig(NamedTuple):
  """How the shipped classifier is trained (recorded in its info file)."""
  seed: int = 0
  epochs: int = 5
  batch_size: int = 128
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  max_shift: int = 2


def _shift_images(key: jax.Array, images: jax.Array, max_shift: int
                  ) -> jax.Array:
  """Translates each image by up to `max_shift` pixels (zero = background)."""
  if max_shift == 0:
    return images
  size = images.shape[1]
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2,
                            (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (size, size, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def make_train_step(module: MNISTClassifier, optimizer, max_shift: int):
  """The jitted step `(params, opt_state, images_u8, labels, key) -> ...`."""

  def loss_fn(params, images, labels):
    _, logits = module.apply({'params': params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), jnp.mean(jnp.argmax(logits, -1) == labels)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, images, labels, key):
    images = images.astype(jnp.float32) / 127.5 - 1.0
    images = _shift_images(key, images, max_shift)
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  return step


def accuracy(classifier: Classifier | tuple, images: np.ndarray,
             labels: np.ndarray, batch_size: int = 1000) -> float:
  """Top-1 accuracy on uint8 `[N, 28, 28, 1]` images with int `[N]` labels."""
  module, params = classifier[0], classifier[1]
  correct = 0
  for start in range(0, len(images), batch_size):
    batch = jnp.asarray(images[start:start + batch_size], jnp.float32)
    _, probabilities = classify(module, params, batch / 127.5 - 1.0)
    correct += int(jnp.sum(jnp.argmax(probabilities, -1) == jnp.asarray(
        labels[start:start + batch_size])))
  return correct / len(images)


def train_classifier(images: np.ndarray, labels: np.ndarray,
                     config: TrainConfig = TrainConfig(), progress=None
                     ) -> tuple[MNISTClassifier, Any]:
  """Trains the classifier with AdamW, a cosine schedule and random shifts.

  Args:
    images: uint8 `[N, 28, 28, 1]` training images.
    labels: int `[N]` labels.
    config: hyper-parameters and seed.
    progress: optional callable `(epoch, step, loss, accuracy)` called after
      every step, with the step's loss and batch accuracy as device scalars
      (fetching them is the caller's choice, so the loop itself never
      waits for the device).

  Returns:
    `(module, params)`.
  """
  module = MNISTClassifier()
  key = jax.random.key(config.seed)
  init_key, data_key = jax.random.split(key)
  params = module.init(init_key, jnp.zeros((1, 28, 28, 1)))['params']
  steps_per_epoch = len(images) // config.batch_size
  schedule = optax.cosine_decay_schedule(
      config.learning_rate, config.epochs * steps_per_epoch)
  optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
  opt_state = optimizer.init(params)
  step = make_train_step(module, optimizer, config.max_shift)
  images_device = jnp.asarray(images)
  labels_device = jnp.asarray(labels, jnp.int32)
  for epoch in range(config.epochs):
    epoch_key = jax.random.fold_in(data_key, epoch)
    order = jax.random.permutation(jax.random.fold_in(epoch_key, 0),
                                   len(images))
    for i in range(steps_per_epoch):
      index = order[i * config.batch_size:(i + 1) * config.batch_size]
      params, opt_state, loss, acc = step(
          params, opt_state, images_device[index], labels_device[index],
          jax.random.fold_in(epoch_key, i + 1))
      if progress is not None:
        progress(epoch + 1, epoch * steps_per_epoch + i + 1, loss, acc)
  return module, params
