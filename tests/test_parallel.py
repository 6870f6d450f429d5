"""Data parallelism: 8 devices, two processes, and the one-device path."""

import os
import re
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import jaxgan
from jaxgan import parallel
from conftest import REPO, make_states

WORKER = os.path.join(REPO, 'tests', 'parallel_worker.py')


def _worker(*args, devices=1, **popen):
  env = {**os.environ,
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, **popen)


def _finish(process, timeout=600, with_stderr=False):
  stdout, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, f'{stdout}\n{stderr[-4000:]}'
  return (stdout, stderr) if with_stderr else stdout


def _assert_close(want: dict, got: dict):
  assert sorted(want) == sorted(got)
  for name in want:
    if want[name].dtype.kind == 'f':
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                 err_msg=name)
    else:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _split(npz, prefix):
  return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
  """Same global batch, keys and data blocks: same states and metrics."""
  out = str(tmp_path / 'devices.npz')
  _finish(_worker('devices', out, devices=8))
  with np.load(out) as loop:
    _assert_close(_split(loop, 'one/'), _split(loop, 'eight/'))
    _assert_close(_split(loop, 'one_metric/'), _split(loop, 'eight_metric/'))
    assert _split(loop, 'eight_metric/')['finite'].all()
  # One train step: BatchNorm statistics are those of the global batch.
  with np.load(out.replace('.npz', '_step.npz')) as step:
    _assert_close(_split(step, 'one/'), _split(step, 'eight/'))
    stats = [k for k in step.files if 'batch_stats' in k and 'eight/' in k]
    assert stats


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_share_a_checkpoint(tmp_path):
  out = str(tmp_path / 'processes.npz')
  port = _free_port()
  workers = [_worker('process', out, pid, 2, port, devices=2)
             for pid in range(2)]
  single = str(tmp_path / 'single.npz')
  outputs = [_finish(w) for w in workers]
  assert 'rows 0 128 devices 2 4' in outputs[0]
  assert 'rows 128 256 devices 2 4' in outputs[1]
  # Both processes set checkpoint 5 aside: one folder moved, one name.
  moved = [re.search(r'set aside (\S+) steps \[4\]', o).group(1)
           for o in outputs]
  assert moved[0] == moved[1], moved
  assert os.listdir(tmp_path / 'processes_aside') == [os.path.basename(
      moved[0])]
  assert {'state_g', 'state_d', 'key', 'meta'} <= set(os.listdir(moved[0]))
  # One process, one device, the same 4 data blocks.
  _finish(_worker('single', single, 4))
  with np.load(out) as multi, np.load(single) as one:
    _assert_close(dict(one), dict(multi))

  # The checkpoint the two processes wrote restores in this one process.
  import optax  # pylint: disable=g-import-not-at-top
  templates = make_states(optimizer=optax.sgd(1e-3))
  with jaxgan.Checkpointer(str(tmp_path / 'processes_ckpt')) as ckpt:
    g, d, key, meta = ckpt.restore(*templates)
  assert meta == {'processes': 2} and int(g.step) == 4
  restored = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
              jax.tree_util.tree_flatten_with_path((g, d))[0]}
  with np.load(out) as multi:
    for name, value in restored.items():
      np.testing.assert_array_equal(value, multi[name], err_msg=name)
  np.testing.assert_array_equal(jax.random.key_data(key),
                                jax.random.key_data(jax.random.key(2)))


def test_one_device_mesh_is_the_plain_path(states, real_batch):
  mesh = parallel.make_mesh()
  assert parallel.num_shards(mesh) == jax.device_count() == 1
  step = parallel.train_step(mesh)
  batch = np.asarray(real_batch)
  key = jax.random.key(3)
  copies = jax.tree.map(np.array, states)
  g1, d1, m1 = step(*parallel.replicate(copies, mesh),
                    parallel.shard_batch(batch, mesh), key)
  g2, d2, m2 = jaxgan.train_step(*parallel.replicate(copies, mesh), batch,
                                 key)
  for a, b in zip(jax.tree.leaves((g1, d1, m1)), jax.tree.leaves((g2, d2, m2))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_local_copy_outlives_the_call_that_consumes_the_states(
    states, real_batch):
  mesh = parallel.make_mesh()
  want = jax.tree.map(np.array, states)
  g, d = parallel.replicate(want, mesh)
  copies = parallel.local_copy((g, d))
  step = parallel.train_step(mesh)
  new_g, _, _ = step(g, d, parallel.shard_batch(np.asarray(real_batch), mesh),
                     jax.random.key(3))
  # The step donated the states it was given; the copies are separate.
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves((g, d)))
  leaves = jax.tree.leaves(copies)
  assert not any(leaf.is_deleted() for leaf in leaves)
  assert all(leaf.sharding.device_set == {jax.local_devices()[0]}
             for leaf in leaves)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(
      copies))):
    np.testing.assert_array_equal(a, b)
  assert int(new_g.step) == int(want[0].step) + 1


