"""End to end: examples/mnist_dcgan.py on real MNIST, all three phases."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import jaxgan
from conftest import REPO, example_command, leaves_equal, load_example

def _run(*flags, check=True, prelude=''):
  """Runs the example in a fresh interpreter; returns the finished process."""
  result = subprocess.run(example_command([*flags, '--noprogress'], prelude),
                          capture_output=True, text=True, timeout=600,
                          cwd=REPO)
  if check and result.returncode != 0:
    raise AssertionError(f'example failed ({result.returncode}):\n'
                         f'{result.stdout}\n{result.stderr}')
  return result


def _short_run(workdir, mnist_data_dir):
  """Flags of a two-step-per-epoch run with small evaluations."""
  return [f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
          '--steps_per_epoch=2', '--eval_samples=500', '--num_test_samples=500']


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _restore(workdir, step):
  config = jaxgan.DCGANConfig()
  with jaxgan.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    return ckpt.restore(*config.create_train_states(jax.random.key(0)), step)


def _assert_params_within_adam_rounding(states_a, states_b, steps):
  """G's and D's parameters at most 2 lr apart per step.

  Adam moves a parameter by about lr a step whatever its gradient's size,
  so where two programs round differently, gradients that are only rounding
  noise (biases in front of BatchNorm) can part two runs by up to 2 lr a
  step.
  """
  bound = 2 * jaxgan.DCGANConfig().learning_rate * steps + 1e-6
  for a, b in zip(jax.tree.leaves((states_a[0].params, states_a[1].params)),
                  jax.tree.leaves((states_b[0].params, states_b[1].params))):
    assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= bound


@pytest.mark.slow
def test_three_phases_and_resume(tmp_path, mnist_data_dir):
  workdir = str(tmp_path / 'run')
  common = [f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
            '--steps_per_epoch=3', '--eval_samples=500']

  first = _run(*common, '--num_epochs=1')
  assert 'Training epochs 1..1' in first.stdout
  assert 'Done: 1 epochs, 3 steps' in first.stdout
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
  samples = sorted(os.listdir(os.path.join(workdir, 'samples')))
  assert samples == ['epoch_000.png', 'epoch_001.png']
  grid = Image.open(os.path.join(workdir, 'samples', 'epoch_001.png'))
  assert grid.size == (2 * (8 * 30 + 2), 2 * (8 * 30 + 2))
  records = _jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['epoch'] for r in records] == [1]
  assert set(records[0]) >= {'d_loss', 'g_loss', 'd_real', 'd_fake', 'fcd',
                             'classifier_score', 'classes_present',
                             'class_histogram'}
  assert records[0]['eval_samples'] == 500
  assert os.listdir(os.path.join(workdir, 'best')) == ['3']
  assert 'FCD' in first.stdout and 'best FCD' in first.stdout
  with open(os.path.join(workdir, 'steps.csv')) as f:
    assert len(f.readlines()) == 1 + 3
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert os.path.isfile(os.path.join(workdir, 'losses.png'))

  # The same command with more epochs resumes instead of starting over.
  second = _run(*common, '--num_epochs=2')
  assert 'Training epochs 2..2' in second.stdout
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  records = _jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['epoch'] for r in records] == [1, 2]
  assert records[0] == _jsonl(os.path.join(workdir, 'metrics.jsonl'))[0]
  g_trained, d_trained, key_trained, meta = _restore(workdir, 6)
  assert int(g_trained.step) == 6 and meta['train_epoch'] == 2
  # The best checkpoint holds the generator of the lowest logged FCD.
  best_record = min(records, key=lambda r: r['fcd'])
  assert meta['best_fcd'] == best_record['fcd']
  assert meta['best_step'] == best_record['step']
  assert os.listdir(os.path.join(workdir, 'best')) == [str(best_record['step'])]
  with open(os.path.join(workdir, 'eval_summary.json')) as f:
    eval_summary = json.load(f)
  assert eval_summary['final']['fcd'] == records[-1]['fcd']
  assert eval_summary['final']['step'] == 6
  assert eval_summary['best']['fcd'] == best_record['fcd']

  # Phase two trains D alone; G stays as trained.
  third = _run(f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
               '--phase=discriminator', '--num_epochs=1')
  assert 'generator is frozen' in third.stdout
  g_after, d_after, key_after, meta = _restore(workdir, 9)
  assert leaves_equal(g_after, g_trained)
  assert not leaves_equal(d_after.params, d_trained.params)
  assert int(d_after.step) == 9 and meta['discriminator_epoch'] == 1
  np.testing.assert_array_equal(jax.random.key_data(key_after),
                                jax.random.key_data(key_trained))
  records = _jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['phase'] for r in records] == ['train', 'train', 'discriminator']

  # Phase three: generated images against the real test set.
  fourth = _run(f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
                '--phase=test', '--num_test_samples=1000')
  assert 'classifier_score' in fourth.stdout
  assert 'discriminator_mean_probability' in fourth.stdout
  with open(os.path.join(workdir, 'test', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['checkpoint_step'] == 9
  assert summary['best_checkpoint_step'] == best_record['step']
  names = ('generated', 'best_generated', 'real_train', 'real_test',
           'uniform_noise')
  for name in names:
    assert summary[name]['num_images'] == 1000
    assert 1.0 <= summary[name]['classifier_score'] <= 10.0
  # Six steps of training are far from real digits; real ones are close.
  assert summary['real_train']['fcd'] < summary['generated']['fcd'] / 20
  assert summary['real_train']['classes_present'] == 10
  assert summary['real_train']['classifier_score'] > 9.5
  assert summary['uniform_noise']['fcd'] > 100 * summary['real_train']['fcd']
  # Real test digits: ~13% bright pixels, spread-out images.
  assert 0.1 < summary['real_test']['ink_fraction'] < 0.2
  assert summary['real_test']['mean_pairwise_distance'] > 5
  picture = Image.open(os.path.join(workdir, 'test', 'generated_vs_real.png'))
  assert picture.size[0] > 2 * picture.size[1] - 40

  # Training again to the same epoch count has nothing left to do.
  again = _run(*common, '--num_epochs=2')
  assert 'Already trained 2 epochs' in again.stdout


@pytest.mark.slow
def test_resume_refuses_a_different_model(tmp_path, mnist_data_dir):
  workdir = str(tmp_path / 'run')
  _run(f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
       '--steps_per_epoch=1', '--num_epochs=1')
  result = _run(f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
                '--batch_size=32', '--num_epochs=2', check=False)
  assert result.returncode == 2
  assert 'batch_size: checkpoint has 64, now 32' in result.stderr
  assert 'Traceback' not in result.stderr
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']


@pytest.mark.slow
def test_toolkit_flags_train_resume_and_test(tmp_path, mnist_data_dir):
  """WGAN-GP with 2 critic steps, spectral norm and an EMA of G, end to end."""
  workdir = str(tmp_path / 'run')
  common = _short_run(workdir, mnist_data_dir)
  toolkit = ['--loss=wasserstein', '--penalty=gradient_penalty',
             '--n_critic=2', '--spectral_norm', '--ema_decay=0.9',
             '--nodiscriminator_batch_norm']
  first = _run(*common, *toolkit, '--num_epochs=1')
  assert '2 steps of 128 images each' in first.stdout
  # Checkpoints are numbered by D's updates: 2 per G update.
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['4']
  # The resumed run takes the toolkit options from the checkpoint; a flag
  # given again with another value changes the rest of the run, and says so.
  resumed = _run(*common, '--num_epochs=2', '--penalty_weight=5')
  assert ('warning: resuming with --penalty_weight=5.0 (the checkpoint has '
          '10.0)') in resumed.stderr
  assert 'warning' not in first.stderr
  config = jaxgan.DCGANConfig(
      loss='wasserstein', penalty='gradient_penalty', n_critic=2,
      spectral_norm=True, ema_decay=0.9, discriminator_batch_norm=False)
  with jaxgan.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    state_g, state_d, _, meta = ckpt.restore(
        *config.create_train_states(jax.random.key(0)), 8)
  assert int(state_g.step) == 4 and int(state_d.step) == 8
  assert meta['config']['n_critic'] == 2
  assert meta['config']['penalty_weight'] == 5.0
  assert not leaves_equal(state_g.ema_params, state_g.params)
  assert 'SpectralNorm_0' in state_d.batch_stats
  with open(os.path.join(workdir, 'steps.csv')) as f:
    rows = f.read().splitlines()
  assert rows[0].endswith('d_penalty') and len(rows) == 5
  assert all(float(row.split(',')[-1]) > 0 for row in rows[1:])
  _run(*common, '--phase=test')
  with open(os.path.join(workdir, 'test', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['checkpoint_step'] == 8
  assert np.isfinite(summary['generated']['fcd'])

  changed = _run(*common, '--n_critic=1', '--num_epochs=3', check=False)
  assert changed.returncode == 2
  assert 'n_critic: checkpoint has 2, now 1' in changed.stderr
  assert 'Traceback' not in changed.stderr


@pytest.mark.slow
def test_conditional_example_writes_a_row_per_digit(tmp_path, mnist_data_dir):
  workdir = str(tmp_path / 'run')
  common = _short_run(workdir, mnist_data_dir)
  out = _run(*common, '--conditional', '--num_epochs=1')
  assert 'digit accuracy' in out.stdout
  grid = Image.open(os.path.join(workdir, 'samples', 'epoch_001.png'))
  assert grid.size == (2 * (8 * 30 + 2), 2 * (10 * 30 + 2))
  (record,) = _jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert len(record['per_class_accuracy']) == 10
  np.testing.assert_allclose(record['conditional_accuracy'],
                             np.mean(record['per_class_accuracy']))
  test = _run(*common, '--phase=test')
  assert 'column j shows digit j' in test.stdout
  with open(os.path.join(workdir, 'test', 'summary.json')) as f:
    summary = json.load(f)
  accuracy = summary['conditional_accuracy']['generated']
  assert 0.0 <= accuracy['conditional_accuracy'] <= 1.0
  assert len(accuracy['per_class_accuracy']) == 10


@pytest.mark.slow
def test_four_seeds_in_one_program_match_four_separate_runs(
    tmp_path, mnist_data_dir):
  common = [f'--data_dir={mnist_data_dir}', '--steps_per_epoch=2',
            '--num_epochs=1', '--eval_samples=500']
  together = str(tmp_path / 'seeds')
  out = _run(f'--workdir={together}', '--seed=10', '--num_seeds=4', *common)
  assert 'over 4 seeds' in out.stdout
  (record,) = _jsonl(os.path.join(together, 'metrics.jsonl'))
  assert len(record['fcd_per_seed']) == 4
  np.testing.assert_allclose(record['fcd'], np.mean(record['fcd_per_seed']))
  assert record['fcd_std'] > 0
  grid = Image.open(os.path.join(together, 'samples', 'epoch_001.png'))
  assert grid.size == (2 * (8 * 30 + 2), 2 * (4 * 30 + 2))  # A row per seed.

  config = jaxgan.DCGANConfig()
  templates = jaxgan.stack_seeds(
      [config.create_train_states(jax.random.key(i)) for i in range(4)])
  with jaxgan.Checkpointer(os.path.join(together, 'checkpoints')) as ckpt:
    state_g, state_d, keys, meta = ckpt.restore(
        *templates, key_template=jax.vmap(jax.random.key)(np.arange(4)))
  assert meta['num_seeds'] == 4
  for i in range(4):
    alone = str(tmp_path / f'seed{i}')
    _run(f'--workdir={alone}', f'--seed={10 + i}', *common)
    (alone_record,) = _jsonl(os.path.join(alone, 'metrics.jsonl'))
    np.testing.assert_allclose(record['fcd_per_seed'][i],
                               alone_record['fcd'], rtol=2e-3)
    alone_g, alone_d, alone_key, _ = _restore(alone, 2)
    np.testing.assert_array_equal(jax.random.key_data(keys[i]),
                                  jax.random.key_data(alone_key))
    # Batched and unbatched convolutions round differently; a wrong seed
    # would differ by far more.
    _assert_params_within_adam_rounding(
        (alone_g, alone_d), jaxgan.seed_slice((state_g, state_d), i), 2)
  refused = _run(f'--workdir={together}', '--num_seeds=2', '--num_epochs=2',
                 *common[:2], check=False)
  assert refused.returncode == 2
  assert 'trains 4 seed(s), not --num_seeds=2' in refused.stderr


@pytest.mark.parametrize('flags, message', [
    (['--phase=test'], 'No checkpoint'),
    (['--phase=discriminator'], 'Run --phase=train'),
    (['--phase=evaluate'], '<train|discriminator|test>'),
    (['--num_epochs=-1'], 'num_epochs'),
    (['--learning_rate=3'], 'learning_rate must be in'),
    (['--loss=wgan'], 'minimax'),
    (['--penalty=r1', '--penalty_weight=0'], 'weight must be positive'),
    (['--ema_decay=1'], 'ema_decay must be in'),
    (['--n_critic=0'], 'n_critic'),
    (['--batch_size=0'], '0 is not a positive integer'),
    (['--learning_rat=0.1'], "Unknown command line flag 'learning_rat'"),
    (['stray'], "unexpected arguments 'stray'"),
])
def test_bad_invocations_give_one_clear_message(tmp_path, flags, message):
  result = _run(f'--workdir={tmp_path}', *flags, check=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert 'USAGE' not in result.stdout + result.stderr


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  result = _run(f'--workdir={blocker}/run', check=False)
  assert result.returncode == 2
  assert 'Cannot write to --workdir' in result.stderr
  assert 'Traceback' not in result.stderr


def test_offline_without_mnist_gives_advice_quickly(tmp_path):
  offline = ('import socket\n'
             'def refuse(*a, **k):\n'
             '  raise OSError("network is unreachable")\n'
             'socket.create_connection = refuse')
  result = _run(f'--workdir={tmp_path}/run', f'--data_dir={tmp_path}/tfds',
                check=False, prelude=offline)
  assert result.returncode == 2
  assert '--mnist_dir=DIR' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_readme_library_example_runs(tmp_path, mnist_data_dir):
  """The README's `import jaxgan` example, shortened to three steps."""
  import re  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, 'README.md')) as f:
    training, evaluation, queued = re.findall(r'```python\n(.*?)```',
                                              f.read(), re.S)[:3]
  assert 'for step in range(100):' in training
  assert 'jaxgan.evaluate(' in evaluation
  assert 'start_evaluation(' in queued and 'num_steps=100' in queued
  code = training.replace('for step in range(100):', 'for step in range(3):')
  code += ('\nassert samples.shape == (16, 28, 28, 1)\n'
           'assert int(state_g.step) == 3\n')
  code += evaluation.replace('10_000', '1000')
  code += ('\nassert result.num_images == real.num_images == 1000\n'
           'assert real.fcd < result.fcd / 10\n'
           'assert real.classes_present == 10\n')
  code += queued.replace('10_000', '1000').replace('num_steps=100',
                                                   'num_steps=2')
  # The queued evaluation saw G before the loop consumed it.
  code += ('\nassert pending.result() == result\n'
           'assert int(state_g.step) == 5\n')
  script = tmp_path / 'readme_example.py'
  script.write_text(code)
  result = subprocess.run(
      [sys.executable, str(script)], capture_output=True, text=True,
      timeout=600, cwd=REPO, env={**os.environ, 'TFDS_DATA_DIR': mnist_data_dir})
  assert result.returncode == 0, result.stderr
  assert "'d_loss'" in result.stdout


