r"""Data-parallel scaling: fused-loop steps/sec against the number of devices.

For each device count n, `jaxgan.parallel.train_loop` runs on a mesh of the
first n devices with the global batch `per_device_batch * n` (weak scaling,
the usual way to add devices) and, with `--strong`, also with a fixed global
batch. Compile time is measured apart; the median and spread of several
timed trials are reported, with images/sec and the efficiency against one
device (n x the one-device images/sec is 100%).

  python benchmarks/scaling.py --json=/tmp/scaling.json
  # CPU only: simulate 8 devices (all share the same cores, so this checks
  # the code path, not the speed).
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py
"""

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

import jaxgan
from jaxgan import parallel


def _int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(',') if v]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected positive integers: {text!r}')
  return values


def measure(num_devices: int, batch_size: int, steps: int, trials: int,
            dataset_size: int) -> dict:
  """Times the sharded fused loop on the first `num_devices` devices."""
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  parallel.check_batch_size(batch_size, mesh)
  rng = np.random.default_rng(0)
  images = parallel.shard_dataset(
      rng.integers(0, 256, (dataset_size, 28, 28, 1), dtype=np.uint8), mesh)
  config = jaxgan.DCGANConfig(batch_size=batch_size)
  state_g, state_d = parallel.replicate(
      jax.tree.map(np.asarray, config.create_train_states(
          jax.random.key(0))), mesh)
  loop = parallel.train_loop(mesh)
  key = jax.random.key(1)
  steps_per_epoch = images.shape[0] // batch_size

  def run(g, d):
    return loop(g, d, images, key, num_steps=steps, batch_size=batch_size,
                steps_per_epoch=steps_per_epoch)

  start = time.perf_counter()
  state_g, state_d, metrics = run(state_g, state_d)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  rates = []
  for _ in range(trials):
    start = time.perf_counter()
    state_g, state_d, metrics = run(state_g, state_d)
    jax.block_until_ready(metrics)
    rates.append(steps / (time.perf_counter() - start))
  rate = statistics.median(rates)
  return {
      'devices': num_devices, 'global_batch': batch_size,
      'steps_per_call': steps, 'trials': trials,
      'steps_per_sec': rate, 'steps_per_sec_min': min(rates),
      'steps_per_sec_max': max(rates), 'images_per_sec': rate * batch_size,
      'first_call_seconds': compile_seconds,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=_int_list, default=None,
                      help='device counts (default: 1, 2, 4, ... up to all)')
  parser.add_argument('--per_device_batch', type=int, default=64)
  parser.add_argument('--strong', type=int, default=0, metavar='BATCH',
                      help='also measure strong scaling at this global batch')
  parser.add_argument('--steps', type=int, default=20,
                      help='steps per fused call')
  parser.add_argument('--trials', type=int, default=3)
  parser.add_argument('--dataset_size', type=int, default=8192)
  parser.add_argument('--json', default=None, help='write the results here')
  args = parser.parse_args(argv)

  available = jax.device_count()
  counts = args.devices or [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                            if n <= available]
  if max(counts) > available:
    parser.error(f'asked for {max(counts)} devices; {available} available '
                 '(on CPU, simulate more with XLA_FLAGS='
                 '--xla_force_host_platform_device_count=N)')
  device = jax.devices()[0]
  print(f'{device.device_kind} x {available} ({jax.default_backend()}), '
        f'jax {jax.__version__}; fused loop, {args.steps} steps per call, '
        f'median of {args.trials} trials')
  rows = []
  plans = [('weak', n, args.per_device_batch * n) for n in counts]
  if args.strong:
    plans += [('strong', n, args.strong) for n in counts]
  print(f'{"mode":>6s} {"devices":>7s} {"batch":>6s} {"steps/s":>9s} '
        f'{"images/s":>10s} {"efficiency":>10s}')
  for mode, n, batch in plans:
    row = {'mode': mode, **measure(n, batch, args.steps, args.trials,
                                   args.dataset_size)}
    base = next((r for r in rows if r['mode'] == mode and r['devices'] == 1),
                row if n == 1 else None)
    if base is not None:
      row['efficiency'] = row['images_per_sec'] / (
          base['images_per_sec'] * n)
    rows.append(row)
    efficiency = (f'{row["efficiency"]:10.0%}' if 'efficiency' in row
                  else f'{"":>10s}')
    print(f'{mode:>6s} {n:7d} {batch:6d} {row["steps_per_sec"]:9.2f} '
          f'{row["images_per_sec"]:10.0f} {efficiency}')
  report = {
      'device_kind': device.device_kind, 'backend': jax.default_backend(),
      'device_count': available, 'jax_version': jax.__version__,
      'host': platform.node(), 'date': time.strftime('%Y-%m-%d'),
      'results': rows,
  }
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  main()
