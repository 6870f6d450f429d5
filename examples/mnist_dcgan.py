r"""Trains a DCGAN on MNIST: the TF1 tutorial's three phases, done right.

  # 1. Train G and D (one D update, then one G update, per batch).
  python examples/mnist_dcgan.py --workdir=/tmp/dcgan \
      --mnist_dir=../shared/datasets/mnist
  # 2. Train D alone against the frozen G.
  python examples/mnist_dcgan.py --workdir=/tmp/dcgan --phase=discriminator
  # 3. Evaluate 10,000 generated images against the real test digits.
  python examples/mnist_dcgan.py --workdir=/tmp/dcgan --phase=test

Every phase resumes from the newest checkpoint in the workdir: running the
same command again continues where it stopped; a larger --num_epochs trains
further. The train phase evaluates G every --eval_every_epochs (Frechet
classifier distance, classifier score, mode coverage; see jaxgan.metrics) and
keeps the checkpoint with the lowest FCD in best/. Outputs in the workdir:
checkpoints/, best/, samples/*.png, steps.csv, metrics.jsonl, losses.png,
eval_summary.json, tensorboard/ and test/.
"""

import concurrent.futures
import copy
import functools
import os
import signal
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxgan
from jaxgan import images as images_lib
from jaxgan import metrics as metrics_lib
from jaxgan import parallel
from jaxgan.checkpoint import Checkpointer
from jaxgan.config import DCGANConfig
from jaxgan.data import load_mnist
from jaxgan.data import split_size
from jaxgan.errors import CheckpointError
from jaxgan.errors import JaxganError
from jaxgan.logging_utils import RunLogger
from jaxgan.logging_utils import iter_chunks
from jaxgan.logging_utils import plot_losses

_DEFAULTS = DCGANConfig()

flags.DEFINE_string('workdir', None, 'Folder for checkpoints, samples, logs.')
flags.DEFINE_enum('phase', 'train', ['train', 'discriminator', 'test'],
                  'train: G and D; discriminator: D alone against the trained '
                  'G; test: generate and compare with real test digits.')
flags.DEFINE_integer('num_epochs', 20, 'Epochs of the phase (in total, '
                     'counting epochs already done in the workdir).',
                     lower_bound=0)
flags.DEFINE_integer('batch_size', _DEFAULTS.batch_size, 'Images per step.',
                     lower_bound=1)
flags.DEFINE_float('learning_rate', _DEFAULTS.learning_rate,
                   'Adam learning rate of G and D.')
flags.DEFINE_float('beta1', _DEFAULTS.beta1,
                   "Adam's beta1 (DCGAN: 0.5; the tutorial used 0.9).")
flags.DEFINE_integer('seed', 0, 'Seed of the run key (fixed at the first '
                     'checkpoint; a resumed run keeps its own).')
flags.DEFINE_integer('num_seeds', 1, 'Train this many GANs, with seeds --seed, '
                     '--seed+1, ..., in one compiled program (jax.vmap); '
                     'evaluations report the mean and spread over seeds. '
                     'Seed i gives the run that --seed=i alone would.',
                     lower_bound=1)
flags.DEFINE_string('mnist_dir', None,
                    'Folder with the four original MNIST .gz files, to prepare '
                    'the dataset offline (tfds manual download dir).')
flags.DEFINE_string('data_dir', None,
                    'tfds data dir for the prepared dataset (default: '
                    '$TFDS_DATA_DIR or ~/tensorflow_datasets).')
flags.DEFINE_integer('sample_every_epochs', 5,
                     'Write a sample grid every this many epochs.',
                     lower_bound=1)
flags.DEFINE_integer('steps_per_epoch', None,
                     'Cap on steps per epoch, for quick runs (default: the '
                     'whole shuffled dataset; on resume, the saved value).',
                     lower_bound=1)
flags.DEFINE_integer('steps_per_call', 0,
                     'Train steps fused into one compiled call (lax.scan). 0: '
                     'a whole epoch on accelerators; on CPU, where an epoch '
                     'takes minutes, calls of about 1,024 images (16 steps '
                     'at batch 64), so the progress bar and Ctrl-C still '
                     'answer within seconds. 1 is the slowest (on a 2-core '
                     'CPU about 1.4x slower than 16).',
                     lower_bound=0)
flags.DEFINE_integer('keep_checkpoints', 3, 'How many checkpoints to keep.',
                     lower_bound=1)
flags.DEFINE_integer('checkpoint_every_steps', 0,
                     'Also checkpoint mid-epoch every this many steps (0: at '
                     'the end of each epoch only). SIGINT/SIGTERM always '
                     'save one before stopping.', lower_bound=0)
flags.DEFINE_enum('on_divergence', 'stop', ['stop', 'rollback'],
                  'When a loss or parameter becomes NaN or infinite: stop '
                  'with a message, or roll back to the last checkpoint and '
                  'continue with a new key.')
flags.DEFINE_integer('max_rollbacks', 3, 'Rollbacks tried in one run before '
                     'giving up.', lower_bound=0)
flags.DEFINE_bool('generator_batch_norm', _DEFAULTS.generator_batch_norm,
                  'BatchNorm in G. Off gives the literal tutorial model, '
                  'which collapses.')
flags.DEFINE_enum('loss', _DEFAULTS.loss, jaxgan.available_losses(),
                  'GAN loss pair.')
flags.DEFINE_enum('penalty', _DEFAULTS.penalty,
                  ['none', 'gradient_penalty', 'r1'],
                  "Penalty on D's loss: WGAN-GP or R1 on real images.")
flags.DEFINE_float('penalty_weight', _DEFAULTS.penalty_weight,
                   'Weight of the penalty (WGAN-GP: 10; R1: gamma / 2).')
flags.DEFINE_integer('penalty_every', _DEFAULTS.penalty_every,
                     'Apply the penalty every this many D steps, scaled up '
                     'to match (lazy regularisation).', lower_bound=1)
flags.DEFINE_integer('n_critic', _DEFAULTS.n_critic,
                     'D updates per G update; each step then reads this '
                     'many batches.', lower_bound=1)
flags.DEFINE_float('ema_decay', _DEFAULTS.ema_decay,
                   "Keep an EMA of G's parameters with this decay (e.g. "
                   '0.999) and sample and evaluate with it; 0: no EMA.')
flags.DEFINE_bool('conditional', _DEFAULTS.conditional,
                  'Class-conditional GAN: G takes the digit as input, D is a '
                  'projection discriminator; grids get a row per digit and '
                  'evaluations the classifier\'s accuracy per digit.')
flags.DEFINE_bool('spectral_norm', _DEFAULTS.spectral_norm,
                  "Spectral normalisation of D's layers.")
flags.DEFINE_bool('discriminator_batch_norm',
                  _DEFAULTS.discriminator_batch_norm,
                  'BatchNorm in D (the tutorial\'s model).')
flags.DEFINE_enum('compute_dtype', _DEFAULTS.compute_dtype,
                  ['float32', 'bfloat16'],
                  'Computation dtype; parameters and optimiser state stay '
                  'float32.')
flags.DEFINE_enum('conv_kernel_grad', _DEFAULTS.conv_kernel_grad,
                  list(jaxgan.models.KERNEL_GRADS),
                  'How the convolutions are computed: auto (per layer and '
                  'backend), im2col, matmul, winograd or xla; the '
                  'parameters are the same either way.')
flags.DEFINE_integer('eval_every_epochs', 1,
                     'Evaluate G (FCD, classifier score, coverage) every this '
                     'many epochs, and after the last; 0: after the last '
                     'epoch only.', lower_bound=0)
flags.DEFINE_integer('eval_samples', 10_000,
                     'Generated images per evaluation in the train phase; 0 '
                     'turns evaluation (and the best checkpoint) off.',
                     lower_bound=0)
flags.DEFINE_integer('num_test_samples', 10_000,
                     'Images the test phase generates and evaluates.',
                     lower_bound=2)
