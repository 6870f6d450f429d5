"""MNIST through tensorflow-datasets, as uint8 arrays ready for the device.

tfds prepares MNIST once per data directory (`data_dir`, else
`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`) in the array_record format;
later runs read it back with `tfds.data_source`, which needs no TensorFlow.
Preparation takes the four original IDX files from `mnist_dir` when given
(offline, checksums verified by tfds), else downloads them.
"""

import os
import socket
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxgan.errors import DataError

MNIST_FILES = (
    'train-images-idx3-ubyte.gz',
    'train-labels-idx1-ubyte.gz',
    't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz',
)
# Where tfds downloads MNIST from; probed before a download is attempted.
_DOWNLOAD_HOST = ('storage.googleapis.com', 443)


def _check_mnist_dir(mnist_dir: str) -> str:
  mnist_dir = os.path.abspath(os.path.expanduser(mnist_dir))
  if not os.path.isdir(mnist_dir):
    raise DataError(
        f'mnist_dir {mnist_dir} is not a directory. Point it at a folder '
        f'holding the four MNIST files: {", ".join(MNIST_FILES)}.')
  missing = [f for f in MNIST_FILES
             if not os.path.isfile(os.path.join(mnist_dir, f))]
  if missing:
    raise DataError(
        f'mnist_dir {mnist_dir} lacks {", ".join(missing)}. It must hold the '
        f'four original MNIST files, gzipped, under their original names: '
        f'{", ".join(MNIST_FILES)}.')
  return mnist_dir


def _can_reach(address: tuple[str, int], timeout: float) -> bool:
  """Whether a TCP connection opens within `timeout` seconds.

  Runs in a daemon thread because name resolution ignores socket timeouts
  and can hang on machines without a network.
  """
  reached = []

  def probe():
    try:
      with socket.create_connection(address, timeout=timeout):
        reached.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(reached)