@pytest.mark.slow
def test_fused_calls_train_like_one_step_per_call(tmp_path, mnist_data_dir):
  """Several steps per call, the default, against one per call: the same
  steps, data, keys, checkpoints and records, losses and states equal up to
  float32 rounding. Four steps an epoch in calls of three are cut at the
  epoch's end: each epoch runs a call of 3, then 1."""
  def run(name, per_call):
    workdir = tmp_path / name
    result = _run(f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
                  '--steps_per_epoch=4', '--num_epochs=2',
                  '--eval_samples=500', f'--steps_per_call={per_call}')
    with open(workdir / 'steps.csv') as f:
      rows = [line.split(',') for line in f.read().splitlines()]
    return workdir, result.stdout, rows

  fused, fused_stdout, fused_rows = run('fused', 3)
  single, _, single_rows = run('single', 1)
  assert '3 per call' in fused_stdout
  assert 'Done: 2 epochs, 8 steps' in fused_stdout
  assert fused_rows[0] == single_rows[0] and len(fused_rows) == 1 + 8
  for got, want in zip(fused_rows[1:], single_rows[1:]):
    assert got[:2] == want[:2]  # Phase and step.
    np.testing.assert_allclose([float(v) for v in got[2:6]],
                               [float(v) for v in want[2:6]], rtol=1e-4)
  assert ([r['step'] for r in _jsonl(fused / 'metrics.jsonl')]
          == [r['step'] for r in _jsonl(single / 'metrics.jsonl')] == [4, 8])
  for workdir in (fused, single):
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']
  fused_g, fused_d, fused_key, _ = _restore(str(fused), 8)
  single_g, single_d, single_key, _ = _restore(str(single), 8)
  np.testing.assert_array_equal(jax.random.key_data(fused_key),
                                jax.random.key_data(single_key))
  assert int(fused_g.step) == int(single_g.step) == 8
  # The losses above check the data and keys.
  _assert_params_within_adam_rounding((fused_g, fused_d), (single_g, single_d),
                                      8)


