r"""The fused loop's rate and compile time under XLA flags and scan unrolls.

On a GPU the fused loop is a `lax.scan`, which XLA runs as a while loop: the
host launches every kernel of every iteration (and, where XLA does not know
the trip count, reads the loop's predicate back between iterations), unless
the loop is recorded into a CUDA graph (XLA's command buffers). Unrolling the
scan gives XLA several steps to fuse and schedule as one. What these cost or
buy, and what XLA's autotuning and Triton GEMMs do for this model, depend on
the compiler and the device, not on jaxgan; this script measures them.

XLA reads `XLA_FLAGS` once, when its backend starts, so each variant runs in
a process of its own, one after the other, the default first and again last
to show the machine's drift. Each process compiles
`jaxgan.train_loop` (timed), runs it once, times `--trials` calls of
`--fused_steps` steps, and hashes the states after its first call, so the
table also tells which variants compute bit-for-bit what the default does.

  python benchmarks/loop_variants.py --batch_size=64 --json=/tmp/loops.json
  python benchmarks/loop_variants.py --variant=unroll_8:8: \
      --variant=no_cb:1:--xla_gpu_enable_command_buffer=

A variant is `NAME:UNROLL:XLA_FLAGS`; the flags are added to any already in
the environment. XLA:CPU accepts and ignores the GPU flags, so on a CPU only
the unrolls differ.
"""

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# name: (scan unroll, XLA flags added to the environment's)
DEFAULT_VARIANTS = {
    'default': (1, ''),
    'unroll_2': (2, ''),
    'unroll_4': (4, ''),
    'no_command_buffers': (1, '--xla_gpu_enable_command_buffer='),
    'command_buffer_loops': (
        1, '--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL'),
    'no_triton_gemm': (1, '--xla_gpu_enable_triton_gemm=false'),
    'no_autotuning': (1, '--xla_gpu_autotune_level=0'),
}
# Lines of a failed variant's stderr kept in the report.
_ERROR_LINES = 5


def parse_variant(text: str) -> tuple[str, int, str]:
  """'NAME:UNROLL:FLAGS' -> (name, unroll, flags); ValueError if malformed."""
  parts = text.split(':', 2)
  if (len(parts) != 3 or not parts[0] or not parts[1].isdigit()
      or int(parts[1]) < 1):
    raise ValueError(f'variant {text!r} is not NAME:UNROLL:XLA_FLAGS with a '
                     f'positive unroll, e.g. unroll_8:8: or '
                     f'no_cb:1:--xla_gpu_enable_command_buffer=')
  return parts[0], int(parts[1]), parts[2].strip()


def states_digest(tree) -> str:
  """SHA-256 of every array's bytes in `tree`, in its flattening order."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


def measure(batch_size: int, fused_steps: int, trials: int, unroll: int,
            device_name: str | None) -> dict:
  """One variant, in this process: compile time, rates and the states' hash."""
  # Imported here, in the child: the parent must not start a backend, whose
  # XLA_FLAGS would then be fixed for it.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jaxgan  # pylint: disable=g-import-not-at-top
  from timing import interleaved_rates  # pylint: disable=g-import-not-at-top

  device = jax.devices(device_name)[0]
  config = jaxgan.DCGANConfig(batch_size=batch_size)
  images = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (60000, 28, 28, 1), dtype=np.uint8)), device)
  if len(images) < batch_size:
    raise SystemExit(f'batch size {batch_size} exceeds the dataset '
                     f'({len(images)} images)')
  state_g, state_d = jax.device_put(
      config.create_train_states(jax.random.key(0)), device)
  key = jax.random.key(1)
  start = time.perf_counter()
  loop = jaxgan.train_loop.lower(
      state_g, state_d, images, key, num_steps=fused_steps,
      batch_size=batch_size, unroll=unroll).compile()
  compile_seconds = time.perf_counter() - start
  state = {}
  state['g'], state['d'], metrics = loop(state_g, state_d, images, key)
  jax.block_until_ready(metrics)
  digest = states_digest((state['g'], state['d']))
  finite = bool(np.asarray(metrics['finite']).all())

  def run():
    state['g'], state['d'], metrics = loop(state['g'], state['d'], images,
                                           key)
    jax.block_until_ready(metrics)

  median, rates = interleaved_rates({'loop': run}, fused_steps, trials)['loop']
  return {'device': device.device_kind, 'platform': device.platform,
          'jax': jax.__version__, 'compile_seconds': compile_seconds,
          'steps_per_sec': median, 'steps_per_sec_trials': rates,
          'states_sha256': digest, 'finite': finite}


