"""Checkpoints of a GAN run with orbax: both train states, the key, metadata.

Each checkpoint is a step folder written by `orbax.checkpoint`: it is built
under a temporary name and renamed when complete, so an interrupted save never
replaces the previous checkpoint, and restore only ever sees finished ones.
The metadata holds a sha256 of every array saved and of the metadata
itself; restore recomputes it, so a checkpoint damaged on disk is refused
instead of silently resuming from wrong numbers.
"""

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Iterator

import flax.serialization
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxgan.errors import CheckpointError
from jaxgan.train import DiscriminatorState
from jaxgan.train import GeneratorState

_DIGEST = 'arrays_sha256'


def _restore_target(leaf: Any) -> Any:
  """What orbax restores a template leaf as.

  A committed array (e.g. sharded over a mesh) comes back with its sharding.
  Any other leaf comes back as a host array, which `_like_template` then
  puts on the default device uncommitted, as `create_train_states` and the
  train steps leave their arrays: a committed array there would make the
  next jitted call compile its program again.
  """
  if _on_host(leaf):
    return np.empty(np.shape(leaf), _dtype(leaf))
  return ocp.utils.to_shape_dtype_struct(leaf)


def _on_host(template: Any) -> bool:
  """Whether a template leaf's array is read to the host first: all but
  committed device arrays."""
  return not (isinstance(template, jax.Array) and template.committed)


def _like_template(restored: Any, template: Any) -> Any:
  """A restored host array on the device when its template was a device
  array that is not committed; other leaves as orbax restored them."""
  if isinstance(template, jax.Array) and _on_host(template):
    return jnp.asarray(restored)
  return restored


def _dtype(leaf: Any) -> np.dtype:
  dtype = getattr(leaf, 'dtype', None)
  return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def _fits(tree: Any) -> dict[str, tuple[str, str]]:
  """`{leaf path: (shape, dtype)}` of arrays or of orbax's array metadata.

  orbax would cast a saved array to the wanted dtype, which the sha256
  (over the saved dtype) then takes for damage; and it refuses another
  shape or a missing array only once it reads.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path).replace("']['", '.').strip("[']"):
          (str(list(np.shape(leaf))), str(_dtype(leaf)))
          for path, leaf in flat}


def _describe(fit: tuple[str, str] | None,
              other: tuple[str, str] | None) -> str:
  """Which of a leaf's shape and dtype differ from `other`'s (the shape
  alone when `other` is absent)."""
  if fit is None:
    return 'absent'
  if other is None:
    return fit[0]
  differs = [part for part, theirs in zip(fit, other) if part != theirs]
  return ' '.join(differs)


def _array_misfits(saved: dict[str, Any], wanted: dict[str, Any]
                   ) -> list[str]:
  """How the saved arrays' shapes and dtypes differ from the wanted ones,
  parameters first."""
  misfits = []
  for item, template in wanted.items():
    have, want = _fits(saved[item]), _fits(template)
    for path in sorted(have.keys() | want.keys(),
                       key=lambda p: (not p.startswith('params'), p)):
      saved_fit, wanted_fit = have.get(path), want.get(path)
      if saved_fit != wanted_fit:
        misfits.append(f'{item} {path}: saved '
                       f'{_describe(saved_fit, wanted_fit)}, here '
                       f'{_describe(wanted_fit, saved_fit)}')
  return misfits


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed, first awaits the tasks left on it.

  orbax runs a restore's reads on a fresh event loop and closes it as soon
  as the first read fails, with the other reads still in flight. TensorStore
  then completes them on the closed loop, and each prints a traceback
  ("Event loop is closed", "Task exception was never retrieved"), hundreds
  of lines after the error itself. Awaiting them here, and reading their
  errors, leaves nothing to print; a read whose waiter was cancelled may
  still finish later, and its callback is dropped.
  """

  _TIMEOUT_S = 60

  def call_soon_threadsafe(self, callback, *args, context=None):
    try:
      return super().call_soon_threadsafe(callback, *args, context=context)
    except RuntimeError:
      if self.is_closed():
        return None
      raise

  def close(self) -> None:
    if not self.is_closed() and not self.is_running():
      pending = [task for task in asyncio.all_tasks(self) if not task.done()]
      if pending:
        done, left = self.run_until_complete(
            asyncio.wait(pending, timeout=self._TIMEOUT_S))
        for task in left:
          task.cancel()
        if left:
          self.run_until_complete(asyncio.wait(left))
        for task in done | left:
          if not task.cancelled():
            task.exception()
    super().close()


