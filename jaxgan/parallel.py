"""Data parallelism over every device of every host, with `jax.sharding`.

One mesh axis, `'data'`, over all devices (`jax.devices()`, which spans every
process once `jax.distributed` is initialised). Train states are replicated;
batches and the device-resident dataset are split along `'data'`. The steps
and loops of `jaxgan.train` run unchanged, compiled here with explicit
input and output shardings: XLA inserts the gradient all-reduce, and
BatchNorm statistics are means over the global batch, the numbers one device
computes on the whole batch.

The fused loops take the dataset as `S = mesh size` contiguous blocks, one
per device, each shuffled on its own (`jaxgan.epoch_permutation` with
`num_shards=S`), so a batch is gathered without moving images between
devices or hosts. Each process loads only the rows of its own devices
(`process_rows`).

Example (one process, every local device):
  >>> mesh = jaxgan.parallel.make_mesh()
  >>> state_g, state_d = jaxgan.parallel.replicate((state_g, state_d), mesh)
  >>> images = jaxgan.parallel.shard_dataset(images_np, mesh)
  >>> loop = jaxgan.parallel.train_loop(mesh)
  >>> state_g, state_d, metrics = loop(state_g, state_d, images, key,
  ...                                  num_steps=100, batch_size=256)
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxgan import train as train_lib
from jaxgan.errors import JaxganError

DATA_AXIS = 'data'
# Variables that launchers (and jax.distributed's own cluster detection) set.
_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when the job has several processes.

  Arguments left as None fall back to `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; on TPU pods and SLURM jobs
  `jax.distributed.initialize()` also finds them by itself. A job of one
  process needs nothing and is left alone.

  Args:
    coordinator_address: `host:port` of process 0.
    num_processes: processes in the job.
    process_id: this process's index.

  Returns:
    Whether `jax.distributed` was initialised.

  Raises:
    JaxganError: a partial or inconsistent specification.
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV[0])
  if num_processes is None and os.environ.get(_ENV[1]):
    num_processes = int(os.environ[_ENV[1]])
  if process_id is None and os.environ.get(_ENV[2]):
    process_id = int(os.environ[_ENV[2]])
  if num_processes in (None, 1) and coordinator_address is None:
    return False
  if num_processes is None or process_id is None or not coordinator_address:
    raise JaxganError(
        'A multi-process run needs the coordinator address, the number of '
        'processes and this process\'s id (--coordinator_address, '
        '--num_processes, --process_id or JAX_COORDINATOR_ADDRESS, '
        f'JAX_NUM_PROCESSES, JAX_PROCESS_ID); got {coordinator_address!r}, '
        f'{num_processes!r}, {process_id!r}.')
  if not 0 <= process_id < num_processes:
    raise JaxganError(f'process_id must be in [0, {num_processes}), got '
                      f'{process_id}.')
  # Cross-process collectives on CPU devices go through gloo (GPUs and TPUs
  # have their own); the setting only affects the CPU client.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def make_mesh(devices: Any = None) -> Mesh:
  """A one-axis (`'data'`) mesh over `devices` (default: all, every host)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def num_shards(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array leaf to every device of the mesh (all hosts).

  Every process must pass the same values (e.g. states made from the same
  key); each contributes the copies of its own devices.
  """
  sharding = replicated(mesh)

  def put(leaf):
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding,
                                        lambda index: value[index])

  return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises JaxganError unless the global batch splits evenly."""
  shards = num_shards(mesh)
  if batch_size % shards:
    raise JaxganError(
        f'The batch size {batch_size} does not divide evenly over the '
        f'{shards} devices of the mesh; use a multiple of {shards} (for '
        f'example {max(shards, batch_size // shards * shards)}).')


def process_rows(num_examples: int, mesh: Mesh) -> tuple[int, int]:
  """The rows `[start, end)` of the dataset this process holds.

  The dataset is cut to a multiple of the mesh size and split into equal
  contiguous blocks, one per device in mesh order; a process holds the blocks
  of its own devices, which are consecutive in `jax.devices()` order.
  """
  shards = num_shards(mesh)
  block = num_examples // shards
  if block == 0:
    raise JaxganError(f'{num_examples} examples cannot be split over '
                      f'{shards} devices.')
  mine = [i for i, device in enumerate(mesh.devices.flat)
          if device.process_index == jax.process_index()]
  if mine != list(range(mine[0], mine[-1] + 1)):
    raise JaxganError('This process\'s devices are not consecutive in the '
                      'mesh; build it with make_mesh().')
  return mine[0] * block, (mine[-1] + 1) * block


def shard_dataset(local_images: np.ndarray, mesh: Mesh,
                  num_examples: int | None = None) -> jax.Array:
  """Builds the device-resident dataset, split along `'data'`.

  Args:
    local_images: this process's rows (`process_rows`), uint8
      `[n, H, W, C]`; in a one-process job, the whole dataset (cut to a
      multiple of the mesh size here).
    mesh: the mesh.
    num_examples: the global dataset size before cutting; needed only with
      several processes.

  Returns:
    A global `[N, H, W, C]` array, `N` a multiple of the mesh size.
  """
  local_images = np.asarray(local_images)
  shards = num_shards(mesh)
  if jax.process_count() == 1:
    usable = len(local_images) // shards * shards
    if usable == 0:
      raise JaxganError(f'{len(local_images)} images cannot be split over '
                        f'{shards} devices.')
    return jax.device_put(local_images[:usable], data_sharded(mesh))
  if num_examples is None:
    raise JaxganError('shard_dataset needs num_examples (the global size) '
                      'when several processes share the mesh.')
  start, end = process_rows(num_examples, mesh)
  if len(local_images) != end - start:
    raise JaxganError(
        f'This process holds rows [{start}, {end}) of the dataset but was '
        f'given {len(local_images)} images; load them with process_rows().')
  global_shape = (num_examples // shards * shards, *local_images.shape[1:])
  return jax.make_array_from_process_local_data(
      data_sharded(mesh), local_images, global_shape)


def shard_batch(batch: Any, mesh: Mesh) -> jax.Array:
  """Puts a global batch `[B, ...]` (this process's copy) on the mesh."""
  batch = np.asarray(batch)
  check_batch_size(batch.shape[0], mesh)
  sharding = data_sharded(mesh)
  return jax.make_array_from_callback(batch.shape, sharding,
                                      lambda index: batch[index])


@functools.lru_cache(maxsize=None)
def train_step(mesh: Mesh):
  """`jaxgan.train_step` compiled for the mesh: states replicated, the batch
  split along `'data'`, both states donated.

  Returns:
    `step(state_g, state_d, batch, key, loss=NON_SATURATING)`.
  """
  rep, data = replicated(mesh), data_sharded(mesh)
  compiled = jax.jit(
      lambda state_g, state_d, batch, key, loss: train_lib.train_step.__wrapped__(
          state_g, state_d, batch, key, loss),
      in_shardings=(rep, rep, data, rep), out_shardings=(rep, rep, rep),
      donate_argnums=(0, 1), static_argnums=(4,))

  def step(state_g, state_d, batch, key, loss=train_lib.losses_lib.NON_SATURATING):
    return compiled(state_g, state_d, batch, key, loss)

  return step


_LOOP_OPTIONS = ('num_steps', 'batch_size', 'steps_per_epoch', 'loss',
                 'unroll', 'guard')


def _compile_loop(function, mesh: Mesh, num_arrays: int, out_shardings,
                  donate_argnums):
  """jit with explicit shardings; options travel as one static tuple (jit
  takes no keyword arguments once in_shardings are given)."""
  rep, data = replicated(mesh), data_sharded(mesh)
  in_shardings = (rep, rep, data) + (rep,) * (num_arrays - 3)
  shards = num_shards(mesh)
  compiled = jax.jit(
      lambda *args: function(*args[:-1], **dict(args[-1]),
                             num_shards=shards),
      in_shardings=in_shardings, out_shardings=out_shardings,
      donate_argnums=donate_argnums, static_argnums=(num_arrays,))

  def static_options(options):
    unknown = set(options) - set(_LOOP_OPTIONS)
    if unknown:
      raise TypeError(f'Unexpected arguments: {sorted(unknown)}.')
    return tuple(sorted(options.items()))

  def call(*arrays, **options):
    return compiled(*arrays, static_options(options))

  def lower(*arrays, **options):
    return compiled.lower(*arrays, static_options(options))

  call.lower = lower
  return call


@functools.lru_cache(maxsize=None)
def train_loop(mesh: Mesh):
  """`jaxgan.train_loop` compiled for the mesh, `num_shards` = mesh size.

  Returns:
    `loop(state_g, state_d, images, key, *, num_steps, batch_size,
    steps_per_epoch=None, loss=NON_SATURATING, unroll=1, guard='freeze')`,
    with `images` from `shard_dataset`. `loop.lower(...)` takes the same
    arguments (arrays or `jax.ShapeDtypeStruct`s) and lowers the call
    without running it; its `.compile()` readies the program for the calls
    that follow, e.g. from a thread while the host does other work. The
    other loops here have `.lower` too.
  """
  rep = replicated(mesh)
  return _compile_loop(train_lib.train_loop.__wrapped__, mesh, 4,
                       (rep, rep, rep), (0, 1))


@functools.lru_cache(maxsize=None)
def discriminator_loop(mesh: Mesh):
  """`jaxgan.discriminator_loop` compiled for the mesh (see `train_loop`).

  Returns:
    `loop(state_g, state_d, images, key, first_step, *, num_steps, ...)`.
  """
  rep = replicated(mesh)
  return _compile_loop(train_lib.discriminator_loop.__wrapped__, mesh, 5,
                       (rep, rep), (1,))


@functools.lru_cache(maxsize=None)
def train_loop_seeds(mesh: Mesh):
  """`jaxgan.train_loop_seeds` compiled for the mesh (see `train_loop`)."""
  rep = replicated(mesh)
  return _compile_loop(train_lib.train_loop_seeds.__wrapped__, mesh, 4,
                       (rep, rep, rep), (0, 1))


@functools.lru_cache(maxsize=None)
def discriminator_loop_seeds(mesh: Mesh):
  """`jaxgan.discriminator_loop_seeds` compiled for the mesh."""
  rep = replicated(mesh)
  return _compile_loop(train_lib.discriminator_loop_seeds.__wrapped__, mesh,
                       5, (rep, rep), (1,))


def _first_local_shard(x: Any) -> Any:
  return x.addressable_data(0) if isinstance(x, jax.Array) else x


def to_host(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (every process gets its own).

  The copies of all leaves are started together, then awaited.
  """
  return jax.tree.map(np.asarray,
                      jax.device_get(jax.tree.map(_first_local_shard, tree)))


@jax.jit
def _copy_arrays(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def local_copy(tree: Any) -> Any:
  """Copies of replicated arrays on this process's first device, queued.

  Returns without waiting for the device: the copy runs after the work
  already queued, and later calls that donate or replace the originals
  leave it intact. So a loop can queue the next steps at once and read the
  copy meanwhile (`jax.device_get` makes host copies of it).

  Args:
    tree: a pytree of replicated `jax.Array`s (other leaves pass through).

  Returns:
    The same tree, each array a single-device copy on the process's first
    local device.
  """
  return _copy_arrays(jax.tree.map(_first_local_shard, tree))


def is_main_process() -> bool:
  """Process 0 writes logs, pictures and metric files."""
  return jax.process_index() == 0