def run_variant(name: str, unroll: int, flags: str, args) -> dict:
  """Runs one variant in a child process; its result, or its error."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in (env.get('XLA_FLAGS', ''), flags)
                              if f.strip())
  command = [sys.executable, os.path.abspath(__file__), '--child',
             f'--batch_size={args.batch_size}',
             f'--fused_steps={args.fused_steps}', f'--trials={args.trials}',
             f'--unroll={unroll}']
  if args.device:
    command.append(f'--device={args.device}')
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=args.timeout, check=False)
  row = {'name': name, 'unroll': unroll, 'xla_flags': flags,
         'process_seconds': time.perf_counter() - start}
  lines = result.stdout.strip().splitlines()
  if result.returncode == 0 and lines:
    return {**row, **json.loads(lines[-1])}
  tail = result.stderr.strip().splitlines()[-_ERROR_LINES:]
  return {**row, 'error': f'exit status {result.returncode}: '
                          + ' | '.join(tail)}


def summarise(rows: list[dict]) -> dict:
  """Each variant's rate and compile time against the default runs'."""
  baseline = [r for r in rows if r['name'] == 'default' and 'error' not in r]
  if not baseline:
    return {}
  rate = statistics.median(r['steps_per_sec'] for r in baseline)
  compile_seconds = min(r['compile_seconds'] for r in baseline)
  digest = baseline[0]['states_sha256']
  for row in rows:
    if 'error' in row:
      continue
    row['over_default'] = row['steps_per_sec'] / rate
    row['compile_over_default'] = row['compile_seconds'] / compile_seconds
    row['same_states_as_default'] = row['states_sha256'] == digest
  return {'default_steps_per_sec': rate,
          'default_runs_agree': len({r['states_sha256']
                                     for r in baseline}) == 1}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--fused_steps', type=int, default=300,
                      help='steps per fused call')
  parser.add_argument('--trials', type=int, default=3)
  parser.add_argument('--variant', action='append', default=None,
                      help='NAME:UNROLL:XLA_FLAGS, repeatable (default: '
                           f'{", ".join(DEFAULT_VARIANTS)}); a default run '
                           'comes first and last either way')
  parser.add_argument('--device', default=None,
                      help="platform to run on (default: jax's default)")
  parser.add_argument('--timeout', type=float, default=600,
                      help='seconds one variant may take')
  parser.add_argument('--json', default=None, help='write results here')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--unroll', type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.batch_size, args.fused_steps, args.trials, args.unroll) < 1:
    parser.error('--batch_size, --fused_steps and --trials must be positive')
  if args.child:
    print(json.dumps(measure(args.batch_size, args.fused_steps, args.trials,
                             args.unroll, args.device)))
    return

  try:
    variants = ([parse_variant(v) for v in args.variant] if args.variant
                else [(n, u, f) for n, (u, f) in DEFAULT_VARIANTS.items()])
  except ValueError as e:
    parser.error(str(e))
  if args.variant and any(name == 'default' for name, _, _ in variants):
    parser.error("the variant name 'default' is reserved for the run with "
                 'no added flags and no unroll; name yours otherwise')
  variants = [v for v in variants if v[0] != 'default']
  default = ('default', *DEFAULT_VARIANTS['default'])
  rows = []
  print(f'batch {args.batch_size}, {args.fused_steps} steps per fused call, '
        f'median of {args.trials} trials, one process per variant')
  print(f'{"variant":22s}{"unroll":>7s}{"steps/s":>10s}{"compile s":>10s}'
        f'  XLA flags')
  for name, unroll, flags in [default, *variants, default]:
    row = run_variant(name, unroll, flags, args)
    rows.append(row)
    if 'error' in row:
      print(f'{name:22s}{unroll:7d}  failed: {row["error"]}')
    else:
      print(f'{name:22s}{unroll:7d}{row["steps_per_sec"]:10.2f}'
            f'{row["compile_seconds"]:10.1f}  {flags}')
  summary = summarise(rows)
  if summary:
    print(f'against the default runs\' median, '
          f'{summary["default_steps_per_sec"]:.2f} steps/s:')
    for row in rows:
      if 'error' not in row:
        print(f'  {row["name"]:22s}{row["over_default"]:6.3f} x steps/s, '
              f'{row["compile_over_default"]:5.2f} x compile time, states '
              f'{"the same" if row["same_states_as_default"] else "differ"}')
  report = {'python': platform.python_version(),
            'date': time.strftime('%Y-%m-%d'),
            'batch_size': args.batch_size, 'fused_steps': args.fused_steps,
            'trials': args.trials,
            'environment_xla_flags': os.environ.get('XLA_FLAGS', ''),
            **summary, 'variants': rows}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.json}')
  if not summary:
    sys.exit('the default variant failed; see its error above')


if __name__ == '__main__':
  main()
