"""Input validation at the API boundary and in the example.

Property-based tests (hypothesis) throw random shapes, dtypes and settings
at the validators: each input is either accepted or refused with an error
that names the problem, and never fails some other way. A table of bad
invocations of the example checks that each ends with one message and leaves
a trained workdir's checkpoints byte for byte as they were.
"""

import hashlib
import os
import shutil
import subprocess
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

import jaxgan
from jaxgan import metrics
from conftest import REPO

EXAMPLE = os.path.join(REPO, 'examples', 'mnist_dcgan.py')
_DTYPES = [np.uint8, np.int8, np.int32, np.int64, np.float16, np.float32,
           np.float64, np.bool_, np.complex64]
_SHAPES = st.lists(st.sampled_from([1, 2, 3, 27, 28, 29]), min_size=0,
                   max_size=5).map(tuple)


def _valid_image_batch(shape, dtype) -> bool:
  return (len(shape) == 4 and shape[1:] == (28, 28, 1)
          and (dtype == np.uint8 or np.issubdtype(dtype, np.floating)))


@settings(max_examples=150, deadline=None)
@given(shape=_SHAPES, dtype=st.sampled_from(_DTYPES))
def test_train_step_images_are_accepted_or_refused_by_name(shape, dtype):
  images = np.zeros(shape, dtype)
  if _valid_image_batch(shape, dtype):
    out = jaxgan.to_float_images(images)
    assert out.shape == shape and out.dtype == np.float32
    return
  with pytest.raises(ValueError) as error:
    jaxgan.to_float_images(images)
  message = str(error.value)
  assert ('shape [B, 28, 28, 1]' in message) or ('dtype' in message)


@settings(max_examples=150, deadline=None)
@given(shape=_SHAPES, dtype=st.sampled_from(_DTYPES),
       low=st.floats(-3, 3), high=st.floats(-3, 3))
def test_metric_images_are_accepted_or_refused_by_name(shape, dtype, low,
                                                       high):
  rng = np.random.default_rng(0)
  if np.issubdtype(dtype, np.floating):
    images = rng.uniform(min(low, high), max(low, high), shape).astype(dtype)
  else:
    images = np.zeros(shape, dtype)
  squeezed_ok = len(shape) == 3 and shape[1:] == (28, 28)
  shape_ok = (len(shape) == 4 and shape[1:] == (28, 28, 1)) or squeezed_ok
  dtype_ok = dtype == np.uint8 or np.issubdtype(dtype, np.floating)
  in_range = (not np.issubdtype(dtype, np.floating) or images.size == 0 or (
      images.min() >= -1.001 and images.max() <= 1.001))
  if shape_ok and dtype_ok and in_range:
    out = metrics.as_classifier_input(images)
    assert out.shape == (shape[0], 28, 28, 1) and out.dtype == np.float32
    assert out.size == 0 or (out.min() >= -1.001 and out.max() <= 1.001)
    return
  with pytest.raises(jaxgan.JaxganError) as error:
    metrics.as_classifier_input(images)
  message = str(error.value)
  if not shape_ok:
    assert 'must be [N, 28, 28, 1]' in message
  elif not dtype_ok:
    assert 'uint8 in [0, 255] or float in [-1, 1]' in message
  else:
    assert 'must be in [-1, 1]' in message and 'x * 2 - 1' in message


_SIZE_FIELDS = ('noise_dim', 'generator_hidden_dim', 'generator_base_channels',
                'generator_conv_channels', 'discriminator_channels_1',
                'discriminator_channels_2', 'batch_size', 'penalty_every',
                'n_critic')


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(_SIZE_FIELDS),
       value=st.one_of(st.integers(-10, 10), st.integers(2**20 - 2, 2**31),
                       st.floats(allow_nan=True), st.booleans(), st.none()))
def test_config_sizes_are_checked_by_name(field, value):
  valid = (isinstance(value, int) and not isinstance(value, bool)
           and 1 <= value <= 2**20)
  if valid:
    assert getattr(jaxgan.DCGANConfig(**{field: value}), field) == value
    return
  with pytest.raises(ValueError, match=f'{field} must be an integer in'):
    jaxgan.DCGANConfig(**{field: value})


@settings(max_examples=200, deadline=None)
@given(learning_rate=st.floats(allow_nan=True, allow_infinity=True),
       beta1=st.floats(allow_nan=True, allow_infinity=True))