def test_a_loop_compiled_ahead_in_a_thread_runs_without_compiling(states):
  mesh = parallel.make_mesh()
  g, d = parallel.replicate(jax.tree.map(np.array, states), mesh)
  images = parallel.shard_dataset(
      np.random.default_rng(0).integers(0, 256, (128, 28, 28, 1), np.uint8),
      mesh)
  key = jax.random.key(5)
  loop = parallel.train_loop(mesh)
  options = {'num_steps': 2, 'batch_size': 16, 'steps_per_epoch': 8,
             'guard': 'detect'}
  with pytest.raises(TypeError, match='num_step'):
    loop.lower(g, d, images, key, num_step=2)
  worker = threading.Thread(
      target=lambda: loop.lower(g, d, images, key, **options).compile())
  worker.start()
  worker.join()
  programs = []
  watching = [True]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kwargs: programs.append(event)
      if watching[0] and event.startswith(('/jax/core/compile/backend',
                                           '/jax/compilation_cache/cache_ret'))
      else None)
  try:
    _, _, metrics = loop(g, d, images, key, **options)
    jax.block_until_ready(metrics)
  finally:
    watching[0] = False
  assert not programs
  assert np.all(np.isfinite(np.asarray(metrics['d_loss'])))


def test_sharded_epoch_order_shuffles_each_block_alone():
  order = np.asarray(jaxgan.epoch_permutation(jax.random.key(0), 2, 40, 4))
  assert order.shape == (4, 10)
  for row in order:
    assert sorted(row.tolist()) == list(range(10))
  assert not all(np.array_equal(order[0], row) for row in order[1:])
  single = jaxgan.epoch_permutation(jax.random.key(0), 2, 40)
  assert sorted(np.asarray(single).tolist()) == list(range(40))


def test_uneven_shards_are_refused(states):
  images = np.zeros((100, 28, 28, 1), np.uint8)
  with pytest.raises(ValueError, match='multiples of 8'):
    jaxgan.train_loop(*jax.tree.map(np.array, states), images,
                      jax.random.key(0), num_steps=1, batch_size=64,
                      num_shards=8)


def test_batch_and_process_checks():
  mesh = parallel.make_mesh()
  parallel.check_batch_size(64, mesh)
  assert parallel.process_rows(60_001, mesh) == (0, 60_001)
  with pytest.raises(jaxgan.JaxganError, match='needs the coordinator'):
    parallel.initialize(num_processes=2)
  with pytest.raises(jaxgan.JaxganError, match='process_id must be in'):
    parallel.initialize('127.0.0.1:1', 2, 5)
  assert parallel.initialize() is False


@pytest.mark.slow
def test_example_on_two_processes_equals_one_process_with_two_devices(
    tmp_path, mnist_data_dir):
  example = os.path.join(REPO, 'examples', 'mnist_dcgan.py')
  common = [f'--data_dir={mnist_data_dir}', '--num_epochs=1',
            '--steps_per_epoch=3', '--eval_samples=100', '--noprogress']
  multi = str(tmp_path / 'multi')

  def run_two_processes(*flags):
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, example, f'--workdir={multi}', *common, *flags,
         '--num_processes=2', f'--process_id={pid}',
         f'--coordinator_address=127.0.0.1:{port}'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                 for pid in range(2)]
    return [_finish(p, with_stderr=True) for p in processes]

  (out_0, _), (out_1, _) = run_two_processes()
  assert 'Done: 1 epochs, 3 steps' in out_0
  # Only process 0 reports (gloo itself may print a connection line).
  assert 'Training epochs' not in out_1 and 'Done' not in out_1
  # Warnings too: resuming the finished run with another seed warns once.
  (out_0, err_0), (out_1, err_1) = run_two_processes('--seed=7')
  assert 'Already trained 1 epochs' in out_0
  assert "warning: resuming with the checkpoint's seed 0" in err_0
  assert 'warning' not in err_1
  single = str(tmp_path / 'single')
  _finish(subprocess.Popen(
      [sys.executable, example, f'--workdir={single}', *common],
      env={**os.environ,
           'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
  templates = jaxgan.DCGANConfig().create_train_states(jax.random.key(0))
  restored = []
  for workdir in (multi, single):
    with jaxgan.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
      restored.append(ckpt.restore(*templates))
  for a, b in zip(jax.tree.leaves(restored[0][:2]),
                  jax.tree.leaves(restored[1][:2])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)
  assert restored[0][3] == restored[1][3]
  for name in ('steps.csv', 'eval_summary.json', 'samples/epoch_001.png'):
    assert os.path.isfile(os.path.join(multi, name)), name