flags.DEFINE_bool('progress', True, 'Show a progress bar.')
flags.DEFINE_string('compilation_cache_dir', None,
                    'Keep compiled programs here (JAX\'s persistent '
                    'compilation cache), so later runs of the same model '
                    'load them instead of compiling again. Default: '
                    '$JAX_COMPILATION_CACHE_DIR, else ~/.cache/jaxgan/xla; '
                    '"" turns it off.')
flags.DEFINE_integer('num_processes', None, 'Processes of a multi-host job '
                     '(default: $JAX_NUM_PROCESSES, else 1).', lower_bound=1)
flags.DEFINE_integer('process_id', None, 'This process\'s index (default: '
                     '$JAX_PROCESS_ID).', lower_bound=0)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 '
                    '(default: $JAX_COORDINATOR_ADDRESS).')
flags.mark_flag_as_required('workdir')
FLAGS = flags.FLAGS

# Streams of the run key, fixed so a resumed run derives the same keys.
_INIT, _TRAIN, _DISCRIMINATOR, _SAMPLES, _TEST, _EVAL = range(6)
# Within an evaluation's key: the conditional-accuracy samples.
_CONDITIONAL = 1 << 20
_GRID_SAMPLES = 64
# Checkpoint metadata key of each phase's steps per epoch (its epochs done
# and partial-epoch metrics are under f'{phase}_epoch' and
# f'{phase}_partial_epoch').
_STEPS_PER_EPOCH_KEYS = {'train': 'steps_per_epoch',
                         'discriminator': 'discriminator_steps_per_epoch'}
_MAX_IN_FLIGHT = 2
# On CPU a step takes a tenth of a second or more, so a whole epoch per call
# would leave the progress bar and Ctrl-C waiting for minutes; calls of this
# many images take a second or two there and train about 1.4x as fast as one
# step per call (2-core CPU, batch 64: benchmarks/RESULTS.md).
_CPU_IMAGES_PER_CALL = 1024
# A diverged call's states are never saved or used: the run stops or rolls
# back to its last checkpoint. So the loops only flag the bad step, which
# spares the per-step select over every state array that 'freeze' costs.
_GUARD = 'detect'
_EVAL_BATCH = 500
# Eval numbers logged per epoch (metrics.jsonl, TensorBoard).
_EVAL_FIELDS = ('fcd', 'classifier_score', 'classes_present',
                'class_kl_from_uniform', 'mean_confidence')


def _warn(message: str) -> None:
  """Prints a warning on process 0 alone.

  Every process of a run meets the same conditions, so one copy is enough;
  errors still print on every process, since a failure may be one's own.
  """
  if parallel.is_main_process():
    print(f'warning: {message}', file=sys.stderr)


def _stream(run_key: jax.Array, stream: int) -> jax.Array:
  """fold_in, per seed when `run_key` holds one key per seed."""
  if run_key.ndim:
    return jax.vmap(lambda key: jax.random.fold_in(key, stream))(run_key)
  return jax.random.fold_in(run_key, stream)


def _run_keys(seed: int, num_seeds: int) -> jax.Array:
  """The run key, or `[num_seeds]` keys of seeds seed, seed + 1, ..."""
  if num_seeds == 1:
    return jax.random.key(seed)
  return jax.vmap(jax.random.key)(jnp.arange(seed, seed + num_seeds))


def _initial_states(config: DCGANConfig, run_key: jax.Array):
  """Fresh states of the run, stacked over seeds when there are several."""
  if not run_key.ndim:
    return config.create_train_states(_stream(run_key, _INIT))
  return jaxgan.stack_seeds([config.create_train_states(key)
                             for key in _stream(run_key, _INIT)])


def _restore_templates(config: DCGANConfig, num_seeds: int):
  """`(state_g, state_d, key)` shaped like a checkpoint of `num_seeds`."""
  run_key = _run_keys(0, num_seeds)
  return (*_initial_states(config, run_key), run_key)


def _count(counter) -> int:
  """A step counter as an int; the seeds of a run advance in lockstep."""
  return int(np.asarray(counter).reshape(-1)[0])


def _seed_states(tree):
  """The per-seed states of a run (a list of one without seeds)."""
  # From the shape alone: reading a device array's value would wait for it.
  steps = tree[0].step if isinstance(tree, tuple) else tree.step
  if not np.ndim(steps):
    return [tree]
  return [jaxgan.seed_slice(tree, i) for i in range(len(steps))]


def _make_config(**values) -> DCGANConfig:
  try:
    return DCGANConfig(**values)
  except ValueError as e:
    raise JaxganError(f'Invalid flag value: {e}') from None


# DCGANConfig fields set by the flags of the same names.
_CONFIG_FLAGS = ('learning_rate', 'beta1', 'batch_size', 'generator_batch_norm',
                 'loss', 'penalty', 'penalty_weight', 'penalty_every',
                 'n_critic', 'ema_decay', 'spectral_norm',
                 'discriminator_batch_norm', 'compute_dtype', 'conditional',
                 'conv_kernel_grad')


def _flag_config() -> DCGANConfig:
  return _make_config(**{name: getattr(FLAGS, name) for name in _CONFIG_FLAGS})


def _config_for_resume(saved: dict) -> DCGANConfig:
  """The saved config, with the flags given now taking precedence.

  Flags that change shapes or the data order must match the checkpoint;
  the others (the objective, the optimiser, the numerics) may change the
  rest of the run, and a warning names each change; flags not given on the
  command line take the saved values.
  """
  saved_config = DCGANConfig.from_dict(saved)
  explicit = {name: getattr(FLAGS, name)
              for name in _CONFIG_FLAGS if FLAGS[name].present}
  config = _make_config(**{**saved_config.to_dict(), **explicit})
  mismatches = config.resume_mismatches(saved)
  if mismatches:
    raise CheckpointError(
        'The checkpoint in the workdir was written with another '
        f'configuration ({"; ".join(mismatches)}). Drop those flags to '
        'continue it, or use a new --workdir.')
  changed = [f'--{name}={value} (the checkpoint has '
             f'{getattr(saved_config, name)})'
             for name, value in explicit.items()
             if value != getattr(saved_config, name)]
  if changed:
    _warn('resuming with ' + ', '.join(changed) + '; the rest of the run '
          'trains with the new values, and its checkpoints record them.')
  return config


