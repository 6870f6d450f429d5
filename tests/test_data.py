"""MNIST through tfds: mock data, the real files, the cache and the errors."""

import os
import shutil
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxgan
from jaxgan import data
from conftest import MNIST_DIR

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def offline(monkeypatch):
  """Makes the download server unreachable, as on a machine without network."""
  def refuse(*args, **kwargs):
    raise OSError('network is unreachable')
  monkeypatch.setattr(data.socket, 'create_connection', refuse)


def _fake_mnist_dir(path):
  os.makedirs(path, exist_ok=True)
  for name in data.MNIST_FILES:
    with open(os.path.join(path, name), 'wb') as f:
      f.write(b'not used under mock_data')
  return str(path)


def test_tfds_path_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=37):
    images, labels = jaxgan.load_mnist(
        'train', data_dir=str(tmp_path / 'tfds'),
        mnist_dir=_fake_mnist_dir(tmp_path / 'files'))
  assert images.shape == (37, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (37,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() <= 9
  # Mock data is not cached as if it were the real dataset.
  assert not os.path.exists(tmp_path / 'tfds' / 'mnist' / '3.0.1' /
                            'jaxgan_cache')


@pytest.mark.slow
def test_real_mnist_train_and_test(mnist_data_dir):
  images, labels = jaxgan.load_mnist('train', data_dir=mnist_data_dir)
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  assert np.bincount(labels).tolist() == TRAIN_COUNTS
  # About 13% of MNIST pixels are brighter than mid-grey, 19% non-zero.
  assert 0.12 < (images > 127).mean() < 0.14
  assert 0.18 < (images > 0).mean() < 0.20
  test_images, test_labels = jaxgan.load_mnist('test', data_dir=mnist_data_dir)
  assert test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(test_labels).tolist() == TEST_COUNTS

  # The second read comes from the cache and is identical.
  start = time.time()
  again, again_labels = jaxgan.load_mnist('train', data_dir=mnist_data_dir)
  assert time.time() - start < 5
  np.testing.assert_array_equal(again, images)
  np.testing.assert_array_equal(again_labels, labels)
  on_device = data.to_device(images[:128])
  floats = jaxgan.to_float_images(on_device)
  assert float(floats.min()) == -1.0 and float(floats.max()) == 1.0


def test_prepared_data_needs_neither_files_nor_network(mnist_data_dir, offline):
  images, _ = jaxgan.load_mnist('test[:10]', data_dir=mnist_data_dir)
  assert images.shape == (10, 28, 28, 1)


def test_offline_without_files_fails_fast_with_advice(tmp_path, offline):
  start = time.time()
  with pytest.raises(jaxgan.DataError, match='--mnist_dir') as error:
    jaxgan.load_mnist('train', data_dir=str(tmp_path))
  assert time.time() - start < 10
  assert 'train-images-idx3-ubyte.gz' in str(error.value)


def test_hanging_network_probe_times_out(tmp_path, monkeypatch):
  def hang(*args, **kwargs):
    time.sleep(30)  # Then fail as a connection that timed out does.
    raise TimeoutError('timed out')
  monkeypatch.setattr(data.socket, 'create_connection', hang)
  start = time.time()
  with pytest.raises(jaxgan.DataError, match='cannot be reached'):
    jaxgan.load_mnist('train', data_dir=str(tmp_path), network_timeout=0.5)
  assert time.time() - start < 5


def test_mnist_dir_with_missing_files(tmp_path):
  folder = tmp_path / 'mnist'
  folder.mkdir()
  (folder / data.MNIST_FILES[0]).write_bytes(b'x')
  with pytest.raises(jaxgan.DataError, match='lacks') as error:
    jaxgan.load_mnist('train', data_dir=str(tmp_path / 'tfds'),
                      mnist_dir=str(folder))
  assert data.MNIST_FILES[3] in str(error.value)
  with pytest.raises(jaxgan.DataError, match='not a directory'):
    jaxgan.load_mnist('train', data_dir=str(tmp_path / 'tfds'),
                      mnist_dir=str(tmp_path / 'nowhere'))


@pytest.mark.slow
def test_corrupt_mnist_file_is_rejected(tmp_path):
  if not os.path.isfile(os.path.join(MNIST_DIR, data.MNIST_FILES[0])):
    pytest.skip(f'no MNIST files in {MNIST_DIR}')
  folder = tmp_path / 'mnist'
  shutil.copytree(MNIST_DIR, folder)
  damaged = folder / 't10k-labels-idx1-ubyte.gz'
  damaged.write_bytes(damaged.read_bytes()[:-100])
  with pytest.raises(jaxgan.DataError, match='checksum'):
    jaxgan.load_mnist('test', data_dir=str(tmp_path / 'tfds'),
                      mnist_dir=str(folder))
