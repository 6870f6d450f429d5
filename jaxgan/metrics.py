"""Offline MNIST evaluation: Frechet classifier distance, score, coverage.

All three metrics look at images through jaxgan's own MNIST classifier
(`jaxgan.classifier`), so they need no download:

- Frechet classifier distance (FCD): the Frechet distance between Gaussians
  fitted to the classifier's penultimate features of two image sets, the FID
  recipe with an MNIST network in place of Inception. Lower is better; two
  disjoint sets of real digits score near the floor.
- Classifier score: `exp(E_x KL(p(y|x) || p(y)))`, the Inception-score
  analogue. 10 means confident predictions spread evenly over the digits; 1
  means every image looks the same to the classifier.
- Mode coverage: the histogram of predicted digits, how many digits appear,
  its KL divergence from uniform, and the mean confidence.

The classifier runs jitted over batches; the sufficient statistics (feature
moments, probability sums, prediction counts) are accumulated on the host in
float64, and a small host-side finish turns them into the numbers. The
batches are queued on the device without waiting for each other and fetched
in groups, so the device never idles between them; `start_evaluation` returns
once all of them are queued, so a training loop can queue its next steps
behind them and collect the numbers while those run.

Example:
  >>> reference = jaxgan.metrics.mnist_reference_statistics(mnist_dir=...)
  >>> result = jaxgan.metrics.evaluate(
  ...     lambda key, n: jaxgan.sample(state_g, key, n), reference,
  ...     num_samples=10_000, key=jax.random.key(0))
  >>> result.fcd, result.classifier_score, result.classes_present
"""

import functools
import os
import zipfile
from typing import Any, Callable, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgan import classifier as classifier_lib
from jaxgan.errors import JaxganError

NUM_CLASSES = classifier_lib.NUM_CLASSES
IMAGE_SHAPE = (28, 28, 1)
# A digit counts as present when it takes at least this fraction of its
# uniform share (10% of 1/10 of the samples): a handful of stray
# predictions should not hide a collapsed mode.
DEFAULT_MIN_SHARE = 0.1
# Batches whose results wait on the device before the host fetches them (all
# but the newest, which keeps the device busy meanwhile): enough for a
# 10,000-image evaluation in batches of 500 to be fetched once, few enough
# to bound the device memory the features of a long evaluation hold.
_MAX_PENDING_BATCHES = 32

_T = TypeVar('_T')