class Run:
  """The state of the example on the host: workdir, config, checkpoints."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
      os.makedirs(self.workdir, exist_ok=True)
      probe = os.path.join(self.workdir, f'.write_test.{os.getpid()}')
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
    except OSError as e:
      raise JaxganError(
          f'Cannot write to --workdir={workdir}: {e.strerror}. Choose a '
          'folder you can write to.') from None
    self.checkpointer = Checkpointer(
        os.path.join(self.workdir, 'checkpoints'),
        max_to_keep=FLAGS.keep_checkpoints)
    # The generator with the lowest FCD so far; GANs often get worse late.
    self.best = Checkpointer(os.path.join(self.workdir, 'best'),
                             max_to_keep=1)
    self.logger = None
    self.restored_step = None
    # Every device of every process; process 0 writes the files people read.
    self.mesh = parallel.make_mesh()
    self.main = parallel.is_main_process()
    # losses.png is redrawn in the background (about 0.3 s a time), so the
    # next epoch's steps start without waiting for it.
    self._plotter = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._plot = None

  def plot_losses(self) -> None:
    """Redraws losses.png from the steps logged so far, in the background."""
    self.finish_plot()
    logged = os.path.getsize(self.logger.steps_path) if os.path.isfile(
        self.logger.steps_path) else 0
    self._plot = self._plotter.submit(
        lambda: plot_losses(self.logger.read_steps('train', upto=logged),
                            os.path.join(self.workdir, 'losses.png'),
                            'DCGAN on MNIST'))

  def finish_plot(self) -> None:
    """Waits for the last redraw of losses.png; raises what it raised."""
    plot, self._plot = self._plot, None
    if plot is not None:
      plot.result()

  def restore_or_init(self, require: bool):
    """Returns (config, state_g, state_d, run_key, meta).

    Restores the newest checkpoint that reads back whole. A damaged one (a
    truncated or corrupted file) is reported, moved to `damaged/` in the
    workdir (nothing is deleted) and the one before it is used; a checkpoint
    of another configuration is refused outright. Sets `restored_step`.
    """
    steps = self.checkpointer.all_steps()
    if not steps:
      if require:
        raise CheckpointError(
            f'No checkpoint in {self.checkpointer.directory}. Run '
            f'--phase=train with this --workdir first.')
      self._set_aside_earlier_best()
      config = _flag_config()
      meta = {'config': config.to_dict(), 'seed': FLAGS.seed,
              'num_seeds': FLAGS.num_seeds, 'train_epoch': 0,
              'discriminator_epoch': 0, 'steps_per_epoch': None}
      run_key = _run_keys(FLAGS.seed, FLAGS.num_seeds)
      state_g, state_d = _initial_states(config, run_key)
      return config, state_g, state_d, run_key, meta
    failures = []
    for step in reversed(steps):
      try:
        saved = self.checkpointer.read_meta(step)
      except CheckpointError as e:
        failures.append((step, e))
        continue
      config = _config_for_resume(saved['config'])
      num_seeds = saved.get('num_seeds', 1)
      if FLAGS['num_seeds'].present and FLAGS.num_seeds != num_seeds:
        raise CheckpointError(
            f'The checkpoint in the workdir trains {num_seeds} seed(s), not '
            f'--num_seeds={FLAGS.num_seeds}. Drop the flag to continue it, '
            'or use a new --workdir.')
      *templates, key_template = _restore_templates(config, num_seeds)
      try:
        state_g, state_d, run_key, meta = self.checkpointer.restore(
            *templates, step=step, key_template=key_template)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        continue
      for bad_step, error in failures:
        moved = self.checkpointer.set_aside(
            bad_step, os.path.join(self.workdir, 'damaged'))
        _warn(f'checkpoint {bad_step} in {self.checkpointer.directory} is '
              f'damaged ({type(error).__name__}: '
              f'{str(error).splitlines()[0]}); moved it to {moved} and '
              f'resuming from checkpoint {step}.')
      self.restored_step = step
      if FLAGS['seed'].present and FLAGS.seed != meta.get('seed'):
        _warn(f'resuming with the checkpoint\'s seed {meta.get("seed")}; '
              f'--seed={FLAGS.seed} is ignored.')
      meta['config'] = config.to_dict()
      return config, state_g, state_d, run_key, meta
    details = '; '.join(f'{step}: {type(e).__name__}: '
                        f'{str(e).splitlines()[0]}'
                        for step, e in failures)
    raise CheckpointError(
        f'No checkpoint in {self.checkpointer.directory} can be read '
        f'({details}). Move the folder aside to start over, or restore it '
        'from a backup.')

  def _set_aside_earlier_best(self) -> None:
    """Moves best/'s checkpoints to earlier_best/ before a run starts afresh.

    With no checkpoint to resume from, a best checkpoint left in the workdir
    belongs to an earlier run (or to this run's first epoch, stopped between
    its two saves). Kept in best/, it would stand for this run in the final
    evaluation and block this run's own best saves, which must exceed its
    step.
    """
    for step in self.best.all_steps():
      moved = self.best.set_aside(
          step, os.path.join(self.workdir, 'earlier_best'))
      _warn(f'{self.checkpointer.directory} holds no checkpoint, so this '
            f'run starts afresh; the best checkpoint {step} of an earlier '
            f'run is moved to {moved}.')

  def num_seeds(self, step: int) -> int:
    """How many seeds checkpoint `step` holds."""
    return self.checkpointer.read_meta(step).get('num_seeds', 1)

  def save(self, state_g, state_d, run_key, meta, best: bool = False) -> int:
    """Saves the latest checkpoint, and first the best one when `best`."""
    # Host copies: the next step donates the device buffers while orbax may
    # still be writing in the background.
    state_g, state_d = parallel.to_host((state_g, state_d))
    step = _count(state_d.step)
    # The best checkpoint goes first: a run stopped between the two saves
    # resumes from the previous latest one and repeats this evaluation. A
    # run resumed from before the best step replays the same steps and
    # reaches that best again, so a step at or below it is not saved anew
    # (saves must grow).
    latest_best = self.best.latest_step()
    if best and (latest_best is None or step > latest_best):
      self.best.save(step, state_g, state_d, run_key, meta)
      # The two managers commit in background threads of their own.
      self.best.wait_until_finished()
    self.checkpointer.save(step, state_g, state_d, run_key, meta)
    return step

  def close(self):
    self._plotter.shutdown(wait=True)
    self.checkpointer.close()
    self.best.close()
    if self.logger is not None:
      self.logger.close()


def _load_split(split: str):
  start = time.time()
  images, labels = load_mnist(split, data_dir=FLAGS.data_dir,
                              mnist_dir=FLAGS.mnist_dir)
  logging.info('Loaded MNIST %s: %s in %.1fs', split, images.shape,
               time.time() - start)
  return images, labels


def _load_train(mesh, with_labels: bool):
  """The training set on the mesh (the pair (images, labels) when
  `with_labels`); each process reads only its own rows."""
  if jax.process_count() == 1:
    total, split = None, 'train'
  else:
    total = split_size('train', data_dir=FLAGS.data_dir,
                       mnist_dir=FLAGS.mnist_dir)
    start, end = parallel.process_rows(total, mesh)
    split = f'train[{start}:{end}]'
  images, labels = _load_split(split)
  images = parallel.shard_dataset(images, mesh, total)
  if not with_labels:
    return images
  return images, parallel.shard_dataset(labels.astype(np.int32), mesh, total)


def _steps_per_epoch(num_examples: int, batch_size: int, saved: list) -> int:
  """The flag's cap, else the first saved value, else the whole dataset."""
  full = num_examples // batch_size
  if full < 1:
    raise JaxganError(f'A step reads {batch_size} images (--batch_size, '
                      f'times --n_critic in training), more than the dataset '
                      f'size {num_examples}.')
  if FLAGS.steps_per_epoch is not None:
    return min(FLAGS.steps_per_epoch, full)
  return next((value for value in saved if value), full)


def _phase_step(phase: str, config: DCGANConfig, state_g, state_d) -> int:
  """Steps done in a phase: G's updates, or D's updates beyond training's."""
  if phase == 'train':
    return _count(state_g.step)
  return _count(state_d.step) - config.n_critic * _count(state_g.step)


