r"""Trains jaxgan's MNIST classifier, or measures the shipped one.

  # Accuracy of the shipped weights on the 10,000 real test images.
  python examples/mnist_classifier.py --phase=accuracy \
      --mnist_dir=../shared/datasets/mnist
  # Train the weights again (fixed seed) and write them with their record.
  python examples/mnist_classifier.py --phase=train \
      --mnist_dir=../shared/datasets/mnist --output_dir=/tmp/classifier

The shipped weights (jaxgan/assets/) were made by the train phase with its
default flags; jaxgan/assets/mnist_classifier.json records the seed, the
hyper-parameters, the versions and the test accuracy.
"""

import datetime
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import flax
import jax
from tqdm import tqdm

from jaxgan import classifier as classifier_lib
from jaxgan.data import load_mnist
from jaxgan.errors import JaxganError

_DEFAULTS = classifier_lib.TrainConfig()

flags.DEFINE_enum('phase', 'accuracy', ['train', 'accuracy'],
                  'train: train and save the classifier; accuracy: measure '
                  'the classifier in --classifier_dir on the test set.')
flags.DEFINE_string('mnist_dir', None,
                    'Folder with the four original MNIST .gz files, to prepare '
                    'the dataset offline (tfds manual download dir).')
flags.DEFINE_string('data_dir', None, 'tfds data dir (default: '
                    '$TFDS_DATA_DIR or ~/tensorflow_datasets).')
flags.DEFINE_string('classifier_dir', classifier_lib.ASSET_DIR,
                    'Classifier to measure (accuracy phase).')
flags.DEFINE_string('output_dir', None, 'Where the train phase writes the '
                    'weights (default: the package, replacing the shipped '
                    'ones).')
flags.DEFINE_string('train_split', 'train', 'tfds split to train on, e.g. '
                    "'train[:5000]' for a quick try.")
flags.DEFINE_integer('seed', _DEFAULTS.seed, 'Seed of the training run.')
flags.DEFINE_integer('epochs', _DEFAULTS.epochs, 'Training epochs.',
                     lower_bound=1)
flags.DEFINE_integer('batch_size', _DEFAULTS.batch_size, 'Training batch.',
                     lower_bound=1)
flags.DEFINE_float('learning_rate', _DEFAULTS.learning_rate,
                   'Peak AdamW learning rate (cosine decay to 0).')
flags.DEFINE_float('min_accuracy', 0.99, 'The train phase fails when the '
                   'test accuracy is below this.')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')
FLAGS = flags.FLAGS


def _load(split):
  return load_mnist(split, data_dir=FLAGS.data_dir, mnist_dir=FLAGS.mnist_dir)


def accuracy_phase() -> None:
  classifier = classifier_lib.load_classifier(
      os.path.abspath(FLAGS.classifier_dir))
  images, labels = _load('test')
  accuracy = classifier_lib.accuracy(classifier, images, labels)
  errors = round((1 - accuracy) * len(images))
  print(f'MNIST test accuracy of {FLAGS.classifier_dir}: {accuracy:.4%} '
        f'({errors} errors in {len(images)} images); recorded when made: '
        f'{classifier.info.get("test_accuracy", float("nan")):.4%}')


def train_phase() -> None:
  config = classifier_lib.TrainConfig(
      seed=FLAGS.seed, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate)
  train_images, train_labels = _load(FLAGS.train_split)
  test_images, test_labels = _load('test')
  steps = config.epochs * (len(train_images) // config.batch_size)
  bar = tqdm(total=steps, unit='step', disable=not FLAGS.progress,
             dynamic_ncols=True)

  def progress(epoch, step, loss, accuracy):
    bar.update(1)
    if step % 50 == 0:
      bar.set_description(f'epoch {epoch}/{config.epochs}')
      bar.set_postfix(loss=f'{float(loss):.4f}', acc=f'{float(accuracy):.3f}')

  start = time.time()
  module, params = classifier_lib.train_classifier(
      train_images, train_labels, config, progress)
  bar.close()
  seconds = time.time() - start
  classifier = classifier_lib.Classifier(module, params, {})
  test_accuracy = classifier_lib.accuracy(classifier, test_images,
                                          test_labels)
  train_accuracy = classifier_lib.accuracy(classifier, train_images,
                                           train_labels)
  print(f'Trained in {seconds:.0f}s: test accuracy {test_accuracy:.4%}, '
        f'train accuracy {train_accuracy:.4%}')
  if test_accuracy < FLAGS.min_accuracy:
    raise JaxganError(
        f'Test accuracy {test_accuracy:.4%} is below --min_accuracy='
        f'{FLAGS.min_accuracy}; nothing was written. Train longer '
        '(--epochs) or with another --seed.')
  info = {
      'script': 'examples/mnist_classifier.py --phase=train',
      'train_split': FLAGS.train_split,
      'architecture': 'conv32-pool-conv64-pool-conv128-pool-dense128-dense10',
      'features': module.features,
      'train_config': config._asdict(),
      'test_accuracy': test_accuracy,
      'train_accuracy': train_accuracy,
      'test_images': len(test_images),
      'training_seconds': round(seconds, 1),
      'jax_version': jax.__version__,
      'flax_version': flax.__version__,
      'backend': jax.default_backend(),
      'created': datetime.date.today().isoformat(),
  }
  path = classifier_lib.save_classifier(
      params, info, FLAGS.output_dir or classifier_lib.ASSET_DIR)
  print(f'Wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB) and its record.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.ERROR)
  try:
    {'train': train_phase, 'accuracy': accuracy_phase}[FLAGS.phase]()
  except JaxganError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