class FeatureStatistics(NamedTuple):
  """Mean and covariance of classifier features, in float64.

  Attributes:
    mean: `[F]`.
    covariance: `[F, F]` (unbiased, divided by count - 1).
    count: number of images.
  """
  mean: np.ndarray
  covariance: np.ndarray
  count: int

  def save(self, path: str) -> None:
    """Writes the statistics to an `.npz` file, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}.npz'
    np.savez(tmp, mean=self.mean, covariance=self.covariance,
             count=self.count)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> 'FeatureStatistics':
    with np.load(path) as arrays:
      return cls(arrays['mean'], arrays['covariance'], int(arrays['count']))


class EvalResult(NamedTuple):
  """Metrics of one image set.

  Attributes:
    fcd: Frechet classifier distance to the reference statistics.
    classifier_score: `exp(E KL(p(y|x) || p(y)))`, in [1, 10].
    classes_present: digits predicted for at least one image and at least
      `min_share` of their uniform share of the images.
    class_kl_from_uniform: KL(histogram || uniform) of the predicted digits,
      in nats; 0 for a perfectly even spread, log(10) = 2.30 for one digit.
    mean_confidence: mean of the top class probability.
    class_histogram: fraction of images predicted as each digit, `[10]`.
    num_images: how many images were evaluated.
  """
  fcd: float
  classifier_score: float
  classes_present: int
  class_kl_from_uniform: float
  mean_confidence: float
  class_histogram: tuple[float, ...]
  num_images: int

  def to_dict(self) -> dict[str, Any]:
    return {**self._asdict(), 'class_histogram': list(self.class_histogram)}


class _MomentAccumulator:
  """Streams feature batches into a shifted float64 mean and covariance.

  The first batch's mean is subtracted from every feature before the sums,
  so the covariance does not lose digits to cancellation when the features
  have a large mean.
  """

  def __init__(self):
    self.count = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def add(self, features: np.ndarray) -> None:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f'features must be [N, F], got {features.shape}.')
    if self._shift is None:
      self._shift = features.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((features.shape[1],) * 2)
    centred = features - self._shift
    self.count += len(features)
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred

  def result(self) -> FeatureStatistics:
    if self.count < 2:
      raise ValueError(f'Need at least 2 feature vectors, got {self.count}.')
    mean_centred = self._sum / self.count
    covariance = (self._outer - self.count * np.outer(
        mean_centred, mean_centred)) / (self.count - 1)
    return FeatureStatistics(mean_centred + self._shift,
                             (covariance + covariance.T) / 2, self.count)


def feature_statistics(features: Any) -> FeatureStatistics:
  """Mean and covariance of features `[N, F]` (float64, host)."""
  accumulator = _MomentAccumulator()
  accumulator.add(np.asarray(features))
  return accumulator.result()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix."""
  eigenvalues, vectors = np.linalg.eigh(matrix)
  # Rounding leaves eigenvalues of a singular covariance slightly negative.
  return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(first: FeatureStatistics,
                     second: FeatureStatistics) -> float:
  """Frechet distance between the Gaussians of two feature statistics.

  `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`, in float64. The
  trace of the square root uses `(S1 S2)^(1/2) ~ S1^(1/2) S2 S1^(1/2)`
  (similar matrices, same eigenvalues), a symmetric PSD matrix, so both
  square roots are eigendecompositions of symmetric matrices and the result
  is symmetric in its arguments up to rounding.

  Args:
    first: statistics of one set.
    second: statistics of the other.

  Returns:
    The distance (>= 0).
  """
  mean1 = np.asarray(first.mean, np.float64)
  mean2 = np.asarray(second.mean, np.float64)
  cov1 = np.asarray(first.covariance, np.float64)
  cov2 = np.asarray(second.covariance, np.float64)
  if mean1.shape != mean2.shape or cov1.shape != cov2.shape:
    raise ValueError(f'Statistics of different feature sizes: {mean1.shape} '
                     f'and {mean2.shape}.')
  root1 = _sqrt_psd((cov1 + cov1.T) / 2)
  middle = root1 @ cov2 @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  diff = mean1 - mean2
  distance = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt
  return float(max(distance, 0.0))


def classifier_score(probabilities: Any) -> float:
  """`exp(E_x KL(p(y|x) || p(y)))` of class probabilities `[N, 10]`."""
  stats = _ClassAccumulator()
  stats.add_probabilities(np.asarray(probabilities))
  return stats.score()


def mode_coverage(probabilities: Any, min_share: float = DEFAULT_MIN_SHARE
                  ) -> dict[str, Any]:
  """Class histogram, digits present, KL from uniform, mean confidence.

  Args:
    probabilities: class probabilities `[N, C]`.
    min_share: a class counts as present when predicted at all and for at
      least this fraction of its uniform share `N / C`.

  Returns:
    A dict with `class_histogram` (`[C]` fractions), `classes_present`,
    `class_kl_from_uniform` (nats) and `mean_confidence`.
  """
  stats = _ClassAccumulator()
  stats.add_probabilities(np.asarray(probabilities))
  return stats.coverage(min_share)


