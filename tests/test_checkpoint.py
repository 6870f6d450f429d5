"""Orbax checkpoints: round trip, resume, retention and mismatches."""

import gc
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgan
from conftest import copy_tree, leaves_equal, make_states
from jaxgan import parallel


def _train(states, batch, keys):
  state_g, state_d = copy_tree(states)
  for key in keys:
    state_g, state_d, _ = jaxgan.train_step(state_g, state_d, batch, key)
  return state_g, state_d


def test_round_trip_is_bit_exact(tmp_path, states, real_batch):
  state_g, state_d = _train(states, real_batch, [jax.random.key(0)])
  run_key = jax.random.key(1234)
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state_g, state_d, run_key, {'epoch': 1, 'config': {'a': 2}})
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.read_meta() == {'epoch': 1, 'config': {'a': 2}}
    g, d, key, meta = ckpt.restore(*copy_tree(states))
  assert leaves_equal((g, d), (state_g, state_d))
  assert int(g.step) == 1 and isinstance(g, jaxgan.GeneratorState)
  assert g.noise_dim == 100 and d.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(jax.random.key_data(key),
                                jax.random.key_data(run_key))
  assert meta == {'epoch': 1, 'config': {'a': 2}}


def test_resume_continues_bit_identically(tmp_path, states, real_batch):
  keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(4)]
  straight = _train(states, real_batch, keys)

  half = _train(states, real_batch, keys[:2])
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, *half, jax.random.key(0), {})
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    g, d, _, _ = ckpt.restore(*copy_tree(states))
  resumed = _train((g, d), real_batch, keys[2:])
  assert leaves_equal(resumed, straight)


def test_keeps_the_latest_n(tmp_path, states):
  with jaxgan.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, *states, jax.random.key(step), {'step': step})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.read_meta()['step'] == 3
    assert ckpt.read_meta(2)['step'] == 2
  assert sorted(os.listdir(tmp_path)) == ['2', '3']


def test_restore_into_another_model_is_refused(tmp_path, states):
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {})
    other = make_states(hidden_dim=64)
    with pytest.raises(jaxgan.CheckpointError, match='does not fit') as error:
      ckpt.restore(*other)
    # Parameters first; the Adam moments that follow them are counted.
    assert ('17 arrays differ: state_g params.BatchNorm_0.bias: saved '
            '[128], here [64]') in str(error.value)
    with pytest.raises(jaxgan.CheckpointError,
                       match=r'1 array differs: key data: saved \[2\], '
                             r'here \[3, 2\]'):
      ckpt.restore(*states, key_template=jax.vmap(jax.random.key)(
          jnp.arange(3)))
    sgd = make_states(optimizer=optax.sgd(1e-3))
    with pytest.raises(jaxgan.CheckpointError,
                       match=r'opt_state\.0\.mu\..*: saved \[.*\], '
                             r'here absent'):
      ckpt.restore(*sgd)


def test_refused_restore_leaves_nothing_behind(tmp_path, states):
  """A refused restore prints nothing more, even when the process exits."""
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {})
  code = f"""
import jax, jaxgan
from conftest import make_states
with jaxgan.Checkpointer({str(tmp_path)!r}) as ckpt:
  try:
    ckpt.restore(*make_states(hidden_dim=64))
  except jaxgan.CheckpointError:
    print('refused')
"""
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(__file__))
  assert result.returncode == 0, result.stderr
  assert result.stdout == 'refused\n'
  assert 'Traceback' not in result.stderr and 'never awaited' not in (
      result.stderr)


def test_missing_checkpoint_is_reported(tmp_path, states):
  with jaxgan.Checkpointer(str(tmp_path / 'empty')) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(jaxgan.CheckpointError, match='No checkpoint'):
      ckpt.restore(*states)


def test_unfinished_save_is_invisible(tmp_path, states):
  """A folder left by an interrupted save is not taken for a checkpoint."""
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {'n': 1})
  # orbax writes into a temporary folder and renames it when complete.
  os.makedirs(tmp_path / '2.orbax-checkpoint-tmp-123' / 'state_g')
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1
    _, _, _, meta = ckpt.restore(*copy_tree(states))
  assert meta == {'n': 1}


def test_literal_model_without_batchnorm_checkpoints(tmp_path):
  states = make_states(batch_norm=False)
  assert states[0].batch_stats == {}
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {})
    g, _, _, _ = ckpt.restore(*make_states(batch_norm=False))
  assert leaves_equal(g.params, states[0].params)
  assert jnp.asarray(g.step).dtype == jnp.int32