def test_cpu_calls_hold_about_1024_images_unless_the_flag_says(tmp_path):
  # pylint: disable=protected-access
  example = load_example()
  example.FLAGS(['mnist_dcgan.py', f'--workdir={tmp_path}'])
  assert jax.default_backend() == 'cpu'
  steps_per_call = example._steps_per_call
  assert steps_per_call(937, 64) == 16
  assert steps_per_call(937, 256) == 4
  assert steps_per_call(937, 1024) == steps_per_call(937, 4096) == 1
  assert steps_per_call(6, 64) == 6  # Never more than an epoch.
  # Four seeds of batch 64 read 256 images a step.
  seeds = jax.vmap(jax.random.key)(np.arange(4))
  assert example._images_per_step(64, seeds) == 256
  assert example._images_per_step(64, jax.random.key(0)) == 64
  example.FLAGS.steps_per_call = 5
  assert steps_per_call(937, 64) == steps_per_call(937, 4096) == 5
  assert steps_per_call(3, 64) == 3


@pytest.mark.slow
def test_epoch_writes_wait_for_the_next_epochs_first_call(tmp_path,
                                                          mnist_data_dir):
  """An epoch's evaluation is queued before the next epoch's first call and
  collected after it; its checkpoint is written then too (from host
  copies), so the device does not idle through either. The last epoch's are
  done before the run reports it done. The discriminator phase defers its
  checkpoints the same way."""
  prelude = '''
import atexit
from jaxgan import checkpoint, metrics, parallel
events = []
def logged(name, function):
  def wrapper(*args, **kwargs):
    events.append(name(args) if callable(name) else name)
    return function(*args, **kwargs)
  return wrapper
checkpoint.Checkpointer.save = logged(lambda args: f'save {args[1]}',
                                      checkpoint.Checkpointer.save)
metrics.start_evaluation = logged('eval queued', metrics.start_evaluation)
metrics.Pending.result = logged('eval collected', metrics.Pending.result)
def logged_loop(make):
  def make_logged(mesh):
    loop = make(mesh)
    call = logged('call', loop)
    call.lower = loop.lower
    return call
  return make_logged
for name in ('train_loop', 'discriminator_loop'):
  setattr(parallel, name, logged_loop(getattr(parallel, name)))
atexit.register(lambda: print('EVENTS', ','.join(events)))
'''
  workdir = tmp_path / 'run'

  def events(result):
    return result.stdout.split('EVENTS ')[1].splitlines()[0].split(',')

  result = _run(*_short_run(workdir, mnist_data_dir), '--num_epochs=2',
                '--steps_per_call=1', prelude=prelude)
  with open(workdir / 'eval_summary.json') as f:
    best_epoch = json.load(f)['best']['epoch']
  # Two steps per epoch, one per call. Epoch 1 is the best so far, so its
  # best checkpoint (D's update 2) is saved before its latest one.
  # `eval collected` is logged once by `_start_eval_seeds`' own pending
  # summary and once by the evaluation inside it.
  collected = ['eval collected'] * 2
  # The evaluation queued first readies its programs while the loop's
  # compiles; it is never collected.
  assert events(result) == (
      ['eval queued', 'call', 'call', 'eval queued', 'call', *collected,
       'save 2', 'save 2', 'call', 'eval queued', *collected]
      + ['save 4'] * (2 if best_epoch == 2 else 1))
  assert 'Done: 2 epochs' in result.stdout

  result = _run(*_short_run(workdir, mnist_data_dir), '--num_epochs=2',
                '--steps_per_call=1', '--phase=discriminator', prelude=prelude)
  # The D phase's steps count on from the train phase's 4 D updates.
  assert events(result) == ['call', 'call', 'call', 'save 6', 'call',
                            'save 8']


def test_compiled_programs_are_kept_for_the_next_run(tmp_path,
                                                    mnist_data_dir):
  """--compilation_cache_dir: the first run stores every program it
  compiles; a second run with new states loads all of them."""
  prelude = '''
import atexit, collections
import jax
counts = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: counts.update([name]))
atexit.register(lambda: print('CACHE', counts['/jax/compilation_cache/cache_hits'],
                              counts['/jax/compilation_cache/cache_misses']))
'''
  cache = tmp_path / 'xla'

  def run(name):
    result = _run(*_short_run(tmp_path / name, mnist_data_dir),
                  '--num_epochs=1', f'--compilation_cache_dir={cache}',
                  prelude=prelude)
    hits, misses = result.stdout.split('CACHE ')[1].split()[:2]
    return int(hits), int(misses), sorted(os.listdir(cache))

  hits, misses, entries = run('first')
  assert hits == 0 and misses > 5
  assert len(entries) >= misses
  hits, misses, entries_after = run('second')
  assert misses == 0 and hits > 5
  assert entries_after == entries

