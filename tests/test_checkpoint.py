"""Orbax checkpoints: round trip, resume, retention and mismatches."""

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