def _start_phase(run: Run, phase: str, require_checkpoint: bool):
  """Restores the run and puts the training set on the mesh for a phase.

  Args:
    run: the run.
    phase: 'train' or 'discriminator'.
    require_checkpoint: fail when the workdir holds no checkpoint.

  Returns:
    `(config, state_g, state_d, run_key, meta, images, steps_per_epoch,
    step)`: states replicated and images split over the mesh; `step`
    counts the steps of the phase already done.
  """
  spe_key = _STEPS_PER_EPOCH_KEYS[phase]
  config, state_g, state_d, run_key, meta = run.restore_or_init(
      require=require_checkpoint)
  parallel.check_batch_size(config.batch_size, run.mesh)
  images = _load_train(run.mesh, config.conditional)
  # A train step reads n_critic batches, one per D update.
  images_per_step = config.batch_size * (config.n_critic
                                         if phase == 'train' else 1)
  spe = _steps_per_epoch(jax.tree.leaves(images)[0].shape[0], images_per_step,
                         [meta.get(spe_key), meta.get('steps_per_epoch')])
  state_g, state_d = parallel.replicate((state_g, state_d), run.mesh)
  step = _phase_step(phase, config, state_g, state_d)
  if step and meta.get(spe_key) not in (None, spe):
    raise CheckpointError(
        f'The {phase} phase in this workdir used {meta[spe_key]} steps per '
        f'epoch; --steps_per_epoch={FLAGS.steps_per_epoch} would change its '
        'data order. Drop the flag to continue it, or use a new --workdir.')
  meta[spe_key] = spe
  run.logger = RunLogger(run.workdir, enabled=run.main)
  run.logger.forget_after(phase, step, step // spe)
  return config, state_g, state_d, run_key, meta, images, spe, step


def _epoch_record(phase: str, epoch: int, spe: int, metrics: dict,
                  steps_run: int, seconds: float) -> dict:
  return {'phase': phase, 'epoch': epoch, 'step': epoch * spe,
          **{k: float(np.mean(v)) for k, v in sorted(metrics.items())},
          'steps_per_sec': steps_run / seconds, 'seconds': seconds}


def _images_per_step(batch_size: int, run_key: jax.Array) -> int:
  """Images a step of `batch_size` per seed reads over all seeds together."""
  return batch_size * (run_key.shape[0] if run_key.ndim else 1)


def _steps_per_call(steps_per_epoch: int, images_per_step: int) -> int:
  """--steps_per_call, or its default for this backend (see the flag)."""
  if FLAGS.steps_per_call:
    return min(FLAGS.steps_per_call, steps_per_epoch)
  if jax.default_backend() != 'cpu':
    return steps_per_epoch
  return max(1, min(steps_per_epoch, _CPU_IMAGES_PER_CALL // images_per_step))


class _StopRequest:
  """Turns SIGINT and SIGTERM into a request to stop at the next call.

  A second signal stops at once, without a checkpoint.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self) -> '_StopRequest':
    for signum in (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      print(f'{signal.Signals(signum).name} again: stopping now, without a '
            'checkpoint; the last saved one is intact.', file=sys.stderr)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    tqdm.write(f'{signal.Signals(signum).name} received: finishing the step '
               'in flight and saving a checkpoint (send it again to stop '
               'now, without one).')

  @property
  def requested(self) -> bool:
    return self.signum is not None


class _Stopped(Exception):
  """Training stopped on a signal after saving a checkpoint."""

  def __init__(self, signum: int, step: int):
    super().__init__(signum, step)
    self.signum, self.step = signum, step


class _Diverged(Exception):
  """A loss or a state became NaN or infinite at `step` (1-based)."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def _partial_metrics(meta: dict, phase: str):
  """Per-step metrics of the epoch in progress, saved in a mid-epoch
  checkpoint (float32, exactly as computed)."""
  saved = meta.get(f'{phase}_partial_epoch')
  if not saved:
    return None
  return {name: np.asarray(values, np.float32)
          for name, values in saved.items()}


def _concat(parts: list) -> dict:
  return {k: np.concatenate([np.asarray(p[k], np.float32) for p in parts])
          for k in parts[0]}


def _run_epoch(loop, epoch: int, start: int, spe: int, chunk: int,
               description: str, logger: RunLogger, phase: str, partial,
               checkpoint, stop: _StopRequest, after_first_dispatch,
               log_later) -> dict:
  """Runs steps start..spe-1 of an epoch in fused chunks.

  Calls are dispatched asynchronously; metrics are fetched once a call has
  finished, and at most `_MAX_IN_FLIGHT` calls are queued so the progress bar
  follows the device instead of the dispatcher. Every
  --checkpoint_every_steps, and when a stop is requested, the queue is
  drained and `checkpoint(metrics_so_far)` saves the run mid-epoch.

  Args:
    loop: `loop(num_steps, first_step)` dispatches one call; returns metrics.
    epoch: the epoch (0-based).
    start: the first step within the epoch (after a mid-epoch resume).
    spe: steps per epoch.
    chunk: steps per call.
    description: progress bar label.
    logger: the run's logger.
    phase: 'train' or 'discriminator'.
    partial: metrics of the epoch's steps before `start`, or None.
    checkpoint: saves a mid-epoch checkpoint, given the metrics so far.
    stop: the signal state.
    after_first_dispatch: called once the epoch's first call is queued, so
      host work runs while the device computes.
    log_later: `log_later(work)` defers `work`, the logging of the steps
      fetched after the epoch's last call, so that the next epoch's first
      call does not wait for it.

  Returns:
    The whole epoch's per-step metrics (host float32 arrays).

  Raises:
    _Diverged: a step went non-finite (nothing is saved after it).
    _Stopped: a signal arrived; a checkpoint was saved.
  """
  first_step = epoch * spe
  pending, fetched = [], [partial] if partial else []
  bar = tqdm(total=spe, initial=start, desc=description, unit='step',
             disable=not FLAGS.progress, leave=False, dynamic_ncols=True)

  def log(calls):
    for call_first, metrics in calls:
      logger.log_steps(phase, call_first, metrics)

  def drain(wait_all: bool, unlogged=None):
    """Fetches finished calls; logs them, or adds them to `unlogged`."""
    while pending and (wait_all or len(pending) > _MAX_IN_FLIGHT or all(
        leaf.is_ready() for leaf in jax.tree.leaves(pending[0][1]))):
      call_first, metrics = pending.pop(0)
      metrics = jax.device_get(metrics)
      finite = metrics.pop('finite')
      if not finite.all():
        bad = int(np.argmin(finite))
        log(unlogged or [])
        logger.log_steps(phase, call_first,
                         {k: v[:bad] for k, v in metrics.items()})
        raise _Diverged(call_first + bad + 1)
      if unlogged is None:
        logger.log_steps(phase, call_first, metrics)
      else:
        unlogged.append((call_first, metrics))
      fetched.append(metrics)
      bar.update(len(finite))
      bar.set_postfix({k: f'{float(v[-1]):.3f}'
                       for k, v in sorted(metrics.items())}, refresh=False)

  every = FLAGS.checkpoint_every_steps
  done = start
  try:
    while done < spe:
      size = _call_size(first_step, done, spe, chunk)
      pending.append((first_step + done, loop(size, first_step + done)))
      if done == start:
        after_first_dispatch()
      done += size
      drain(wait_all=False)
      boundary = every and (first_step + done) % every == 0
      if done < spe and (stop.requested or boundary):
        drain(wait_all=True)
        checkpoint(_concat(fetched))
        if stop.requested:
          raise _Stopped(stop.signum, first_step + done)
    unlogged = []
    drain(wait_all=True, unlogged=unlogged)
    log_later(functools.partial(log, unlogged))
  finally:
    bar.close()
  return _concat(fetched)


def _call_size(first_step: int, done: int, spe: int, chunk: int) -> int:
  """Steps in the call after `done` steps of the epoch starting at
  `first_step`: a chunk, cut at the epoch's end and at the next
  --checkpoint_every_steps boundary."""
  size = min(chunk, spe - done)
  every = FLAGS.checkpoint_every_steps
  if every:
    size = min(size, every - (first_step + done) % every)
  return size


def _loop_key(run_key: jax.Array, stream: int, meta: dict) -> jax.Array:
  """A phase's loop key; each rollback after divergence draws a new one.

  The phase's key is only folded, never used as a loop key itself: its
  first rollback's key would then be that loop's step key.
  """
  return _stream(_stream(run_key, stream), meta.get('rollbacks', 0))


def _handle_divergence(run: Run, config: DCGANConfig, diverged: _Diverged,
                       phase: str, spe: int, rollbacks_here: int):
  """Stops with a message, or (--on_divergence=rollback) restores the last
  checkpoint and returns `(state_g, state_d, run_key, meta, step)`."""
  run.checkpointer.wait_until_finished()
  latest = run.checkpointer.latest_step()
  where = (f'the last good checkpoint is {latest} in '
           f'{run.checkpointer.directory}' if latest is not None else
           'no checkpoint was written before it')
  if (FLAGS.on_divergence != 'rollback' or latest is None
      or rollbacks_here >= FLAGS.max_rollbacks):
    tried = (f' after {rollbacks_here} rollbacks' if rollbacks_here else '')
    raise JaxganError(
        f'The {phase} phase diverged at step {diverged.step}{tried}: a loss '
        f'or a parameter became NaN or infinite. Nothing after it was saved; '
        f'{where}. Lower --learning_rate, or run again with '
        '--on_divergence=rollback to continue from the last checkpoint with '
        'new randomness.')
  *templates, key_template = _restore_templates(config,
                                                run.num_seeds(latest))
  state_g, state_d, run_key, meta = run.checkpointer.restore(
      *templates, step=latest, key_template=key_template)
  state_g, state_d = parallel.replicate((state_g, state_d), run.mesh)
  meta['rollbacks'] = meta.get('rollbacks', 0) + rollbacks_here + 1
  meta['config'] = config.to_dict()
  step = _phase_step(phase, config, state_g, state_d)
  run.logger.forget_after(phase, step, step // spe)
  tqdm.write(f'warning: the {phase} phase diverged at step {diverged.step}; '
             f'rolled back to checkpoint {latest} (step {step}) with a new '
             f'key (rollback {meta["rollbacks"]}).')
  return state_g, state_d, run_key, meta, step


def _queue_grid(run: Run, local_g, noise) -> list | None:
  """Queues the images of the sample grid (`_write_grid` draws them).

  The grid shows `noise`'s samples; with seeds, one row of 8 per seed; for
  a conditional G, a row of 8 per digit (per seed).

  Args:
    run: the run (only the main process draws).
    local_g: G's state on this process's device (`parallel.local_copy`).
    noise: `[N, noise_dim]`.

  Returns:
    One device array of images per seed, or None off the main process.
  """
  if not run.main:
    return None
  generators = _seed_states(local_g)
  labels = None
  if generators[0].num_classes:
    classes = generators[0].num_classes
    noise = jnp.tile(noise[:8], (classes, 1))
    labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), 8)
  elif len(generators) > 1:
    noise = noise[:8]
  return [jaxgan.generate(g, noise, labels) for g in generators]


def _write_grid(run: Run, images: list | None, name: str, step: int) -> None:
  """Draws `_queue_grid`'s images to samples/`name` and TensorBoard."""
  if images is None:
    return
  picture = images_lib.image_grid(np.concatenate(jax.device_get(images)),
                                  columns=8)
  images_lib.save_png(picture, os.path.join(run.workdir, 'samples', name),
                      scale=2)
  run.logger.log_image('samples', picture, step)


def _reference_statistics() -> metrics_lib.FeatureStatistics:
  """Classifier feature statistics of the real test set (cached)."""
  return metrics_lib.mnist_reference_statistics(
      'test', data_dir=FLAGS.data_dir, mnist_dir=FLAGS.mnist_dir)


def _balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., num_classes - 1, 0, 1, ...: `num` labels, classes balanced."""
  return np.arange(num, dtype=np.int32) % num_classes


def _generate(state_g, key: jax.Array, num: int) -> np.ndarray:
  """`num` images in batches, batch i from fold_in(key, i) (as evaluate);
  a conditional G makes every digit equally often (`_balanced_labels`)."""
  labels = (jnp.asarray(_balanced_labels(num, state_g.num_classes))
            if state_g.num_classes else None)
  parts, start = [], 0
  for i, size in enumerate(iter_chunks(num, _EVAL_BATCH)):
    parts.append(np.asarray(jaxgan.sample(
        state_g, jax.random.fold_in(key, i), size,
        None if labels is None else labels[start:start + size])))
    start += size
  return np.concatenate(parts)


def _evaluate(source, reference) -> metrics_lib.EvalResult:
  return metrics_lib.evaluate(source, reference, batch_size=_EVAL_BATCH)


def _start_eval_seeds(local_g, reference, eval_key: jax.Array,
                      num: int) -> metrics_lib.Pending[dict]:
  """FCD, score and coverage of every seed's generator, as one summary.

  Returns once the evaluation's device work is queued; its `result()` is
  the summary. With one seed, the summary is `EvalResult.to_dict()`. With
  several, each number is the mean over seeds, with `<name>_std` (sample
  standard deviation) beside it and every seed's own result under
  `per_seed`, as Lucic et al. (2018) report GAN results. Seed i uses its own
  eval key, so its numbers are those of a run of that seed alone.
  """
  generators = _seed_states(local_g)
  keys = [eval_key] if len(generators) == 1 else list(eval_key)
  evaluations = [metrics_lib.start_evaluation(
      lambda key, n, g=g: jaxgan.sample(g, key, n), reference,
      num_samples=num, key=key, batch_size=_EVAL_BATCH)
                 for g, key in zip(generators, keys)]
  accuracies = [_start_conditional_accuracy(g, key, num)
                for g, key in zip(generators, keys)
                if generators[0].num_classes]
  return metrics_lib.Pending(functools.partial(
      _eval_summary, evaluations, accuracies))


def _eval_summary(evaluations: list, accuracies: list) -> dict:
  """`_start_eval_seeds`'s summary, from its pending results."""
  results = [evaluation.result().to_dict() for evaluation in evaluations]
  for result, accuracy in zip(results, accuracies):
    result.update(accuracy.result())
  if len(results) == 1:
    return results[0]
  summary = {'num_seeds': len(results)}
  conditional = ('conditional_accuracy',) if accuracies else ()
  for name in (*_EVAL_FIELDS, *conditional, 'num_images'):
    values = [r[name] for r in results]
    summary[name] = float(np.mean(values))
    summary[f'{name}_std'] = float(np.std(values, ddof=1))
  summary['class_histogram'] = np.mean(
      [r['class_histogram'] for r in results], axis=0).tolist()
  summary['per_seed'] = results
  return summary


def _start_conditional_accuracy(state_g, key: jax.Array, num: int
                                ) -> metrics_lib.Pending[dict]:
  """The classifier's accuracy on `num` conditional samples, per digit:
  `conditional_accuracy` and `per_class_accuracy`, once queued."""
  pending = metrics_lib.start_conditional_accuracy(
      lambda k, labels: jaxgan.sample(state_g, k, len(labels), labels),
      max(1, num // state_g.num_classes), _stream(key, _CONDITIONAL),
      num_classes=state_g.num_classes, batch_size=_EVAL_BATCH)

  def renamed() -> dict:
    result = pending.result()
    return {'conditional_accuracy': result['accuracy'],
            'per_class_accuracy': result['per_class_accuracy']}

  return metrics_lib.Pending(renamed)


def _merge_seeds(metrics: dict) -> dict:
  """Per-step metrics `[num_seeds, K]` -> the mean over seeds, `[K]`; a step
  is finite when it is finite for every seed."""
  return {name: (jnp.all(values, axis=0) if name == 'finite' else
                 jnp.mean(values, axis=0))
          for name, values in metrics.items()}


def _eval_due(epoch: int) -> bool:
  every = FLAGS.eval_every_epochs
  return FLAGS.eval_samples > 0 and (
      (every and epoch % every == 0) or epoch == FLAGS.num_epochs)


def _write_json(path: str, value) -> None:
  import json  # pylint: disable=g-import-not-at-top
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def _write_eval_summary(run: Run, meta: dict, epoch: int, step: int,
                        result: dict) -> None:
  """eval_summary.json: the latest evaluation and the best so far."""
  _write_json(os.path.join(run.workdir, 'eval_summary.json'), {
      'final': {'epoch': epoch, 'step': step, **result},
      'best': {'fcd': meta['best_fcd'], 'epoch': meta['best_epoch'],
               'step': meta['best_step'], 'checkpoint': os.path.join(
                   run.best.directory, str(meta['best_step']))}})


class _Phase:
  """The epochs of the train or discriminator phase, with their states.

  Runs each epoch in chunks (`_run_epoch`), with mid-epoch checkpoints, stops
  on SIGINT/SIGTERM, and the divergence policy. Between epochs the phase
  function only queues device work (a copy of the states, the grid's images,
  the evaluation); fetching them, collecting the evaluation and the writes
  (logs, checkpoint) wait for the next epoch's first call
  (`after_next_dispatch`), so the device does not idle through them.

  Attributes:
    state_g, state_d, run_key, meta: the current states and checkpoint data.
    loop_key: the loop key of the phase (changes after a rollback).
    step: steps of the phase done.
  """

  def __init__(self, run: Run, config: DCGANConfig, phase: str, stream: int,
               spe: int, states, run_key, meta: dict, step: int, dispatch):
    """`dispatch(phase, num_steps, first_step)` runs one call: it reads and
    replaces `phase.state_g` / `phase.state_d`, and returns the metrics."""
    self.run, self.config, self.phase, self.stream = run, config, phase, stream
    self.spe = spe
    self.state_g, self.state_d = states
    self.run_key, self.meta, self.step = run_key, meta, step
    self.loop_key = _loop_key(run_key, stream, meta)
    self._dispatch = dispatch
    self._deferred = []

  def after_next_dispatch(self, work) -> None:
    """Runs `work()` once the next epoch's first call is queued, or before
    the phase ends or stops, after the work deferred before it. `work` must
    not touch the device states (that call consumes them): give it copies
    (`parallel.local_copy`, `parallel.to_host`)."""
    self._deferred.append(work)

  def _run_deferred(self) -> None:
    work, self._deferred = self._deferred, []
    for item in work:
      item()

  def _checkpoint(self, metrics_so_far: dict) -> None:
    self.meta[f'{self.phase}_partial_epoch'] = {
        k: v.tolist() for k, v in metrics_so_far.items()}
    self.run.save(self.state_g, self.state_d, self.run_key, self.meta)

  def epochs(self, num_epochs: int, chunk: int, label: str):
    """Yields `(epochs_done, record)` after each epoch.

    The caller saves the checkpoint before asking for the next epoch, or
    hands the saving to `after_next_dispatch` with host copies of the
    states; a stop requested by a signal is then raised as `_Stopped`.
    """
    spe, phase = self.spe, self.phase
    rollbacks = 0
    with _StopRequest() as stop:
      while self.step < num_epochs * spe:
        epoch, start = divmod(self.step, spe)
        epoch_start = time.time()
        try:
          metrics = _run_epoch(
              lambda size, first: self._dispatch(self, size, first), epoch,
              start, spe, chunk, f'{label} {epoch + 1}/{num_epochs}',
              self.run.logger, phase,
              _partial_metrics(self.meta, phase) if start else None,
              self._checkpoint, stop, self._run_deferred,
              self.after_next_dispatch)
        except _Diverged as diverged:
          # The deferred work ran when this epoch's first call was queued.
          (self.state_g, self.state_d, self.run_key, self.meta,
           self.step) = _handle_divergence(self.run, self.config, diverged,
                                           phase, spe, rollbacks)
          rollbacks += 1
          self.loop_key = _loop_key(self.run_key, self.stream, self.meta)
          continue
        except BaseException:
          # A call that failed to start must not lose the last epoch's save.
          self._run_deferred()
          raise
        done = epoch + 1
        self.meta[f'{phase}_epoch'] = done
        self.meta[f'{phase}_partial_epoch'] = None
        yield done, _epoch_record(phase, done, spe, metrics, spe - start,
                                  time.time() - epoch_start)
        self.step = done * spe
        if stop.requested and self.step < num_epochs * spe:
          self._run_deferred()
          raise _Stopped(stop.signum, self.step)
      self._run_deferred()


def _compile(loop, *args, **options) -> None:
  """Compiles `loop`'s program for these arguments, without running it: the
  call with them that follows finds it ready (`parallel.train_loop`). A
  loop without `.lower` (a wrapper) compiles at its first call instead."""
  lower = getattr(loop, 'lower', None)
  if lower is not None:
    lower(*args, **options).compile()


def _finish_epoch(run: Run, record: dict, states, run_key, meta: dict,
                  best: bool, line: str, plot: bool = True) -> None:
  """The end-of-epoch writes: epoch record, checkpoint, plot, summary line.

  `states`: host copies, or device copies that no later call consumes
  (`parallel.local_copy`)."""
  # Logged before the checkpoint: a resume trims what it does not cover.
  run.logger.log_epoch(record)
  run.save(*states, run_key, meta, best=best)
  if plot and run.main:
    run.plot_losses()
  tqdm.write(line)


def train_phase(run: Run) -> None:
  (config, state_g, state_d, run_key, meta, images, spe,
   step) = _start_phase(run, 'train', require_checkpoint=False)
  if step >= FLAGS.num_epochs * spe:
    print(f'Already trained {step // spe} epochs in {run.workdir}; raise '
          f'--num_epochs to train more.')
    return

  # One noise for every seed's grid row: the first seed's stream.
  noise_key = _stream(run_key, _SAMPLES)
  noise = jaxgan.sample_noise(noise_key[0] if noise_key.ndim else noise_key,
                              _GRID_SAMPLES, config.noise_dim)
  chunk = _steps_per_call(spe, _images_per_step(
      config.batch_size * config.n_critic, run_key))
  loss = config.gan_loss()
  # Every evaluation uses the same noise, so epochs compare like for like.
  eval_key = _stream(run_key, _EVAL)
  last_eval = record = None
  seeds = run_key.ndim > 0
  train_loop = (parallel.train_loop_seeds if seeds else
                parallel.train_loop)(run.mesh)
  loop_options = {'batch_size': config.batch_size, 'steps_per_epoch': spe,
                  'loss': loss, 'guard': _GUARD}

  def dispatch(phase, size, first_step):
    del first_step  # train_loop continues at state_g.step.
    phase.state_g, phase.state_d, metrics = train_loop(
        phase.state_g, phase.state_d, images, phase.loop_key, num_steps=size,
        **loop_options)
    return _merge_seeds(metrics) if seeds else metrics

  phase = _Phase(run, config, 'train', _TRAIN, spe, (state_g, state_d),
                 run_key, meta, step, dispatch)
  resumed = f', resuming at step {step}' if step % spe else ''
  print(f'Training epochs {step // spe + 1}..{FLAGS.num_epochs} '
        f'({spe} steps of {config.batch_size * config.n_critic} images each, '
        f'{chunk} per call'
        f'{resumed}) on {jax.devices()[0].platform.upper()}; workdir '
        f'{run.workdir}')
  # Read first: computing them can load MNIST with tfds, whose imports must
  # not race with the thread's.
  reference = _reference_statistics() if FLAGS.eval_samples else None
  # The first call's program compiles while the host draws the first grid
  # and readies the evaluation's programs, which compile programs of their
  # own. Leaving the block waits for the thread, also after a failure.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    compiling = pool.submit(
        _compile, train_loop, state_g, state_d, images, phase.loop_key,
        num_steps=_call_size(step - step % spe, step % spe, spe, chunk),
        **loop_options)
    # The same program copies the states at every epoch's end.
    local_g = parallel.local_copy((state_g, state_d))[0]
    if step == 0:
      _write_grid(run, _queue_grid(run, local_g, noise), 'epoch_000.png', 0)
    if FLAGS.eval_samples:
      # One batch readies the evaluation's programs; its numbers are unused.
      _start_eval_seeds(local_g, reference, eval_key,
                        min(FLAGS.eval_samples, _EVAL_BATCH))
  compiling.result()
  del state_g, state_d, meta, local_g  # From here on they live in `phase`.

  def finish_epoch(done: int, record: dict, local_states, grid, run_key,
                   meta: dict, evaluation, eval_seconds: float) -> None:
    """Collects the epoch's evaluation, keeps the best, writes the rest."""
    nonlocal last_eval
    if grid is not None:
      _write_grid(run, grid, f'epoch_{done:03d}.png', done * spe)
    is_best = False
    eval_note = ''
    if evaluation is not None:
      collect_start = time.time()
      last_eval = evaluation.result()
      record.update({name: value for name, value in last_eval.items()
                     if name in _EVAL_FIELDS or name.endswith('_std')
                     or name in ('conditional_accuracy',
                                 'per_class_accuracy')})
      record['class_histogram'] = list(last_eval['class_histogram'])
      record['eval_samples'] = last_eval['num_images']
      if 'per_seed' in last_eval:
        record['fcd_per_seed'] = [r['fcd'] for r in last_eval['per_seed']]
      record['eval_seconds'] = eval_seconds + time.time() - collect_start
      fcd = last_eval['fcd']
      is_best = meta.get('best_fcd') is None or fcd < meta['best_fcd']
      # Named like the checkpoint folder: D's update count.
      d_updates = _count(local_states[1].step)
      if is_best:
        best = {'best_fcd': fcd, 'best_epoch': done, 'best_step': d_updates}
        # The epoch's checkpoint carries it, and so do later ones.
        meta.update(best)
        phase.meta.update(best)
      if run.main:
        _write_eval_summary(run, meta, done, d_updates, last_eval)
      spread = (f' ± {last_eval["fcd_std"]:.3f} over {last_eval["num_seeds"]}'
                f' seeds' if 'fcd_std' in last_eval else '')
      eval_note = (f'  FCD {fcd:.3f}{spread}{" (best)" if is_best else ""}'
                   f'  score {last_eval["classifier_score"]:.2f}  digits '
                   f'{last_eval["classes_present"]:g}')
      if 'conditional_accuracy' in last_eval:
        eval_note += (f'  digit accuracy '
                      f'{last_eval["conditional_accuracy"]:.3f}')
    line = (f'epoch {done:3d}: d_loss {record["d_loss"]:.4f}  g_loss '
            f'{record["g_loss"]:.4f}  D(x) {record["d_real"]:.3f}  '
            f'D(G(z)) {record["d_fake"]:.3f}  '
            f'{record["steps_per_sec"]:.1f} steps/s{eval_note}')
    _finish_epoch(run, record, local_states, run_key, meta, is_best, line)

  start_time, first_step = time.time(), phase.step
  for done, record in phase.epochs(FLAGS.num_epochs, chunk, 'epoch'):
    # Only device work is queued here, behind the epoch: a copy of the
    # states (the next call consumes them), the grid's images and the
    # evaluation, all made from that copy. The next epoch's first call
    # follows at once; the host then fetches and writes all of it.
    local_states = parallel.local_copy((phase.state_g, phase.state_d))
    grid = None
    if done % FLAGS.sample_every_epochs == 0 or done == FLAGS.num_epochs:
      grid = _queue_grid(run, local_states[0], noise)
    evaluation, eval_seconds = None, 0.0
    if _eval_due(done):
      eval_start = time.time()
      # Every process evaluates its own copy of the same states, so all of
      # them take the same best-checkpoint decision (orbax saves
      # collectively).
      evaluation = _start_eval_seeds(local_states[0], reference, eval_key,
                                     FLAGS.eval_samples)
      eval_seconds = time.time() - eval_start
    phase.after_next_dispatch(functools.partial(
        finish_epoch, done, record, local_states, grid, phase.run_key,
        copy.deepcopy(phase.meta), evaluation, eval_seconds))
  run.checkpointer.wait_until_finished()
  run.best.wait_until_finished()
  run.finish_plot()
  resumed = (f' ({phase.step - first_step} of them in this run)'
             if first_step else '')
  print(f'Done: {FLAGS.num_epochs} epochs, {FLAGS.num_epochs * spe} steps'
        f'{resumed} in {time.time() - start_time:.1f}s; final d_loss '
        f'{record["d_loss"]:.4f}'
        f', g_loss {record["g_loss"]:.4f}, D(x) {record["d_real"]:.3f}, '
        f'D(G(z)) {record["d_fake"]:.3f}. Samples in '
        f'{os.path.join(run.workdir, "samples")}, checkpoint '
        f'{run.checkpointer.latest_step()}.')
  if last_eval is not None:
    meta = phase.meta
    print(f'Final FCD {last_eval["fcd"]:.3f}, classifier score '
          f'{last_eval["classifier_score"]:.2f}, '
          f'{last_eval["classes_present"]:g} digits present'
          f'{" (means over seeds)" if "per_seed" in last_eval else ""}; '
          f'best FCD {meta["best_fcd"]:.3f} at epoch '
          f'{meta["best_epoch"]} ({run.best.directory}/'
          f'{meta["best_step"]}).')


def discriminator_phase(run: Run) -> None:
  (config, state_g, state_d, run_key, meta, images, spe,
   step) = _start_phase(run, 'discriminator', require_checkpoint=True)
  if step >= FLAGS.num_epochs * spe:
    print(f'The discriminator already trained {step // spe} epochs alone in '
          f'{run.workdir}; raise --num_epochs to train it more.')
    return
  chunk = _steps_per_call(spe, _images_per_step(config.batch_size, run_key))
  loss = config.gan_loss()
  resumed = f', resuming at step {step}' if step % spe else ''
  print(f'Training the discriminator alone, epochs {step // spe + 1}..'
        f'{FLAGS.num_epochs} ({spe} steps each{resumed}); the generator is '
        'frozen.')

  seeds = run_key.ndim > 0
  discriminator_loop = (parallel.discriminator_loop_seeds if seeds else
                        parallel.discriminator_loop)(run.mesh)

  def dispatch(phase, size, first_step):
    phase.state_d, metrics = discriminator_loop(
        phase.state_g, phase.state_d, images, phase.loop_key,
        np.int32(first_step), num_steps=size, batch_size=config.batch_size,
        steps_per_epoch=spe, loss=loss, guard=_GUARD)
    return _merge_seeds(metrics) if seeds else metrics

  phase = _Phase(run, config, 'discriminator', _DISCRIMINATOR, spe,
                 (state_g, state_d), run_key, meta, step, dispatch)
  del state_g, state_d, meta  # From here on they live in `phase`.
  record = None
  for done, record in phase.epochs(FLAGS.num_epochs, chunk, 'D epoch'):
    line = (f'D epoch {done:3d}: d_loss {record["d_loss"]:.4f}  '
            f'D(x) {record["d_real"]:.3f}  D(G(z)) {record["d_fake"]:.3f}')
    # Written from a copy of the states while the device runs the next
    # epoch.
    phase.after_next_dispatch(functools.partial(
        _finish_epoch, run, record,
        parallel.local_copy((phase.state_g, phase.state_d)), phase.run_key,
        copy.deepcopy(phase.meta), False, line, plot=False))
  run.checkpointer.wait_until_finished()
  print(f'Done: the discriminator trained {FLAGS.num_epochs} epochs alone; '
        f'final d_loss {record["d_loss"]:.4f}, D(x) {record["d_real"]:.3f}, '
        f'D(G(z)) {record["d_fake"]:.3f}. Checkpoint '
        f'{run.checkpointer.latest_step()}.')


_PAIRWISE_IMAGES = 1000


def _image_statistics(images: np.ndarray, probabilities: np.ndarray) -> dict:
  """Pixel summaries of images in [-1, 1], `[N, 28, 28, 1]`."""
  pixels = (images.reshape(len(images), -1) + 1.0) / 2.0
  # Mean distance between different images: low when samples collapse.
  subset = pixels[:_PAIRWISE_IMAGES].astype(np.float64)
  squared = np.sum(subset ** 2, axis=1)
  distances = np.sqrt(np.maximum(
      squared[:, None] + squared[None, :] - 2.0 * subset @ subset.T, 0.0))
  num = len(subset)
  return {
      'pixel_mean': float(pixels.mean()),
      'pixel_std': float(pixels.std()),
      'ink_fraction': float((pixels > 0.5).mean()),
      'mean_pairwise_distance': float(distances.sum() / (num * (num - 1))),
      'discriminator_mean_probability': float(probabilities.mean()),
  }


def test_phase(run: Run) -> None:
  config, state_g, state_d, run_key, meta = run.restore_or_init(require=True)
  num = FLAGS.num_test_samples
  reference = _reference_statistics()
  test_images, test_labels = _load_split('test')
  train_images, train_labels = _load_split('train')
  generators = _seed_states(state_g)
  num_seeds = len(generators)
  # With several seeds the table shows the first; the spread over all of
  # them is summarised below it.
  keys = [_stream(run_key, _TEST)] if num_seeds == 1 else list(
      _stream(run_key, _TEST))
  key = keys[0]
  state_d = _seed_states(state_d)[0]
  sets = {
      'generated': _generate(generators[0], key, num),
      'real_train': np.asarray(jaxgan.to_float_images(train_images[:num])),
      'real_test': np.asarray(jaxgan.to_float_images(test_images[:num])),
      'uniform_noise': np.asarray(jax.random.uniform(
          jax.random.fold_in(key, 1_000_000), (num, 28, 28, 1), minval=-1.0,
          maxval=1.0)),
  }
  best_step = run.best.latest_step()
  if best_step is not None:
    try:
      *templates, key_template = _restore_templates(config, num_seeds)
      best_g, _, _, _ = run.best.restore(*templates,
                                         key_template=key_template)
    except CheckpointError as e:
      _warn(f'skipping the best checkpoint: {e}')
      best_step = None
  if best_step is not None:
    best_generators = _seed_states(best_g)
    sets = {'generated': sets.pop('generated'),
            'best_generated': _generate(best_generators[0], key, num),
            **sets}
  summary = {
      'checkpoint_step': run.restored_step,
      'best_checkpoint_step': best_step,
      'train_epochs': meta.get('train_epoch'),
      'discriminator_epochs': meta.get('discriminator_epoch'),
      'reference': f'MNIST test split, {reference.count} images',
  }
  # A conditional D scores every image with a label: the real ones with
  # their own, generated and noise images with the digits they were made as
  # (`_balanced_labels`; noise has none, so it gets the same).
  labels = {name: None for name in sets}
  if config.conditional:
    labels = {name: _balanced_labels(num, config.num_classes)
              for name in sets}
    labels.update(real_train=train_labels[:num].astype(np.int32),
                  real_test=test_labels[:num].astype(np.int32))
    summary['conditional_accuracy'] = {
        'generated': _start_conditional_accuracy(generators[0], key,
                                                 num).result()}
    if best_step is not None:
      summary['conditional_accuracy']['best_generated'] = (
          _start_conditional_accuracy(best_generators[0], key, num).result())
  for name, images in sets.items():
    start = time.time()
    probabilities = np.asarray(jaxgan.discriminate(
        state_d, images, None if labels[name] is None else
        jnp.asarray(labels[name])))
    summary[name] = {
        **_evaluate(images, reference).to_dict(),
        **_image_statistics(images, probabilities),
    }
    logging.info('Evaluated %s in %.1fs', name, time.time() - start)
  if num_seeds > 1:
    summary['seeds'] = {'num_seeds': num_seeds}
    checkpoints = [('generated', generators)]
    if best_step is not None:
      checkpoints.append(('best_generated', best_generators))
    for name, gens in checkpoints:
      fcds = [summary[name]['fcd']] + [
          _evaluate(_generate(g, k, num), reference).fcd
          for g, k in zip(gens[1:], keys[1:])]
      summary['seeds'][name] = {'fcd': fcds, 'fcd_mean': float(np.mean(fcds)),
                                'fcd_std': float(np.std(fcds, ddof=1))}
  if not run.main:
    return
  out_dir = os.path.join(run.workdir, 'test')
  os.makedirs(out_dir, exist_ok=True)
  shown = min(100, num)
  picture = images_lib.side_by_side(
      images_lib.image_grid(sets['generated'][:shown], columns=10),
      images_lib.image_grid(sets['real_test'][:shown], columns=10), gap=16)
  png = images_lib.save_png(
      picture, os.path.join(out_dir, 'generated_vs_real.png'), scale=2)
  _write_json(os.path.join(out_dir, 'summary.json'), summary)
  print(f'Test: {num} images of each set against the {reference.count} real '
        f'test images (checkpoint {summary["checkpoint_step"]}, '
        f'{summary["train_epochs"]} train epochs, '
        f'{summary["discriminator_epochs"]} D-only epochs'
        + (f'; best checkpoint {best_step}' if best_step is not None else '')
        + ')')
  print(f'{"":32s}' + ''.join(f'{name:>16s}' for name in sets))
  for field in ('fcd', 'classifier_score', 'classes_present',
                'class_kl_from_uniform', 'mean_confidence', 'pixel_mean',
                'ink_fraction', 'mean_pairwise_distance',
                'discriminator_mean_probability'):
    print(f'{field:32s}' + ''.join(f'{float(summary[name][field]):16.4f}'
                                   for name in sets))
  for name, result in summary.get('conditional_accuracy', {}).items():
    print(f'{name}: the classifier recognises the requested digit in '
          f'{result["conditional_accuracy"]:.1%} of samples (per digit: '
          + ', '.join(f'{a:.2f}' for a in result['per_class_accuracy'])
          + '); in the side-by-side grid, column j shows digit j')
  for name, seeds in summary.get('seeds', {}).items():
    if name != 'num_seeds':
      print(f'{name} over {num_seeds} seeds: FCD {seeds["fcd_mean"]:.3f} ± '
            f'{seeds["fcd_std"]:.3f} (the table shows seed '
            f'{meta.get("seed", 0)})')
  print(f'Lower FCD is better; real_train is the floor a perfect generator '
        f'would reach. Side by side (generated left, real right): {png}; '
        f'numbers in {os.path.join(out_dir, "summary.json")}')


def _use_compilation_cache(path: str | None) -> None:
  """Points JAX's persistent compilation cache at `path` (see the flag)."""
  if path is None:
    path = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'jaxgan', 'xla')
  jax.config.update('jax_compilation_cache_dir', path or None)
  if path and 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    # Every program: the many small ones (sampling, the classifier, the
    # states' initialisation) add up to seconds on a GPU.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors reported like the others: one
  message and exit status 2, instead of the usage text and status 1."""
  try:
    argv = FLAGS(argv)
  except flags.Error as e:
    message = str(e).rstrip(' .')
    end = '' if message.endswith('?') else '.'
    print(f'error: {message}{end} Run with --help for the flags.',
          file=sys.stderr)
    sys.exit(2)
  if len(argv) > 1:
    print(f'error: unexpected arguments {" ".join(argv[1:])!r}; every '
          'option is a --flag (run with --help for them).', file=sys.stderr)
    sys.exit(2)
  return argv


def main(argv):
  del argv  # Checked by _parse_flags.
  _use_compilation_cache(FLAGS.compilation_cache_dir)
  # tfds and orbax log routine notices as warnings; problems reach the user
  # as JaxganError messages instead.
  logging.set_verbosity(logging.ERROR)
  run = None
  try:
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                        FLAGS.process_id)
    if not parallel.is_main_process():
      # Process 0 reports; the others stay quiet unless something fails.
      sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
      FLAGS.progress = False
    _flag_config()  # Invalid values fail before the workdir is touched.
    run = Run(FLAGS.workdir)
    {'train': train_phase, 'discriminator': discriminator_phase,
     'test': test_phase}[FLAGS.phase](run)
  except JaxganError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except _Stopped as stopped:
    run.checkpointer.wait_until_finished()
    run.best.wait_until_finished()
    print(f'Stopped by {signal.Signals(stopped.signum).name} after step '
          f'{stopped.step}; checkpoint {run.checkpointer.latest_step()} saved '
          f'in {run.checkpointer.directory}. Run the same command again to '
          'resume.', file=sys.stderr)
    sys.exit(128 + stopped.signum)
  finally:
    if run is not None:
      run.close()


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
