"""The shipped MNIST classifier and the FCD / score / coverage metrics."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg

import jaxgan
from jaxgan import classifier as classifier_lib
from jaxgan import metrics


def _reference_fcd(features1, features2):
  """FID as commonly written: numpy moments and scipy's sqrtm of S1 S2."""
  mu1, mu2 = features1.mean(0), features2.mean(0)
  s1 = np.cov(features1, rowvar=False)
  s2 = np.cov(features2, rowvar=False)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # sqrtm warns on singular products.
    root = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(root.real))


def _gaussian_features(seed, num=2000, dim=16, shift=0.0):
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return rng.normal(size=(num, dim)) @ mixing + shift


# Frechet distance on features. ---------------------------------------------


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_fcd_matches_numpy_scipy_reference(seed):
  a = _gaussian_features(seed)
  b = _gaussian_features(seed + 100, shift=0.3)
  ours = metrics.frechet_distance(metrics.feature_statistics(a),
                                  metrics.feature_statistics(b))
  assert ours == pytest.approx(_reference_fcd(a, b), rel=1e-6)
  assert ours > 0.1


def test_fcd_of_a_set_with_itself_is_zero_and_fcd_is_symmetric():
  a = metrics.feature_statistics(_gaussian_features(0))
  b = metrics.feature_statistics(_gaussian_features(1, shift=1.0))
  assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
  assert metrics.frechet_distance(a, b) == pytest.approx(
      metrics.frechet_distance(b, a), rel=1e-9)


def test_fcd_of_shifted_means_is_the_squared_shift():
  # Same covariance, means 2 apart in one coordinate: distance exactly 4.
  features = _gaussian_features(3)
  moved = features.copy()
  moved[:, 0] += 2.0
  assert metrics.frechet_distance(
      metrics.feature_statistics(features),
      metrics.feature_statistics(moved)) == pytest.approx(4.0, rel=1e-9)


def test_fcd_handles_singular_covariances():
  # Features that live in a 3-dimensional subspace of 16 (like dead ReLUs).
  rng = np.random.default_rng(0)
  a = np.zeros((500, 16))
  a[:, :3] = rng.normal(size=(500, 3))
  b = np.zeros((500, 16))
  b[:, :3] = rng.normal(size=(500, 3)) * 2.0
  distance = metrics.frechet_distance(metrics.feature_statistics(a),
                                      metrics.feature_statistics(b))
  assert np.isfinite(distance)
  assert distance == pytest.approx(_reference_fcd(a, b), rel=1e-6)


def test_moments_accumulated_in_batches_equal_one_pass():
  # A large common offset is where naive sum-of-squares covariances fail.
  features = _gaussian_features(4, num=3000) + 1e4
  accumulator = metrics._MomentAccumulator()
  for start in range(0, len(features), 700):
    accumulator.add(features[start:start + 700])
  streamed = accumulator.result()
  assert streamed.count == 3000
  np.testing.assert_allclose(streamed.mean, features.mean(0), rtol=1e-12)
  np.testing.assert_allclose(streamed.covariance,
                             np.cov(features, rowvar=False), rtol=1e-9,
                             atol=1e-9)


def test_feature_statistics_round_trip(tmp_path):
  stats = metrics.feature_statistics(_gaussian_features(5))
  path = str(tmp_path / 'stats.npz')
  stats.save(path)
  loaded = metrics.FeatureStatistics.load(path)
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  np.testing.assert_array_equal(loaded.covariance, stats.covariance)
  assert loaded.count == stats.count


# Score and coverage on constructed probabilities. ----------------------------


def test_score_of_confident_even_predictions_is_the_class_count():
  probabilities = np.repeat(np.eye(10), 7, axis=0)
  assert metrics.classifier_score(probabilities) == pytest.approx(10.0)


def test_score_of_one_repeated_class_is_one():
  probabilities = np.tile(np.eye(10)[3], (50, 1))
  assert metrics.classifier_score(probabilities) == pytest.approx(1.0)


def test_score_of_uniform_uncertainty_is_one():
  assert metrics.classifier_score(np.full((20, 10), 0.1)) == pytest.approx(1.0)


def test_score_matches_its_definition():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 10)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  marginal = p.mean(0)
  expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), 1)))
  assert metrics.classifier_score(p) == pytest.approx(expected, rel=1e-10)