class _ClassAccumulator:
  """Host float64 sums of what the score and the coverage need."""

  def __init__(self):
    self.count = 0
    self.probability_sum = None
    self.negative_entropy_sum = 0.0
    self.prediction_counts = None
    self.confidence_sum = 0.0

  def add(self, probability_sum, negative_entropy_sum, prediction_counts,
          confidence_sum, count) -> None:
    if self.probability_sum is None:
      self.probability_sum = np.zeros(len(probability_sum))
      self.prediction_counts = np.zeros(len(prediction_counts), np.int64)
    self.count += int(count)
    self.probability_sum += np.asarray(probability_sum, np.float64)
    self.negative_entropy_sum += float(negative_entropy_sum)
    self.prediction_counts += np.asarray(prediction_counts, np.int64)
    self.confidence_sum += float(confidence_sum)

  def add_probabilities(self, probabilities: np.ndarray) -> None:
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.ndim != 2:
      raise ValueError(
          f'probabilities must be [N, C], got {probabilities.shape}.')
    num_classes = probabilities.shape[1]
    self.add(probabilities.sum(0), np.sum(_xlogx(probabilities)),
             np.bincount(probabilities.argmax(1), minlength=num_classes),
             probabilities.max(1).sum(), len(probabilities))

  def score(self) -> float:
    marginal = self.probability_sum / self.count
    # E_x KL(p(y|x) || p(y)) = E_x sum p log p - sum p(y) log p(y).
    mean_kl = self.negative_entropy_sum / self.count - np.sum(_xlogx(marginal))
    return float(np.exp(max(mean_kl, 0.0)))

  def coverage(self, min_share: float) -> dict[str, Any]:
    num_classes = len(self.prediction_counts)
    histogram = self.prediction_counts / self.count
    uniform = 1.0 / num_classes
    return {
        'class_histogram': tuple(float(h) for h in histogram),
        'classes_present': int(np.sum(
            (self.prediction_counts > 0) & (histogram >= min_share * uniform))),
        'class_kl_from_uniform': float(np.sum(
            _xlogx(histogram) - histogram * np.log(uniform))),
        'mean_confidence': self.confidence_sum / self.count,
    }


def _xlogx(p):
  """p log p with 0 log 0 = 0, for numpy or jax arrays."""
  xp = jnp if isinstance(p, jax.Array) else np
  return xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _batch_statistics(module, params, images):
  """The images' range, their features and class sums, on the device."""
  features, logits = module.apply({'params': params}, images)
  probabilities = jax.nn.softmax(logits)
  log_probabilities = jax.nn.log_softmax(logits)
  predictions = jnp.argmax(logits, -1)
  return ((images.min(), images.max()),
          (features,
           probabilities.sum(0),
           jnp.sum(probabilities * log_probabilities),
           jnp.zeros(NUM_CLASSES, jnp.int32).at[predictions].add(1),
           probabilities.max(-1).sum()))


def as_classifier_input(images: Any, name: str = 'images') -> np.ndarray:
  """Checks an image batch and brings it to float32 [-1, 1].

  Args:
    images: `[N, 28, 28, 1]` or `[N, 28, 28]`; uint8 in [0, 255] (MNIST as
      loaded) or float in [-1, 1] (as the generator makes them).
    name: what to call the images in error messages.

  Returns:
    float32 `[N, 28, 28, 1]` in [-1, 1] (a numpy array or, for a jax input,
    a jax array).

  Raises:
    JaxganError: wrong rank, size or dtype, or float values outside [-1, 1].
  """
  images, needs_range_check = _classifier_input(images, name)
  if needs_range_check and images.size:
    _check_range(name, float(images.min()), float(images.max()))
  return images


def _classifier_input(images: Any, name: str) -> tuple[Any, bool]:
  """`as_classifier_input` without the range check, which a device array
  would pay for with a wait for the device; returns `(images, whether the
  range still needs checking)`."""
  xp = jnp if isinstance(images, jax.Array) else np
  images = images if isinstance(images, jax.Array) else np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise JaxganError(
        f'{name} must be [N, 28, 28, 1] (or [N, 28, 28]) MNIST-sized images, '
        f'got shape {tuple(images.shape)}. Reshape or resize them first.')
  if images.dtype == np.uint8:
    return images.astype(xp.float32) / 127.5 - 1.0, False
  if not xp.issubdtype(images.dtype, xp.floating):
    raise JaxganError(
        f'{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype '
        f'{images.dtype}.')
  return images.astype(xp.float32), True


def _check_range(name: str, low: float, high: float) -> None:
  """Raises unless [low, high] is finite and within [-1, 1] (to 1e-3)."""
  if not (np.isfinite(low) and np.isfinite(high)):
    raise JaxganError(f'{name} contain NaN or infinite values.')
  if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
    raise JaxganError(
        f'{name} range over [{low:.3g}, {high:.3g}]; float images must be '
        'in [-1, 1] (the generator\'s tanh range). Map [0, 1] images with '
        'x * 2 - 1, or pass uint8 [0, 255].')