def test_a_flipped_bit_on_disk_is_caught(tmp_path, states):
  """orbax reads a flipped bit back silently; the saved sha256 catches it."""
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {'n': 1})
  data_files = []
  for root, _, files in os.walk(tmp_path / '1' / 'state_g'):
    data_files += [os.path.join(root, f) for f in files
                   if not f.startswith('_')]
  largest = max(data_files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, 'r+b') as f:
    f.seek(size // 2)
    byte = f.read(1)[0]
    f.seek(size // 2)
    f.write(bytes([byte ^ 0x10]))
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.read_meta() == {'n': 1}
    with pytest.raises(jaxgan.CheckpointError, match='is damaged'):
      ckpt.restore(*copy_tree(states))


def _data_files(directory):
  """The files holding a checkpoint item's arrays (orbax's OCDBT data)."""
  found = []
  for root, _, files in os.walk(directory):
    if os.path.basename(root) == 'd':
      found += [os.path.join(root, f) for f in files]
  return found


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_a_truncated_file_is_reported_in_one_short_message(
    tmp_path, states, capfd, caplog):
  """Not TensorStore's spec, nor the tracebacks of the reads left running."""
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {'n': 1})
  # Every file of one item: many reads fail at once.
  files = _data_files(tmp_path / '1' / 'state_d')
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)
  capfd.readouterr()
  with caplog.at_level(logging.WARNING, logger='asyncio'):
    with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
      with pytest.raises(jaxgan.CheckpointError) as error:
        ckpt.restore(*copy_tree(states))
    gc.collect()  # Unretrieved task errors are logged when collected.
  message = str(error.value)
  assert message.startswith(f'Checkpoint 1 in {tmp_path} is damaged (')
  assert 'state_d ' in message and 'not valid for value of size' in message
  assert 'a file of it is missing, truncated or corrupt' in message
  assert 'set_aside' in message
  assert '\n' not in message and len(message) < 600, message
  assert 'TensorStore' not in message and 'tensorstore_spec' not in message
  out, err = capfd.readouterr()
  assert not out and not err, err[:2000]
  assert not [r for r in caplog.records if r.name == 'asyncio'
              and r.levelno >= logging.WARNING], caplog.text[:2000]


def test_a_step_saved_again_or_out_of_order_is_refused(tmp_path, states):
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(5, *states, jax.random.key(0), {'n': 5})
    # Refused while the first save is still being written, too.
    with pytest.raises(jaxgan.CheckpointError,
                       match=r'Cannot save step 5 in .*: checkpoint 5 exists '
                             r'already\. Steps must grow with every save'):
      ckpt.save(5, *states, jax.random.key(0), {'n': 55})
    with pytest.raises(jaxgan.CheckpointError,
                       match=r'Cannot save step 3 in .*: it is older than '
                             r'the latest checkpoint, 5\. .*above 5'):
      ckpt.save(3, *states, jax.random.key(0), {'n': 3})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5] and ckpt.read_meta() == {'n': 5}
    ckpt.save(6, *states, jax.random.key(0), {'n': 6})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5, 6]
    # Once the later checkpoint is set aside, its step can be saved afresh.
    ckpt.set_aside(6, str(tmp_path / 'aside'))
    ckpt.save(6, *states, jax.random.key(0), {'n': 66})
    ckpt.wait_until_finished()
    assert ckpt.read_meta(6) == {'n': 66}


def test_restore_into_another_dtype_is_refused(tmp_path, states):
  """Not taken for damage: orbax would cast, and the sha256 would differ."""
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {})
    state_g, state_d = copy_tree(states)
    half = state_g.replace(params=jax.tree.map(
        lambda p: p.astype(jnp.bfloat16), state_g.params))
    count = len(jax.tree.leaves(state_g.params))
    with pytest.raises(jaxgan.CheckpointError) as error:
      ckpt.restore(half, state_d)
  message = str(error.value)
  assert (f'does not fit this model and optimiser ({count} arrays differ: '
          'state_g params.BatchNorm_0.bias: saved float32, here bfloat16;'
          ) in message
  assert 'damaged' not in message
  assert 'restore into states of the saved dtypes' in message


def test_restored_states_reuse_the_compiled_step(tmp_path, states,
                                                 real_batch):
  """Restored arrays are uncommitted like the templates, so the first step
  after a resume does not compile its program again."""
  key = jax.random.key(0)
  trained = _train(states, real_batch, [key])
  size = jaxgan.train_step._cache_size()
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *trained, key, {})
    g, d, run_key, _ = ckpt.restore(*copy_tree(states))
  arrays = jax.tree.leaves((g, d)) + [run_key]
  assert not any(a.committed for a in arrays)
  jax.block_until_ready(jaxgan.train_step(g, d, real_batch, key))
  assert jaxgan.train_step._cache_size() == size


def test_a_sharded_template_restores_sharded(tmp_path, states):
  mesh = parallel.make_mesh()
  with jaxgan.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, *states, jax.random.key(0), {})
    templates = parallel.replicate(copy_tree(states), mesh)
    g, d, _, _ = ckpt.restore(*templates)
  assert leaves_equal((g, d), states)
  for restored, template in zip(jax.tree.leaves((g, d)),
                                jax.tree.leaves(templates)):
    assert restored.committed and restored.sharding == template.sharding