def test_coverage_counts_classes_present():
  # 4 digits predicted 25 times each, one digit once, the rest never.
  labels = np.array([0] * 25 + [1] * 25 + [2] * 25 + [7] * 25 + [9])
  probabilities = np.eye(10)[labels] * 0.9 + 0.01
  coverage = metrics.mode_coverage(probabilities)
  histogram = np.array(coverage['class_histogram'])
  np.testing.assert_allclose(histogram[[0, 1, 2, 7]], 25 / 101)
  assert histogram[9] == pytest.approx(1 / 101)
  # The single 9 is under a tenth of its uniform share (10.1 images).
  assert coverage['classes_present'] == 4
  assert metrics.mode_coverage(probabilities, min_share=0.0)[
      'classes_present'] == 5
  assert coverage['mean_confidence'] == pytest.approx(0.91)
  expected_kl = np.sum(histogram[histogram > 0] * np.log(
      histogram[histogram > 0] * 10))
  assert coverage['class_kl_from_uniform'] == pytest.approx(expected_kl)


def test_coverage_of_even_and_collapsed_sets():
  even = metrics.mode_coverage(np.repeat(np.eye(10), 3, axis=0))
  assert even['classes_present'] == 10
  assert even['class_kl_from_uniform'] == pytest.approx(0.0, abs=1e-12)
  collapsed = metrics.mode_coverage(np.tile(np.eye(10)[5], (30, 1)))
  assert collapsed['classes_present'] == 1
  assert collapsed['class_kl_from_uniform'] == pytest.approx(np.log(10))


# Input checks. ------------------------------------------------------------------


@pytest.mark.parametrize('images, message', [
    (np.zeros((4, 32, 32, 1), np.float32), 'must be \\[N, 28, 28, 1\\]'),
    (np.zeros((4, 28, 28, 3), np.uint8), 'must be \\[N, 28, 28, 1\\]'),
    (np.zeros((28, 28), np.uint8), 'must be \\[N, 28, 28, 1\\]'),
    (np.zeros((4, 28, 28, 1), np.int32), 'uint8 in \\[0, 255\\] or float'),
    (np.full((4, 28, 28, 1), 255.0, np.float32), 'must be in \\[-1, 1\\]'),
    (np.full((4, 28, 28, 1), np.nan, np.float32), 'NaN'),
])
def test_bad_images_are_refused_with_the_fix(images, message):
  with pytest.raises(jaxgan.JaxganError, match=message):
    metrics.as_classifier_input(images)


def test_uint8_and_float_inputs_agree():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  as_float = images[..., None].astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(metrics.as_classifier_input(images),
                                metrics.as_classifier_input(as_float))


def test_sampler_needs_a_key_and_a_count():
  reference = metrics.feature_statistics(np.random.default_rng(0).normal(
      size=(10, 128)))
  with pytest.raises(jaxgan.JaxganError, match='num_samples and key'):
    metrics.evaluate(lambda key, n: None, reference)


# The shipped classifier. ------------------------------------------------------


def test_shipped_classifier_loads_offline_and_records_its_making():
  classifier = classifier_lib.load_classifier()
  info = classifier.info
  assert info['test_accuracy'] >= 0.99
  assert info['script'].startswith('examples/mnist_classifier.py')
  assert info['train_config']['seed'] == 0
  size = os.path.getsize(os.path.join(classifier_lib.ASSET_DIR,
                                      classifier_lib.WEIGHTS_FILE))
  assert size < 2_000_000
  features, probabilities = classifier_lib.classify(
      classifier.module, classifier.params, np.zeros((2, 28, 28, 1)))
  assert features.shape == (2, 128) and probabilities.shape == (2, 10)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_damaged_classifier_weights_are_refused(tmp_path):
  for name in (classifier_lib.WEIGHTS_FILE, classifier_lib.INFO_FILE):
    shutil.copy(os.path.join(classifier_lib.ASSET_DIR, name), tmp_path)
  with open(tmp_path / classifier_lib.WEIGHTS_FILE, 'r+b') as f:
    f.seek(1000)
    f.write(b'\x00\x01\x02')
  with pytest.raises(jaxgan.JaxganError, match='does not match the sha256'):
    classifier_lib.load_classifier(str(tmp_path))
  with pytest.raises(jaxgan.JaxganError, match='Cannot read'):
    classifier_lib.load_classifier(str(tmp_path / 'missing'))


# Real MNIST. -----------------------------------------------------------------


@pytest.fixture(scope='module')
def mnist(mnist_data_dir):
  train, _ = jaxgan.load_mnist('train[:10000]', data_dir=mnist_data_dir)
  test, test_labels = jaxgan.load_mnist('test', data_dir=mnist_data_dir)
  return train, test, test_labels


def test_shipped_classifier_reaches_99_percent_on_the_test_set(mnist):
  _, test, labels = mnist
  assert len(test) == 10_000
  accuracy = classifier_lib.accuracy(classifier_lib.load_classifier(), test,
                                     labels)
  assert accuracy >= 0.99
  recorded = classifier_lib.load_classifier().info['test_accuracy']
  assert accuracy == pytest.approx(recorded, abs=2e-4)


