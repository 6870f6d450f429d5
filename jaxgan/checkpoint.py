"""Checkpoints of a GAN run with orbax: both train states, the key, metadata.

Each checkpoint is a step folder written by `orbax.checkpoint`: it is built
under a temporary name and renamed when complete, so an interrupted save never
replaces the previous checkpoint, and restore only ever sees finished ones.
The metadata holds a sha256 of every array saved and of the metadata
itself; restore recomputes it, so a checkpoint damaged on disk is refused
instead of silently resuming from wrong numbers.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgan.errors import CheckpointError
from jaxgan.train import DiscriminatorState
from jaxgan.train import GeneratorState

_DIGEST = 'arrays_sha256'


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _shapes(tree: Any) -> dict[str, str]:
  """`{leaf path: shape}` of arrays or of orbax's array metadata.

  Only shapes: orbax casts a saved array to the wanted dtype, but refuses
  another shape or a missing array.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path).replace("']['", '.').strip("[']"):
          str(list(np.shape(leaf))) for path, leaf in flat}


def _shape_misfits(saved: dict[str, Any], wanted: dict[str, Any]
                   ) -> list[str]:
  """How the saved arrays' shapes differ from the wanted ones, parameters
  first."""
  misfits = []
  for item, template in wanted.items():
    have, want = _shapes(saved[item]), _shapes(template)
    for path in sorted(have.keys() | want.keys(),
                       key=lambda p: (not p.startswith('params'), p)):
      if have.get(path) != want.get(path):
        misfits.append(f'{item} {path}: saved {have.get(path, "absent")}, '
                       f'here {want.get(path, "absent")}')
  return misfits


def _digest(tree: Any, meta: dict[str, Any]) -> str:
  """sha256 over the metadata (canonical JSON) and every leaf's path, dtype,
  shape and bytes."""
  digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype}|'
                  f'{array.shape}|'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


