"""Crash, signal and divergence behaviour of examples/mnist_dcgan.py.

A run killed with SIGKILL at random moments and restarted with the same
command must end bit for bit where an uninterrupted run ends: states,
optimiser, BatchNorm statistics, key, logged metrics and the best checkpoint.
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import jaxgan
from conftest import REPO, example_command

# Wall-clock fields differ between any two runs; everything else must not.
_TIMING = ('seconds', 'steps_per_sec', 'eval_seconds')


def _flags(workdir, data_dir):
  # The CPU's default steps per call fuses each epoch's 6 steps, and the
  # checkpoints every 4 steps cut calls: steps 1-4, 5-6, 7-8, 9-12, 13-16,
  # 17-18.
  return [f'--workdir={workdir}', f'--data_dir={data_dir}',
          '--steps_per_epoch=6', '--num_epochs=3', '--eval_samples=200',
          '--checkpoint_every_steps=4', '--keep_checkpoints=2',
          '--noprogress']


def _run(flags, prelude='', check=True):
  result = subprocess.run(example_command(flags, prelude), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
  if check and result.returncode != 0:
    raise AssertionError(f'example failed ({result.returncode}):\n'
                         f'{result.stdout}\n{result.stderr}')
  return result


def _start(flags):
  return subprocess.Popen(example_command(flags), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)


def _restore(directory, step=None):
  templates = jaxgan.DCGANConfig().create_train_states(jax.random.key(0))
  with jaxgan.Checkpointer(directory) as ckpt:
    return ckpt.restore(*templates, step=step)


def _assert_same_state(workdir_a, workdir_b, folder='checkpoints'):
  g_a, d_a, key_a, meta_a = _restore(os.path.join(workdir_a, folder))
  g_b, d_b, key_b, meta_b = _restore(os.path.join(workdir_b, folder))
  leaves_a = jax.tree.leaves((g_a, d_a))
  leaves_b = jax.tree.leaves((g_b, d_b))
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(jax.random.key_data(key_a),
                                jax.random.key_data(key_b))
  assert meta_a == meta_b


def _logs(workdir):
  with open(os.path.join(workdir, 'steps.csv'), newline='') as f:
    steps = list(csv.DictReader(f))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    epochs = [{k: v for k, v in json.loads(line).items() if k not in _TIMING}
              for line in f]
  return steps, epochs


def _assert_same_run(reference, other):
  _assert_same_state(reference, other)
  _assert_same_state(reference, other, 'best')
  assert _logs(reference) == _logs(other)
  with open(os.path.join(reference, 'eval_summary.json')) as f:
    want = json.load(f)
  with open(os.path.join(other, 'eval_summary.json')) as f:
    got = json.load(f)
  assert want['final'] == got['final']
  assert want['best']['fcd'] == got['best']['fcd']
  assert want['best']['step'] == got['best']['step']


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, mnist_data_dir):
  """An uninterrupted run: 3 epochs of 6 steps, checkpoints every 4 steps."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  result = _run(_flags(workdir, mnist_data_dir))
  assert 'Done: 3 epochs, 18 steps' in result.stdout
  steps, epochs = _logs(workdir)
  assert len(steps) == 18 and [e['epoch'] for e in epochs] == [1, 2, 3]
  return workdir


def _logged_steps(workdir) -> int:
  try:
    with open(os.path.join(workdir, 'steps.csv')) as f:
      return max(len(f.readlines()) - 1, 0)
  except OSError:
    return 0