def test_metrics_of_real_digits_noise_and_one_digit(mnist, mnist_data_dir):
  train, test, labels = mnist
  reference = metrics.mnist_reference_statistics(data_dir=mnist_data_dir)
  assert reference.count == 10_000

  real = metrics.evaluate(train, reference)
  assert real.num_images == 10_000
  noise = metrics.evaluate(
      np.random.default_rng(0).uniform(-1, 1, (2000, 28, 28, 1)), reference)
  assert real.fcd < noise.fcd / 50
  assert real.classes_present == 10
  assert real.class_kl_from_uniform < 0.01

  on_test = metrics.evaluate(test, reference)
  assert on_test.fcd == pytest.approx(0.0, abs=1e-6)
  assert on_test.classifier_score > 9.5

  ones = test[labels == 1][:500]
  single = metrics.evaluate(ones, reference)
  assert single.classifier_score == pytest.approx(1.0, abs=0.1)
  assert single.classes_present == 1
  assert single.fcd > 10 * real.fcd


def test_reference_statistics_are_cached(mnist_data_dir):
  first = metrics.mnist_reference_statistics(data_dir=mnist_data_dir)
  cache = jaxgan.data.cache_dir(mnist_data_dir)
  names = [n for n in os.listdir(cache) if n.startswith('fcd_stats_test_')]
  assert len(names) == 1
  path = os.path.join(cache, names[0])
  # The second call reads the file: a marked copy comes back.
  marked = first._replace(count=12345)
  marked.save(path)
  assert metrics.mnist_reference_statistics(
      data_dir=mnist_data_dir).count == 12345
  # A damaged file is rebuilt, not a crash.
  with open(path, 'wb') as f:
    f.write(b'PK\x03\x04 truncated')
  rebuilt = metrics.mnist_reference_statistics(data_dir=mnist_data_dir)
  assert rebuilt.count == 10_000
  np.testing.assert_array_equal(rebuilt.covariance, first.covariance)


@pytest.fixture(scope='module')
def sampler():
  """`(key, n) -> images` of an untrained default G."""
  state_g, _ = jaxgan.DCGANConfig().create_train_states(jax.random.key(0))
  return lambda batch_key, n: jaxgan.sample(state_g, batch_key, n)


def test_evaluate_a_sampler_in_batches_equals_the_array(mnist_data_dir,
                                                        sampler):
  reference = metrics.mnist_reference_statistics(data_dir=mnist_data_dir)
  key = jax.random.key(7)
  streamed = metrics.evaluate(sampler, reference, num_samples=700, key=key,
                              batch_size=300)
  images = np.concatenate([sampler(jax.random.fold_in(key, i), n)
                           for i, n in enumerate((300, 300, 100))])
  whole = metrics.evaluate(images, reference, batch_size=700)
  assert streamed.num_images == whole.num_images == 700
  assert streamed.fcd == pytest.approx(whole.fcd, rel=1e-5)
  assert streamed.classifier_score == pytest.approx(whole.classifier_score,
                                                    rel=1e-5)
  assert streamed.class_histogram == whole.class_histogram
  json.dumps(streamed.to_dict())


def _count_waits(monkeypatch):
  """Records each fetch of device results and each range check (which reads
  a device batch's minimum and maximum): the points where the host waits."""
  calls = []

  def counted(name, function):
    def wrapper(*args):
      calls.append(name)
      return function(*args)
    return wrapper

  monkeypatch.setattr(jax, 'device_get', counted('fetch', jax.device_get))
  monkeypatch.setattr(metrics, '_check_range',
                      counted('range', metrics._check_range))
  return calls


def test_started_evaluation_queues_every_batch_and_fetches_once(
    mnist_data_dir, sampler, monkeypatch):
  reference = metrics.mnist_reference_statistics(data_dir=mnist_data_dir)
  key = jax.random.key(3)
  expected = metrics.evaluate(sampler, reference, num_samples=500, key=key,
                              batch_size=100)
  waits = _count_waits(monkeypatch)
  # On an accelerator the guard also catches any other wait for a batch.
  with jax.transfer_guard_device_to_host('disallow'):
    pending = metrics.start_evaluation(sampler, reference, num_samples=500,
                                       key=key, batch_size=100)
  assert not waits
  result = pending.result()
  assert waits == ['fetch'] + ['range'] * 5
  assert result == expected  # The same sums, in the same order.
  assert pending.result() is result and len(waits) == 6

  # A long evaluation fetches all but its newest batch whenever more than
  # the limit wait, and still adds up to the same numbers.
  monkeypatch.setattr(metrics, '_MAX_PENDING_BATCHES', 2)
  waits.clear()
  pending = metrics.start_evaluation(sampler, reference, num_samples=500,
                                     key=key, batch_size=100)
  assert waits.count('fetch') == 2 and waits.count('range') == 4
  assert pending.result() == expected
  assert waits.count('fetch') == 3 and waits.count('range') == 5