def _builder(data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder('mnist', data_dir=data_dir, file_format='array_record')


def prepare_mnist(data_dir: str | None = None, mnist_dir: str | None = None,
                  *, network_timeout: float = 5.0) -> str:
  """Makes sure MNIST is prepared in `data_dir`; prepares it if not.

  Args:
    data_dir: tfds data directory; None means tfds's default
      (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    mnist_dir: a folder with the four original IDX .gz files, used to prepare
      offline (no download, no GCS). Ignored when already prepared.
    network_timeout: seconds to wait for the download server before giving up
      (only when preparing without `mnist_dir`).

  Returns:
    The folder that holds the prepared dataset (`.../mnist/VERSION`).

  Raises:
    DataError: `mnist_dir` is missing files or they fail tfds's checksums,
      or MNIST must be downloaded and the server cannot be reached.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _builder(data_dir)
  if builder.is_prepared():
    return builder.data_dir
  if mnist_dir is not None:
    manual_dir = _check_mnist_dir(mnist_dir)
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False)
  elif not _can_reach(_DOWNLOAD_HOST, network_timeout):
    raise DataError(
        f'MNIST is not prepared in {builder.data_dir} and its download server '
        f'{_DOWNLOAD_HOST[0]} cannot be reached. Either pass '
        f'--mnist_dir=DIR (mnist_dir=DIR) naming a folder with the four '
        f'original MNIST files ({", ".join(MNIST_FILES)}) to prepare it '
        f'offline, or run once with network access.')
  else:
    config = tfds.download.DownloadConfig()
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # tfds raises a variety of types here.
    if mnist_dir is None:
      raise
    raise DataError(
        f'tfds could not prepare MNIST from {mnist_dir}: '
        f'{type(e).__name__}: {e}\nThe folder must hold the four original, '
        f'unmodified MNIST files ({", ".join(MNIST_FILES)}); tfds verifies '
        f'their checksums.') from e
  return builder.data_dir


def split_size(split: str = 'train', *, data_dir: str | None = None,
               mnist_dir: str | None = None,
               network_timeout: float = 5.0) -> int:
  """Examples in an MNIST split, from tfds's metadata (no images read).

  Args:
    split: 'train' or 'test'.
    data_dir: tfds data directory (see `prepare_mnist`).
    mnist_dir: folder with the original IDX files, for offline preparation.
    network_timeout: see `prepare_mnist`.
  """
  prepare_mnist(data_dir, mnist_dir, network_timeout=network_timeout)
  return _builder(data_dir).info.splits[split].num_examples


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  num = len(source)
  images = np.empty((num, 28, 28, 1), np.uint8)
  labels = np.empty((num,), np.int32)
  chunk = 4096
  for start in range(0, num, chunk):
    keys = list(range(start, min(start + chunk, num)))
    try:
      records = source.__getitems__(keys)
    except TypeError:  # Sources mocked by tfds.testing lack batched reads.
      records = [source[k] for k in keys]
    for k, record in zip(keys, records):
      images[k] = record['image']
      labels[k] = record['label']
  return images, labels


def load_mnist(split: str = 'train', *, data_dir: str | None = None,
               mnist_dir: str | None = None,
               network_timeout: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole MNIST split into host memory.

  The first read of a split decodes tfds's PNG records (about 10 s for the
  training split) and caches the arrays as `.npz` beside the prepared
  dataset, in `<data_dir>/mnist/<version>/jaxgan_cache/`; later reads take
  well under a second.

  Args:
    split: 'train' (60,000 images) or 'test' (10,000), or any tfds split
      expression such as 'train[:1000]'.
    data_dir: tfds data directory (see `prepare_mnist`).
    mnist_dir: folder with the original IDX files, for offline preparation.
    network_timeout: see `prepare_mnist`.

  Returns:
    `(images, labels)`: uint8 `[N, 28, 28, 1]` in [0, 255] and int32 `[N]`.

  Raises:
    DataError: see `prepare_mnist`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  folder = cache_dir(data_dir, mnist_dir, network_timeout=network_timeout)
  cache = None
  if folder is not None:
    safe_split = ''.join(c if c.isalnum() else '_' for c in split)
    cache = os.path.join(folder, f'{safe_split}.npz')
    if os.path.isfile(cache):
      try:
        with np.load(cache) as arrays:
          return arrays['images'], arrays['labels']
      except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # A damaged cache is rebuilt below.
  source = tfds.data_source('mnist', split=split, data_dir=data_dir,
                            download=False)
  images, labels = _read_split(source)
  if cache is not None:
    _write_cache(cache, images, labels)
  return images, labels


def cache_dir(data_dir: str | None = None, mnist_dir: str | None = None,
              *, network_timeout: float = 5.0) -> str | None:
  """The folder for jaxgan's caches beside the prepared MNIST, prepared first.

  Args:
    data_dir: tfds data directory (see `prepare_mnist`).
    mnist_dir: folder with the original IDX files, for offline preparation.
    network_timeout: see `prepare_mnist`.

  Returns:
    `<data_dir>/mnist/<version>/jaxgan_cache`, or None when tfds serves data
    it has not prepared on disk (`tfds.testing.mock_data`).
  """
  prepared_dir = prepare_mnist(data_dir, mnist_dir,
                               network_timeout=network_timeout)
  if not _builder(data_dir).is_prepared():
    return None
  return os.path.join(prepared_dir, 'jaxgan_cache')


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes atomically; a read-only data dir just goes without a cache."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}.npz'
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, path)
  except OSError:
    pass


def to_device(images: np.ndarray, device: jax.Device | None = None
              ) -> jax.Array:
  """Puts a dataset on the device once, as uint8 (a quarter of float32).

  Args:
    images: uint8 `[N, H, W, C]`.
    device: target device; the default device if None.

  Returns:
    The same array on the device. Batches are converted to float [-1, 1] on
    the device inside the train step (`jaxgan.to_float_images`).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise DataError(
        f'Expected uint8 images [N, H, W, C], got {images.dtype} '
        f'{images.shape}.')
  return jax.device_put(jnp.asarray(images), device)