def _checkpoint_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(
    tmp_path, mnist_data_dir, reference_run):
  """Kills during start-up, then after random numbers of logged steps."""
  workdir = str(tmp_path / 'run')
  flags = _flags(workdir, mnist_data_dir)
  rng = random.Random(1234)
  targets = sorted(rng.sample(range(2, 18), 3))
  seen_checkpoints = set()
  process = _start(flags)
  time.sleep(rng.uniform(0.5, 3.0))
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  for target in targets:
    process = _start(flags)
    deadline = time.time() + 300
    while _logged_steps(workdir) < target and process.poll() is None:
      assert time.time() < deadline
      time.sleep(0.01)
    assert process.poll() is None, 'the run ended before the kill point'
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    seen_checkpoints.update(_checkpoint_steps(workdir))
  # Some kills came after mid-epoch checkpoints (epochs end at 6, 12, 18).
  assert any(step % 6 for step in seen_checkpoints), seen_checkpoints
  final = _run(flags)
  assert 'Done: 3 epochs' in final.stdout
  _assert_same_run(reference_run, workdir)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_bit_exact(
    tmp_path, mnist_data_dir, reference_run):
  workdir = str(tmp_path / 'run')
  flags = _flags(workdir, mnist_data_dir)
  process = _start(flags)
  deadline = time.time() + 300
  while _logged_steps(workdir) < 8 and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, stderr
  assert 'Stopped by SIGTERM after step' in stderr
  assert 'Run the same command again to resume' in stderr
  assert 'Traceback' not in stderr
  stopped_at = int(stderr.split('after step ')[1].split(';')[0])
  assert 8 <= stopped_at < 18
  with jaxgan.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    assert ckpt.latest_step() == stopped_at
  resumed = _run(flags)
  assert (f'Done: 3 epochs, 18 steps ({18 - stopped_at} of them in this run)'
          in resumed.stdout)
  _assert_same_run(reference_run, workdir)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, reference_run, mnist_data_dir):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_run, workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(checkpoints), key=int) == ['16', '18']
  # Damage every array file of the latest checkpoint's generator state.
  damaged = 0
  for root, _, files in os.walk(os.path.join(checkpoints, '18', 'state_g')):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
      damaged += 1
  assert damaged
  result = _run([f'--workdir={workdir}', f'--data_dir={mnist_data_dir}',
                 '--phase=test', '--num_test_samples=200', '--noprogress'])
  assert 'checkpoint 18' in result.stderr and 'damaged' in result.stderr
  assert 'resuming from checkpoint 16' in result.stderr
  with open(os.path.join(workdir, 'test', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['train_epochs'] == 2 and summary['checkpoint_step'] == 16
  # The damaged checkpoint is kept aside, not deleted.
  aside = os.listdir(os.path.join(workdir, 'damaged'))
  assert len(aside) == 1 and aside[0].startswith('18.')
  assert _checkpoint_steps(workdir) == [16]

  # Training resumes from 16 and writes step 18 afresh: the same result as
  # the run that was never damaged.
  resumed = _run(_flags(workdir, mnist_data_dir))
  assert 'Done: 3 epochs' in resumed.stdout
  _assert_same_state(reference_run, workdir)


@pytest.mark.slow
def test_fresh_start_sets_an_earlier_runs_best_checkpoint_aside(
    tmp_path, reference_run, mnist_data_dir):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_run, workdir)
  (earlier_best,) = os.listdir(os.path.join(workdir, 'best'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  flags = [f for f in _flags(workdir, mnist_data_dir)
           if not f.startswith('--num_epochs')]
  result = _run(flags + ['--num_epochs=1'])
  assert f'the best checkpoint {earlier_best} of an earlier run' in (
      result.stderr)
  # Kept, not deleted, and out of this run's way: best/ holds this run's
  # own best, from its one evaluation (step 6), and the summary points there.
  aside = os.listdir(os.path.join(workdir, 'earlier_best'))
  assert len(aside) == 1 and aside[0].startswith(f'{earlier_best}.')
  with open(os.path.join(workdir, 'eval_summary.json')) as f:
    assert json.load(f)['best']['step'] == 6
  assert os.listdir(os.path.join(workdir, 'best')) == ['6']


_POISON = '''
import jax, jax.numpy as jnp
from jaxgan import parallel
_real_factory, _calls = parallel.train_loop, [0]
def _poisoned_factory(mesh):
  loop = _real_factory(mesh)
  def poisoned(state_g, state_d, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == POISON_CALL:
      state_d = state_d.replace(params=jax.tree.map(
          lambda p: p * jnp.nan, state_d.params))
    return loop(state_g, state_d, *args, **kwargs)
  return poisoned
parallel.train_loop = _poisoned_factory
'''


@pytest.mark.slow
def test_divergence_stops_with_the_step_and_the_last_good_checkpoint(
    tmp_path, mnist_data_dir):
  workdir = str(tmp_path / 'run')
  # One step per call: call 10 is step 10, after checkpoint 8.
  flags = _flags(workdir, mnist_data_dir) + ['--steps_per_call=1']
  result = _run(flags, prelude=_POISON.replace('POISON_CALL', '10'),
                check=False)
  assert result.returncode == 2
  assert 'diverged at step 10' in result.stderr
  assert 'the last good checkpoint is 8' in result.stderr
  assert '--on_divergence=rollback' in result.stderr
  assert 'Traceback' not in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')),
                key=int) == ['6', '8']
  g, d, _, _ = _restore(os.path.join(workdir, 'checkpoints'))
  assert int(g.step) == 8
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves((g, d)))

  # Rolling back continues from checkpoint 8 with a new key and finishes.
  rolled = _run(flags + ['--on_divergence=rollback'],
                prelude=_POISON.replace('POISON_CALL', '3'))
  assert 'rolled back to checkpoint 8' in rolled.stdout + rolled.stderr
  assert 'Done: 3 epochs' in rolled.stdout
  _, meta = _restore(os.path.join(workdir, 'checkpoints'))[2:]
  assert meta['rollbacks'] == 1
  with open(os.path.join(workdir, 'steps.csv'), newline='') as f:
    logged = [int(row['step']) for row in csv.DictReader(f)]
  assert logged == list(range(1, 19))