@contextlib.contextmanager
def _pending_reads_awaited() -> Iterator[None]:
  """Makes the event loops that orbax creates meanwhile await their tasks
  when closed (`_DrainingEventLoop`).

  asyncio's loop policies, the one way to choose the loop that orbax makes,
  are deprecated from Python 3.14; without them nothing changes.
  """
  base = (getattr(asyncio, 'DefaultEventLoopPolicy', None)
          if sys.version_info < (3, 14) else None)
  if base is None:
    yield
    return

  class DrainingPolicy(base):

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
      return _DrainingEventLoop()

  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


# TensorStore's status codes, which start its messages.
_STATUS = re.compile(r'([A-Z]+(?:_[A-Z]+)*): ')
# Those of files cut short, garbled or gone.
_DAMAGE = ('OUT_OF_RANGE', 'DATA_LOSS', 'NOT_FOUND')
_READING = re.compile(r'Error reading "([^"]+)"')
_DATABASE = re.compile(r'OCDBT database at [^"]*"([^"]+)"')


def _root_error(error: BaseException) -> BaseException:
  """The innermost error of a chain: orbax wraps TensorStore's."""
  seen = {id(error)}
  while True:
    inner = error.__cause__ or error.__context__
    if inner is None or id(inner) in seen:
      return error
    seen.add(id(inner))
    error = inner