class Pending(Generic[_T]):
  """A result whose device work is queued; `result()` waits and finishes it.

  Made by `start_evaluation` and `start_conditional_accuracy`. It holds
  only the outputs of the queued work, so the caller may go on to queue
  calls that donate or replace the states that work read: JAX runs them
  after it.
  """

  def __init__(self, finish: Callable[[], _T]):
    self._finish = finish
    self._result = None
    self._done = False

  def result(self) -> _T:
    """The result; waits for the queued device work the first time."""
    if not self._done:
      self._result, self._finish = self._finish(), None
      self._done = True
    return self._result


class _SetAccumulator:
  """Everything the metrics need from one image set, fed batch by batch.

  `add` queues a batch's device work and returns; the results wait on the
  device and are fetched together (`_MAX_PENDING_BATCHES`, and `finish`), in
  the order the batches came, so the sums are the same as batch by batch.
  """

  def __init__(self, classifier: classifier_lib.Classifier):
    self.classifier = classifier
    self.moments = _MomentAccumulator()
    self.classes = _ClassAccumulator()
    self._pending = []

  def add(self, images, name: str, check_range: bool) -> None:
    """Queues `images` (float32 `[N, 28, 28, 1]`); `check_range`: whether
    their range still has to be checked (when the batch is fetched)."""
    outputs = _batch_statistics(self.classifier.module,
                                self.classifier.params, images)
    self._pending.append((name if check_range else None, outputs))
    if len(self._pending) > _MAX_PENDING_BATCHES:
      self._fetch(len(self._pending) - 1)

  def finish(self) -> '_SetAccumulator':
    """Fetches every queued batch; raises unless there were 2 images."""
    self._fetch(len(self._pending))
    if self.moments.count < 2:
      raise JaxganError(f'Need at least 2 images to evaluate, got '
                        f'{self.moments.count}.')
    return self

  def _fetch(self, num_batches: int) -> None:
    batches, self._pending = (self._pending[:num_batches],
                              self._pending[num_batches:])
    for name, ((low, high), (features, *sums)) in jax.device_get(batches):
      if name is not None and len(features):
        _check_range(name, float(low), float(high))
      self.moments.add(features)
      self.classes.add(*sums, count=len(features))