@pytest.mark.parametrize('scale, offset, message', [
    (3.0, 0.0, 'range over \\[-3, 3\\]; float images must be in \\[-1, 1\\]'),
    (1.0, np.nan, 'sampled images contain NaN'),
])
def test_started_evaluation_checks_the_range_when_fetched(
    scale, offset, message):
  reference = metrics.feature_statistics(np.random.default_rng(0).normal(
      size=(10, 128)))

  def sampler(batch_key, n):
    images = jax.random.uniform(batch_key, (n, 28, 28, 1), minval=-1.0)
    return (images.at[:, 0, 0, 0].set(1.0).at[:, 0, 1, 0].set(-1.0) * scale
            + offset)

  with jax.transfer_guard_device_to_host('disallow'):
    pending = metrics.start_evaluation(sampler, reference, num_samples=20,
                                       key=jax.random.key(0), batch_size=10)
  with pytest.raises(jaxgan.JaxganError, match=message):
    pending.result()
  with pytest.raises(jaxgan.JaxganError, match=message):
    metrics.evaluate(sampler, reference, num_samples=20,
                     key=jax.random.key(0), batch_size=10)


def test_started_conditional_accuracy_fetches_once(monkeypatch):
  state_g, _ = jaxgan.DCGANConfig(conditional=True).create_train_states(
      jax.random.key(0))

  def generate(key, labels):
    return jaxgan.sample(state_g, key, len(labels), labels)

  expected = metrics.conditional_accuracy(generate, 30, jax.random.key(1),
                                          batch_size=100)
  waits = _count_waits(monkeypatch)
  with jax.transfer_guard_device_to_host('disallow'):
    pending = metrics.start_conditional_accuracy(
        generate, 30, jax.random.key(1), batch_size=100)
  assert not waits
  assert pending.result() == expected
  assert waits == ['fetch'] + ['range'] * 3
  assert len(expected['per_class_accuracy']) == 10
  with pytest.raises(jaxgan.JaxganError, match='contain NaN'):
    metrics.conditional_accuracy(lambda key, labels: generate(key, labels)
                                 * np.nan, 3, jax.random.key(1))


# Making the classifier. -------------------------------------------------------


def test_classifier_training_is_seeded_and_learns():
  rng = np.random.default_rng(0)
  # Two classes a tiny net separates at once: dark and bright images.
  labels = np.tile([0, 1], 128)
  images = np.where(labels[:, None, None, None] == 1, 200, 20).astype(
      np.uint8) + rng.integers(0, 30, (256, 28, 28, 1), dtype=np.uint8)
  config = classifier_lib.TrainConfig(seed=3, epochs=2, batch_size=64)
  seen = []
  _, params = classifier_lib.train_classifier(
      images, labels, config, lambda *args: seen.append(args[:2]))
  _, again = classifier_lib.train_classifier(images, labels, config)
  assert seen[-1] == (2, 8) and len(seen) == 8
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  trained = (classifier_lib.MNISTClassifier(), params)
  assert classifier_lib.accuracy(trained, images, labels) == 1.0


@pytest.mark.slow
def test_classifier_script_measures_and_refuses_a_weak_model(
    tmp_path, mnist_data_dir):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  script = os.path.join(REPO, 'examples', 'mnist_classifier.py')

  def run(*flags):
    return subprocess.run(
        [sys.executable, script, f'--data_dir={mnist_data_dir}',
         '--noprogress', *flags], capture_output=True, text=True,
        timeout=600, cwd=REPO)

  measured = run('--phase=accuracy')
  assert measured.returncode == 0, measured.stderr
  assert 'MNIST test accuracy' in measured.stdout
  assert 'in 10000 images' in measured.stdout

  # 2,048 training images in one epoch cannot reach 99%: the weights are not written.
  weak = run('--phase=train', "--train_split=train[:2048]", '--epochs=1',
             f'--output_dir={tmp_path}/out')
  assert weak.returncode == 2
  assert 'below --min_accuracy' in weak.stderr
  assert not os.path.exists(tmp_path / 'out')
  written = run('--phase=train', "--train_split=train[:2048]", '--epochs=1',
                '--min_accuracy=0', f'--output_dir={tmp_path}/out')
  assert written.returncode == 0, written.stderr
  loaded = classifier_lib.load_classifier(str(tmp_path / 'out'))
  assert loaded.info['train_split'] == 'train[:2048]'
  assert 0.2 < loaded.info['test_accuracy'] < 0.99