class Checkpointer:
  """Saves and restores `(state_g, state_d, key, meta)` in one directory.

  Example:
    >>> ckpt = Checkpointer(f'{workdir}/checkpoints', max_to_keep=3)
    >>> ckpt.save(step, state_g, state_d, run_key, {'epoch': 1})
    >>> state_g, state_d, run_key, meta = ckpt.restore(state_g, state_d)
    >>> ckpt.close()
  """

  def __init__(self, directory: str, max_to_keep: int = 3,
               async_save: bool = True):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: where the step folders live.
      max_to_keep: how many of the latest checkpoints to keep (at least 1).
      async_save: write to disk in the background; `save` returns once the
        arrays are copied off the device, so the states can be donated.
    """
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be at least 1, got {max_to_keep}.')
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save),
        # Handlers named up front, so that a manager which has not saved
        # yet can read the items' metadata.
        item_handlers={'state_g': ocp.StandardCheckpointHandler(),
                       'state_d': ocp.StandardCheckpointHandler(),
                       'key': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state_g: GeneratorState,
           state_d: DiscriminatorState, key: jax.Array,
           meta: dict[str, Any]) -> None:
    """Saves a checkpoint (in the background when `async_save`).

    Args:
      step: a number that grows with every save (e.g. D's update count).
      state_g: generator state.
      state_d: discriminator state.
      key: the run's PRNG key (a typed key array).
      meta: JSON-serialisable metadata: counters, config.
    """
    trees = {
        'state_g': flax.serialization.to_state_dict(state_g),
        'state_d': flax.serialization.to_state_dict(state_d),
        # A host array: every process holds the same key, and orbax writes
        # host arrays once, where a per-process device array would clash.
        'key': {'data': np.asarray(jax.random.key_data(key))},
    }
    self._manager.save(step, args=ocp.args.Composite(
        state_g=ocp.args.StandardSave(trees['state_g']),
        state_d=ocp.args.StandardSave(trees['state_d']),
        key=ocp.args.StandardSave(trees['key']),
        meta=ocp.args.JsonSave({**meta, 'key_impl': str(
            jax.random.key_impl(key)), _DIGEST: _digest(trees, meta)})))

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the metadata of a checkpoint (the latest if None).

    Raises:
      CheckpointError: no checkpoint exists or its metadata is unreadable.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f'No checkpoint in {self.directory}.')
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for unreadable files.
      raise CheckpointError(
          f'Cannot read the metadata of checkpoint {step} in '
          f'{self.directory}: {type(e).__name__}: {e}') from e
    meta = dict(restored['meta'])
    meta.pop('key_impl', None)
    meta.pop(_DIGEST, None)
    return meta

  def restore(self, state_g: GeneratorState, state_d: DiscriminatorState,
              step: int | None = None, key_template: jax.Array | None = None
              ) -> tuple[GeneratorState, DiscriminatorState, jax.Array,
                         dict[str, Any]]:
    """Restores a checkpoint into states shaped like the given ones.

    Args:
      state_g: a generator state of the same model and optimiser (e.g. a fresh
        one from `create_train_states`); gives structure, shapes and dtypes.
      state_d: likewise for the discriminator.
      step: which checkpoint; the latest if None.
      key_template: a key of the saved key's shape (default: one key; a
        `[num_seeds]` array of keys for runs stacked by `stack_seeds`).

    Returns:
      `(state_g, state_d, key, meta)`.

    Raises:
      CheckpointError: no checkpoint exists, it does not fit the states
        (another model size or optimiser), or its arrays do not match the
        sha256 saved with them (damaged on disk).
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f'No checkpoint in {self.directory}.')
    template_g = flax.serialization.to_state_dict(state_g)
    template_d = flax.serialization.to_state_dict(state_d)
    key_template = {'data': jax.random.key_data(
        jax.random.key(0) if key_template is None else key_template)}
    wanted = {'state_g': template_g, 'state_d': template_d,
              'key': key_template}
    # Checked from the metadata first: orbax, refusing a shape only once it
    # reads, leaves its other reads pending, and they print tracebacks later.
    misfits = self._misfits(step, wanted)
    if misfits:
      count = ('1 array differs' if len(misfits) == 1 else
               f'{len(misfits)} arrays differ')
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} does not fit this model and '
          f'optimiser ({count}: ' + '; '.join(misfits[:3])
          + ('; ...' if len(misfits) > 3 else '')
          + '). If it was written with another config, use that config or '
          'another workdir.')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state_g=ocp.args.StandardRestore(_abstract(template_g)),
          state_d=ocp.args.StandardRestore(_abstract(template_d)),
          key=ocp.args.StandardRestore(_abstract(key_template)),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} is unreadable or does not '
          f'fit this model and optimiser ({type(e).__name__}: '
          f'{str(e)[:500]}). If it was written with another config, use that '
          'config or another workdir.') from e
    meta = dict(restored['meta'])
    saved_digest = meta.pop(_DIGEST, None)
    trees = {name: restored[name] for name in ('state_g', 'state_d', 'key')}
    unhashed = {k: v for k, v in meta.items() if k != 'key_impl'}
    if saved_digest is not None and _digest(trees, unhashed) != saved_digest:
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} is damaged: its arrays do '
          'not match the sha256 saved with them.')
    key = jax.random.wrap_key_data(restored['key']['data'],
                                   impl=meta.pop('key_impl', None))
    return (flax.serialization.from_state_dict(state_g, restored['state_g']),
            flax.serialization.from_state_dict(state_d, restored['state_d']),
            key, meta)

  def _misfits(self, step: int, wanted: dict[str, Any]) -> list[str]:
    """`_shape_misfits` against checkpoint `step`'s metadata; none if it is
    unreadable (restore then reports what it finds)."""
    try:
      metadata = self._manager.item_metadata(step)
      saved = {item: metadata[item].tree for item in wanted}
    except Exception:  # pylint: disable=broad-except
      return []
    return _shape_misfits(saved, wanted)

  def set_aside(self, step: int, destination: str) -> str:
    """Moves a (damaged) checkpoint out of the directory, keeping its files.

    Later saves of the same step then start afresh, and `latest_step` no
    longer returns it.

    Returns:
      Where the checkpoint's folder now is.
    """
    self._manager.wait_until_finished()
    target = os.path.join(destination, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
    os.makedirs(destination, exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    """Blocks until background saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