def test_config_optimiser_settings_are_checked_by_name(learning_rate, beta1):
  lr_ok = 0.0 < learning_rate < 1.0
  beta_ok = 0.0 <= beta1 < 1.0
  if lr_ok and beta_ok:
    jaxgan.DCGANConfig(learning_rate=learning_rate, beta1=beta1)
    return
  with pytest.raises(ValueError,
                     match='learning_rate must be' if not lr_ok else 'beta1'):
    jaxgan.DCGANConfig(learning_rate=learning_rate, beta1=beta1)


@settings(max_examples=60, deadline=None)
@given(num=st.integers(3, 40), dim=st.integers(1, 6), seed=st.integers(0, 99),
       scale=st.floats(1e-3, 1e3))
def test_fcd_is_symmetric_and_non_negative(num, dim, seed, scale):
  rng = np.random.default_rng(seed)
  a = metrics.feature_statistics(rng.normal(size=(num, dim)) * scale)
  b = metrics.feature_statistics(rng.normal(size=(num, dim)) * scale + scale)
  ab, ba = metrics.frechet_distance(a, b), metrics.frechet_distance(b, a)
  assert ab >= 0.0 and np.isfinite(ab)
  assert ab == pytest.approx(ba, rel=1e-6, abs=1e-9 * scale ** 2)
  assert metrics.frechet_distance(a, a) <= 1e-8 * scale ** 2 * dim


def test_noise_of_the_wrong_size_is_refused(states):
  with pytest.raises(ValueError):
    jaxgan.generate(states[0], np.zeros((2, 7), np.float32))


@pytest.mark.parametrize('num', [0, -1, 2.0])
def test_sampling_a_non_positive_count_is_refused(states, num):
  with pytest.raises(ValueError, match='num .* must be a positive integer'):
    jaxgan.sample(states[0], jax.random.key(0), num)


# The example, against a trained workdir. -------------------------------------


def _tree_digest(folder: str) -> str:
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, folder).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def _run(*flags):
  return subprocess.run([sys.executable, EXAMPLE, *flags, '--noprogress'],
                        capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, mnist_data_dir):
  workdir = str(tmp_path_factory.mktemp('validation') / 'run')
  result = _run(f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
                '--steps_per_epoch=2', '--num_epochs=1', '--eval_samples=100')
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize('flags, message', [
    (['--batch_size=32', '--num_epochs=2'], 'batch_size: checkpoint has 64'),
    (['--steps_per_epoch=3', '--num_epochs=2', '--checkpoint_every_steps=1'],
     'would change its data order'),
    (['--learning_rate=0'], 'learning_rate must be in (0, 1)'),
    (['--beta1=1.5'], 'beta1 must be in [0, 1)'),
    (['--batch_size=0'], 'batch_size'),
    (['--num_epochs=-3'], 'num_epochs'),
    (['--eval_samples=-1'], 'eval_samples'),
    (['--phase=sample'], '<train|discriminator|test>'),
    (['--on_divergence=ignore'], '<stop|rollback>'),
    (['--num_test_samples=1', '--phase=test'], 'num_test_samples'),
    (['--unknown_flag=1'], 'unknown_flag'),
])
def test_bad_invocations_leave_the_workdir_untouched(
    trained_workdir, mnist_data_dir, flags, message):
  checkpoints = os.path.join(trained_workdir, 'checkpoints')
  before = _tree_digest(checkpoints), _tree_digest(
      os.path.join(trained_workdir, 'best'))
  result = _run(f'--workdir={trained_workdir}',
                f'--data_dir={mnist_data_dir}', *flags)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert (_tree_digest(checkpoints), _tree_digest(
      os.path.join(trained_workdir, 'best'))) == before


@pytest.mark.slow
def test_new_batch_size_beyond_the_dataset_is_refused(tmp_path,
                                                      mnist_data_dir):
  result = _run(f'--workdir={tmp_path}/run', f'--data_dir={mnist_data_dir}',
                '--batch_size=70000')
  assert result.returncode == 2
  assert 'more than the dataset size 60000' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_corrupt_mnist_dir_is_refused_by_the_example(tmp_path):
  mnist_dir = tmp_path / 'mnist'
  mnist_dir.mkdir()
  source = os.environ.get('JAXGAN_MNIST_DIR', os.path.join(
      REPO, '..', 'shared', 'datasets', 'mnist'))
  for name in jaxgan.data.MNIST_FILES:
    if name.startswith('t10k-labels'):
      (mnist_dir / name).write_bytes(b'not gzip at all')
    else:
      shutil.copy(os.path.join(source, name), mnist_dir)
  result = _run(f'--workdir={tmp_path}/run', f'--data_dir={tmp_path}/tfds',
                f'--mnist_dir={mnist_dir}')
  assert result.returncode == 2
  assert 'could not prepare MNIST' in result.stderr
  assert 'checksums' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '1')