def _read_failure(error: BaseException) -> tuple[str, str | None]:
  """One line saying why a restore failed, and TensorStore's status code if
  it was TensorStore that failed.

  TensorStore's messages read `STATUS: context: ... "file": cause
  [tensorstore_spec=...]`, each context naming what it read; the line keeps
  the status, the array read and what went wrong in the innermost read.
  """
  root = _root_error(error)
  line = (str(root).splitlines() or [''])[0].split(' [tensorstore_spec')[0]
  status = _STATUS.match(line)
  if status is None:
    return f'{type(root).__name__}: {line[:300]}', None
  reading = _READING.search(line)
  database = _DATABASE.search(line)
  where = ''
  if reading is not None:
    where = ' reading ' + (
        f'{os.path.basename(database.group(1).rstrip("/"))} '
        if database is not None else '') + reading.group(1)
  innermost = line.rfind('": ')
  cause = line[innermost + 3:] if innermost >= 0 else line[status.end():]
  return f'{status.group(1)}{where}: {cause}'[:300], status.group(1)


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

    Raises:
      CheckpointError: `step` is not above the latest checkpoint's step
        (orbax would skip the save without a word).
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      problem = (f'checkpoint {step} exists already' if step == latest
                 or step in self._manager.all_steps() else
                 f'it is older than the latest checkpoint, {latest}')
      raise CheckpointError(
          f'Cannot save step {step} in {self.directory}: {problem}. Steps '
          f'must grow with every save: save a step above {latest}, or move '
          f'the checkpoints from step {step} on aside (`set_aside`) to save '
          'it again.')
    trees = {
        'state_g': flax.serialization.to_state_dict(state_g),
        'state_d': flax.serialization.to_state_dict(state_d),
        # A host array: every process holds the same key, and orbax writes
        # host arrays once, where a per-process device array would clash.
        'key': {'data': np.asarray(jax.random.key_data(key))},
    }
    saved = self._manager.save(step, args=ocp.args.Composite(
        state_g=ocp.args.StandardSave(trees['state_g']),
        state_d=ocp.args.StandardSave(trees['state_d']),
        key=ocp.args.StandardSave(trees['key']),
        meta=ocp.args.JsonSave({**meta, 'key_impl': str(
            jax.random.key_impl(key)), _DIGEST: _digest(trees, meta)})))
    if not saved:
      raise CheckpointError(
          f'orbax declined to save step {step} in {self.directory} (the '
          f'latest checkpoint is {self.latest_step()}). Save a step above '
          'the latest one.')

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
      `(state_g, state_d, key, meta)`. An array whose template is committed
      to devices (e.g. sharded over a mesh) comes back with the template's
      sharding; one whose template is not comes back uncommitted on the
      default device, so jitted steps reuse the programs they compiled for
      the templates.

    Raises:
      CheckpointError: no checkpoint exists; it does not fit the states
        (another model size, optimiser or dtype); a file of it cannot be read
        (truncated or corrupt); or its arrays do not match the sha256 saved
        with them (damaged on disk).
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
    # Checked from the metadata first, so that the message names every
    # misfit (orbax stops at the first) and another dtype is not taken for
    # damage (orbax casts to the template's dtype; the sha256 then differs).
    misfits = self._misfits(step, wanted)
    if misfits:
      count = ('1 array differs' if len(misfits) == 1 else
               f'{len(misfits)} arrays differ')
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} does not fit this model and '
          f'optimiser ({count}: ' + '; '.join(misfits[:3])
          + ('; ...' if len(misfits) > 3 else '')
          + '). If it was written with another config, use that config or '
          'another workdir; for other dtypes, restore into states of the '
          'saved dtypes and cast them after.')
    targets = jax.tree.map(_restore_target, wanted)
    try:
      with _pending_reads_awaited():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state_g=ocp.args.StandardRestore(targets['state_g']),
            state_d=ocp.args.StandardRestore(targets['state_d']),
            key=ocp.args.StandardRestore(targets['key']),
            meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax and TensorStore raise many types.
      cause, status = _read_failure(e)
      # Damage, not another config, also when the metadata would not read
      # or a metadata file is no longer JSON: another config's checkpoint
      # reads, and fails the misfit check above instead.
      damaged = status in _DAMAGE or status is None and (
          misfits is None
          or isinstance(_root_error(e), json.JSONDecodeError))
      if damaged:
        # Chained to the innermost error alone: orbax's wrapper of
        # TensorStore's holds the array's whole TensorStore spec.
        raise CheckpointError(
            f'Checkpoint {step} in {self.directory} is damaged ({cause}): a '
            'file of it is missing, truncated or corrupt. Restore an earlier '
            'step, or move this one aside (`set_aside`) and use the one '
            'before.') from _root_error(e)
      if status is not None:
        raise CheckpointError(
            f'Checkpoint {step} in {self.directory} cannot be read ({cause}). '
            'Check that its files are readable.') from _root_error(e)
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} cannot be read into these '
          f'states ({cause}). If it was written with another config, use '
          'that config or another workdir.') from e
    meta = dict(restored['meta'])
    saved_digest = meta.pop(_DIGEST, None)
    trees = {name: restored[name] for name in ('state_g', 'state_d', 'key')}
    unhashed = {k: v for k, v in meta.items() if k != 'key_impl'}
    if saved_digest is not None and _digest(trees, unhashed) != saved_digest:
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} is damaged: its arrays do '
          'not match the sha256 saved with them.')
    trees = jax.tree.map(_like_template, trees,
                         {'state_g': template_g, 'state_d': template_d,
                          'key': key_template})
    key = jax.random.wrap_key_data(trees['key']['data'],
                                   impl=meta.pop('key_impl', None))
    return (flax.serialization.from_state_dict(state_g, trees['state_g']),
            flax.serialization.from_state_dict(state_d, trees['state_d']),
            key, meta)

  def _misfits(self, step: int, wanted: dict[str, Any]) -> list[str] | None:
    """`_array_misfits` against checkpoint `step`'s metadata; None if it is
    unreadable (restore then reports what it finds)."""
    try:
      # Reading the metadata opens every array, which fails on damaged files.
      with _pending_reads_awaited():
        metadata = self._manager.item_metadata(step)
      saved = {item: metadata[item].tree for item in wanted}
    except Exception:  # pylint: disable=broad-except
      return None
    return _array_misfits(saved, wanted)

  def set_aside(self, step: int, destination: str) -> str:
    """Moves a (damaged) checkpoint out of the directory, keeping its files.

    Later saves of the same step then start afresh, and `latest_step` no
    longer returns it.

    In a multi-process run every process calls it for the same step: as
    with orbax's saves, the directory is taken to be shared, so process 0
    moves the folder (once, under a name all processes agree on) and the
    others wait for the move before they look at the directory again.

    Returns:
      Where the checkpoint's folder now is.
    """
    self._manager.wait_until_finished()
    stamp = int(time.time())
    if jax.process_count() > 1:
      stamp = int(multihost_utils.broadcast_one_to_all(np.int32(stamp)))
    target = os.path.join(destination, f'{step}.' + time.strftime(
        '%Y%m%d-%H%M%S', time.localtime(stamp)))
    if jax.process_index() == 0:
      os.makedirs(destination, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'jaxgan set_aside {step}')
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