def _batches(source, num_samples, key, batch_size):
  """Yields `(images, name, check_range)`: float32 [-1, 1] batches from an
  array or a sampler, each with its name for errors and whether its range
  is still to be checked (device arrays: when fetched, not here)."""
  if callable(source):
    if key is None or num_samples is None:
      raise JaxganError('Evaluating a sampler needs num_samples and key.')
    for start in range(0, num_samples, batch_size):
      size = min(batch_size, num_samples - start)
      batch = source(jax.random.fold_in(key, start // batch_size), size)
      yield _checked(batch, 'sampled images', expected=size)
  else:
    images = source
    if num_samples is not None:
      images = images[:num_samples]
    for start in range(0, len(images), batch_size):
      yield _checked(images[start:start + batch_size], 'images')


def _checked(images, name: str, expected: int | None = None):
  """`(images, name, check_range)` for `_SetAccumulator.add`; host images
  are range-checked at once, device images once they are fetched."""
  if isinstance(images, jax.Array):
    images, check_range = _classifier_input(images, name)
  else:
    images, check_range = as_classifier_input(images, name), False
  if expected is not None and images.shape[0] != expected:
    raise JaxganError(f'The sampler returned {images.shape[0]} images '
                      f'when asked for {expected}.')
  return images, name, check_range


def _queue(source, num_samples, key, batch_size, classifier
           ) -> _SetAccumulator:
  """A `_SetAccumulator` with every batch of `source` queued."""
  classifier = classifier or classifier_lib.load_classifier()
  accumulator = _SetAccumulator(classifier)
  for images, name, check_range in _batches(source, num_samples, key,
                                            batch_size):
    accumulator.add(images, name, check_range)
  return accumulator


def image_statistics(images: Any, *, batch_size: int = 500,
                     classifier: classifier_lib.Classifier | None = None
                     ) -> FeatureStatistics:
  """Classifier feature statistics of an image set (e.g. a reference set).

  Args:
    images: `[N, 28, 28, 1]`, uint8 [0, 255] or float [-1, 1].
    batch_size: images per classifier call.
    classifier: the classifier; the shipped one if None.

  Returns:
    The set's feature mean and covariance.
  """
  return _queue(images, None, None, batch_size,
                classifier).finish().moments.result()


def evaluate(source: Any, reference: FeatureStatistics, *,
             num_samples: int | None = None, key: jax.Array | None = None,
             batch_size: int = 500, min_share: float = DEFAULT_MIN_SHARE,
             classifier: classifier_lib.Classifier | None = None
             ) -> EvalResult:
  """FCD against `reference`, classifier score and coverage of an image set.

  Args:
    source: images `[N, 28, 28, 1]` (uint8 [0, 255] or float [-1, 1]), or a
      sampler `sample_fn(key, n) -> [n, 28, 28, 1]` float images, called
      with `fold_in(key, i)` for the i-th batch.
    reference: feature statistics of the real images to compare with, e.g.
      `mnist_reference_statistics()`.
    num_samples: images to evaluate; required for a sampler, a cap for an
      array.
    key: PRNG key for a sampler.
    batch_size: images per call.
    min_share: see `mode_coverage`.
    classifier: the classifier; the shipped one if None.

  Returns:
    The metrics.

  Raises:
    JaxganError: invalid images, or a sampler without `num_samples`/`key`.
  """
  return start_evaluation(
      source, reference, num_samples=num_samples, key=key,
      batch_size=batch_size, min_share=min_share,
      classifier=classifier).result()


def start_evaluation(source: Any, reference: FeatureStatistics, *,
                     num_samples: int | None = None,
                     key: jax.Array | None = None, batch_size: int = 500,
                     min_share: float = DEFAULT_MIN_SHARE,
                     classifier: classifier_lib.Classifier | None = None
                     ) -> Pending[EvalResult]:
  """`evaluate`, returning as soon as its device work is queued.

  Work queued on the device after this call (the next training steps) runs
  behind the evaluation's, and `result()` collects the metrics while it
  runs. An evaluation of more than `_MAX_PENDING_BATCHES` batches fetches
  the older ones before it returns, to bound the device memory it holds.

  Args:
    source, reference, num_samples, key, batch_size, min_share, classifier:
      as for `evaluate`.

  Returns:
    A `Pending` whose `result()` is `evaluate`'s `EvalResult`.

  Raises:
    JaxganError: here for a wrong shape or dtype, or a sampler without
      `num_samples`/`key`; from `result()` for values outside [-1, 1], NaN
      or fewer than 2 images.
  """
  accumulator = _queue(source, num_samples, key, batch_size, classifier)

  def finish() -> EvalResult:
    accumulator.finish()
    coverage = accumulator.classes.coverage(min_share)
    return EvalResult(
        fcd=frechet_distance(accumulator.moments.result(), reference),
        classifier_score=accumulator.classes.score(),
        num_images=accumulator.moments.count, **coverage)

  return Pending(finish)


def mnist_reference_statistics(split: str = 'test', *,
                               data_dir: str | None = None,
                               mnist_dir: str | None = None,
                               cache_dir: str | None = None,
                               classifier: classifier_lib.Classifier | None
                               = None) -> FeatureStatistics:
  """Feature statistics of an MNIST split, computed once and cached.

  The cache file is named after the split and the classifier's weights hash,
  so new weights never meet stale statistics.

  Args:
    split: tfds split, 'test' (10,000 images) by default.
    data_dir: tfds data dir (see `jaxgan.load_mnist`).
    mnist_dir: folder with the original MNIST files, for offline preparation.
    cache_dir: where to cache; by default beside the prepared dataset.
    classifier: the classifier; the shipped one if None.

  Returns:
    The split's feature statistics.
  """
  from jaxgan import data  # pylint: disable=g-import-not-at-top
  classifier = classifier or classifier_lib.load_classifier()
  if cache_dir is None:
    cache_dir = data.cache_dir(data_dir, mnist_dir)
  path = None
  # Without a recorded weights hash, different weights could share a file.
  if cache_dir is not None and 'weights_sha256' in classifier.info:
    safe_split = ''.join(c if c.isalnum() else '_' for c in split)
    digest = classifier.info['weights_sha256'][:16]
    path = os.path.join(cache_dir, f'fcd_stats_{safe_split}_{digest}.npz')
    if os.path.isfile(path):
      try:
        cached = FeatureStatistics.load(path)
        features = classifier.module.features
        if (cached.mean.shape == (features,)
            and cached.covariance.shape == (features, features)):
          return cached
      except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # A damaged cache is rebuilt below.
  images, _ = data.load_mnist(split, data_dir=data_dir, mnist_dir=mnist_dir)
  statistics = image_statistics(images, classifier=classifier)
  if path is not None:
    try:
      statistics.save(path)
    except OSError:
      pass  # A read-only cache dir just goes without a cache.
  return statistics


@functools.partial(jax.jit, static_argnums=0)
def _predictions(module, params, images):
  """The images' range and the predicted digits `[N]`, on the device."""
  return ((images.min(), images.max()),
          jnp.argmax(module.apply({'params': params}, images)[1], -1))


def conditional_accuracy(generate_fn: Callable[[jax.Array, jax.Array], Any],
                         num_per_class: int, key: jax.Array,
                         num_classes: int = NUM_CLASSES,
                         batch_size: int = 500,
                         classifier: classifier_lib.Classifier | None = None
                         ) -> dict[str, Any]:
  """How often the classifier sees the requested digit in conditional samples.

  Asks a class-conditional generator for `num_per_class` images of every
  class and compares the classifier's predictions with the requested labels.

  Args:
    generate_fn: `(key, labels [n]) -> images [n, 28, 28, 1]` in [-1, 1].
    num_per_class: images per class.
    key: PRNG key; batch i gets `fold_in(key, i)`.
    num_classes: classes asked for.
    batch_size: images per call of `generate_fn`.
    classifier: the classifier (default: the shipped one).

  Returns:
    `{'accuracy': mean over classes, 'per_class_accuracy': [num_classes]}`.
  """
  return start_conditional_accuracy(
      generate_fn, num_per_class, key, num_classes=num_classes,
      batch_size=batch_size, classifier=classifier).result()


def start_conditional_accuracy(
    generate_fn: Callable[[jax.Array, jax.Array], Any], num_per_class: int,
    key: jax.Array, num_classes: int = NUM_CLASSES, batch_size: int = 500,
    classifier: classifier_lib.Classifier | None = None
) -> Pending[dict[str, Any]]:
  """`conditional_accuracy`, returning once its device work is queued.

  Args:
    generate_fn, num_per_class, key, num_classes, batch_size, classifier: as
      for `conditional_accuracy`.

  Returns:
    A `Pending` whose `result()` is `conditional_accuracy`'s dict.

  Raises:
    JaxganError: here for a bad `num_per_class` or image shape or dtype;
      from `result()` for values outside [-1, 1] or NaN.
  """
  if num_per_class < 1:
    raise JaxganError(f'num_per_class must be positive, got {num_per_class}.')
  classifier = classifier or classifier_lib.load_classifier()
  requested = np.repeat(np.arange(num_classes, dtype=np.int32), num_per_class)
  batches = []
  for i, start in enumerate(range(0, len(requested), batch_size)):
    labels = requested[start:start + batch_size]
    images, name, check_range = _checked(
        generate_fn(jax.random.fold_in(key, i), jnp.asarray(labels)),
        'generated images')
    ranges, predicted = _predictions(classifier.module, classifier.params,
                                     images)
    batches.append((labels, name if check_range else None, ranges,
                    predicted))

  def finish() -> dict[str, Any]:
    correct = np.zeros(num_classes)
    for labels, name, (low, high), predicted in jax.device_get(batches):
      if name is not None:
        _check_range(name, float(low), float(high))
      np.add.at(correct, labels, predicted == labels)
    per_class = correct / num_per_class
    return {'accuracy': float(per_class.mean()),
            'per_class_accuracy': per_class.tolist()}

  return Pending(finish)
