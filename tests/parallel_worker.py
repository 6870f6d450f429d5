"""Runs in a fresh interpreter with several (CPU) devices; see test_parallel.

Usage: python parallel_worker.py MODE OUT_NPZ [ARGS]
  devices: 8 devices in one process against 1 device (the fused loop and one
    train step, checked too); writes both results.
  process PROCESS_ID NUM_PROCESSES PORT: one of several processes (gloo
    collectives) training a few fused steps data-parallel; process 0 writes
    the final states, and all write one checkpoint together (OUT_ckpt) and
    set a second one aside together (into OUT_aside).
  single NUM_SHARDS: the same steps on one device with NUM_SHARDS blocks.
"""

import sys

import jax
import numpy as np
import optax

import jaxgan
from jaxgan import parallel

BATCH, STEPS, SPE = 32, 4, 3


def _states():
  # SGD keeps float noise in gradients that vanish in exact arithmetic (the
  # biases before BatchNorm) from being blown up as Adam does.
  optimizer = optax.sgd(1e-3)
  return jaxgan.create_train_states(
      jax.random.key(0), jaxgan.Generator(), jaxgan.Discriminator(),
      optimizer, optimizer)


def _dataset(num=256):
  return np.asarray(jax.random.randint(jax.random.key(1), (num, 28, 28, 1), 0,
                                       256)).astype(np.uint8)


def _flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(parallel.to_host(tree))[0]}


def devices_mode(out):
  assert jax.device_count() == 8, jax.devices()
  images = _dataset()
  key = jax.random.key(2)
  mesh = parallel.make_mesh()
  one = parallel.make_mesh(jax.devices()[:1])

  # The fused loop: 8 devices against 1 device, same 8 blocks.
  results = {}
  for name, m in (('eight', mesh), ('one', one)):
    g, d = parallel.replicate(_states(), m)
    data = jax.device_put(images, parallel.data_sharded(m))
    loop = jaxgan.train_loop if name == 'one' else parallel.train_loop(m)
    extra = {'num_shards': 8} if name == 'one' else {}
    g, d, metrics = loop(g, d, data, key, num_steps=STEPS, batch_size=BATCH,
                         steps_per_epoch=SPE, **extra)
    results[name] = (_flat((g, d)), jax.device_get(metrics))
  np.savez(out, **{f'eight/{k}': v for k, v in results['eight'][0].items()},
           **{f'one/{k}': v for k, v in results['one'][0].items()},
           **{f'eight_metric/{k}': v for k, v in results['eight'][1].items()},
           **{f'one_metric/{k}': v for k, v in results['one'][1].items()})

  # One train step on one global batch: BatchNorm over the global batch.
  batch = images[:BATCH]
  step_key = jax.random.key(3)
  g8, d8, m8 = parallel.train_step(mesh)(
      *parallel.replicate(_states(), mesh), parallel.shard_batch(batch, mesh),
      step_key)
  g1, d1, m1 = jaxgan.train_step(*_states(), batch, step_key)
  flat8, flat1 = _flat((g8, d8)), _flat((g1, d1))
  np.savez(out.replace('.npz', '_step.npz'),
           **{f'eight/{k}': v for k, v in flat8.items()},
           **{f'one/{k}': v for k, v in flat1.items()})
  # Value checks work on the mesh as well, and leave the results alone.
  checked_step = jaxgan.checked(parallel.train_step(mesh))
  states8 = parallel.replicate(_states(), mesh)
  g8, d8, _ = checked_step(*states8, parallel.shard_batch(batch, mesh),
                           step_key)
  for name, value in _flat((g8, d8)).items():
    np.testing.assert_array_equal(value, flat8[name], err_msg=name)
  try:
    checked_step(*states8, parallel.shard_batch(
        batch.astype(np.float32), mesh), step_key)
    raise AssertionError('float images in [0, 255] were accepted')
  except jaxgan.JaxganError as e:
    assert 'Float images must be finite and in [-1, 1]' in str(e), e
  # A global batch that does not split over 8 devices is refused by name.
  try:
    parallel.shard_batch(images[:12], mesh)
    raise AssertionError('a batch of 12 on 8 devices was accepted')
  except jaxgan.JaxganError as e:
    assert 'does not divide evenly over the 8 devices' in str(e), e
  # The dataset really is split: each device holds 256 / 8 rows.
  data = parallel.shard_dataset(images, mesh)
  rows = sorted({shard.data.shape[0] for shard in data.addressable_shards})
  assert rows == [32], rows


def process_mode(out, process_id, num_processes, port):
  parallel.initialize(f'127.0.0.1:{port}', num_processes, process_id)
  mesh = parallel.make_mesh()
  images = _dataset()
  start, end = parallel.process_rows(len(images), mesh)
  data = parallel.shard_dataset(images[start:end], mesh, len(images))
  g, d = parallel.replicate(_states(), mesh)
  g, d, metrics = parallel.train_loop(mesh)(
      g, d, data, jax.random.key(2), num_steps=STEPS, batch_size=BATCH,
      steps_per_epoch=SPE)
  metrics = parallel.to_host(metrics)
  with jaxgan.Checkpointer(out.replace('.npz', '_ckpt')) as ckpt:
    ckpt.save(STEPS, g, d, jax.random.key(2), {'processes': num_processes})
    # A later checkpoint, set aside by every process: it moves once.
    ckpt.save(STEPS + 1, g, d, jax.random.key(2), {'processes': 0})
    moved = ckpt.set_aside(STEPS + 1, out.replace('.npz', '_aside'))
    print('set aside', moved, 'steps', ckpt.all_steps())
  if parallel.is_main_process():
    np.savez(out, **_flat((g, d)),
             **{f'metric/{k}': v for k, v in metrics.items()})
  print('process', process_id, 'rows', start, end, 'devices',
        jax.local_device_count(), jax.device_count())


def single_mode(out, shards):
  g, d = _states()
  g, d, metrics = jaxgan.train_loop(
      g, d, _dataset(), jax.random.key(2), num_steps=STEPS, batch_size=BATCH,
      steps_per_epoch=SPE, num_shards=shards)
  np.savez(out, **_flat((g, d)),
           **{f'metric/{k}': v for k, v in jax.device_get(metrics).items()})


if __name__ == '__main__':
  mode, out = sys.argv[1], sys.argv[2]
  if mode == 'devices':
    devices_mode(out)
  elif mode == 'single':
    single_mode(out, int(sys.argv[3]))
  else:
    process_mode(out, *map(int, sys.argv[3:6]))
