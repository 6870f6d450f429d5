r"""Cost of the fused loop's divergence guard, by guard, against no guard.

`jaxgan.train_loop` checks every step's states and metrics for NaN and
infinity. With `guard='freeze'` (the default) it also keeps the last finite
states (a select per state array, every step); with `guard='detect'` it only
flags the step. This times both against the same loop with the guard
replaced by a pass-through, interleaving the trials so that machine noise
hits them alike, and prints the median steps/s and the ratios.

  python benchmarks/divergence_guard.py --batch_size=64 --steps=10 --trials=7
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import jaxgan
from jaxgan import train
from timing import interleaved_rates


def _unguarded(step_fn, guard):
  """The guard's interface without its checks: `finite` is always True."""
  del guard

  def step(carry, batch, key):
    state, diverged = carry
    state, metrics = step_fn(state, batch, key)
    return (state, diverged), {**metrics, 'finite': ~diverged}

  return step


def _loop():
  """A train_loop under a jit of its own, so nothing is shared between the
  guarded and the unguarded trace."""

  def loop(*args, **kwargs):
    return train.train_loop.__wrapped__(*args, **kwargs)

  return jax.jit(loop, static_argnames=(
      'num_steps', 'batch_size', 'steps_per_epoch', 'loss', 'unroll',
      'num_shards', 'guard'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=10,
                      help='steps per fused call')
  parser.add_argument('--trials', type=int, default=7)
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args()
  if min(args.batch_size, args.steps, args.trials) < 1:
    parser.error('--batch_size, --steps and --trials must be positive')

  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (args.batch_size * args.steps * 2, 28, 28, 1), dtype=np.uint8))
  config = jaxgan.DCGANConfig(batch_size=args.batch_size)
  runs, finiteness_checks, selects = {}, {}, {}
  for name in (*train.GUARDS, 'unguarded'):
    original = train._guarded  # pylint: disable=protected-access
    if name == 'unguarded':
      train._guarded = _unguarded  # pylint: disable=protected-access
    try:
      loop = _loop()
      states = list(config.create_train_states(jax.random.key(0)))
      options = dict(num_steps=args.steps, batch_size=args.batch_size,
                     guard='freeze' if name == 'unguarded' else name)
      # The guard is the loop's only isfinite: count them in the program,
      # and the selects, which only 'freeze' adds to the step's own.
      program = str(jax.make_jaxpr(
          lambda g, d, loop=loop, options=options: loop(
              g, d, images, jax.random.key(1), **options))(*states))
      finiteness_checks[name] = program.count('is_finite')
      selects[name] = program.count('select_n')

      def run(loop=loop, states=states, options=options):
        g, d, metrics = loop(states[0], states[1], images, jax.random.key(1),
                             **options)
        jax.block_until_ready(metrics)
        states[:] = [g, d]

      run()  # Traces and compiles here, with the guard as chosen.
    finally:
      train._guarded = original  # pylint: disable=protected-access
    runs[name] = run
  if (finiteness_checks['unguarded'] or not all(
      finiteness_checks[guard] for guard in train.GUARDS)
      or not selects['freeze'] > selects['detect'] == selects['unguarded']):
    raise SystemExit(
        f'expected finiteness checks in both guarded loops and selects added '
        f'only by freeze, got checks {finiteness_checks}, selects {selects}')
  timed = interleaved_rates(runs, args.steps, args.trials)
  medians = {name: median for name, (median, _) in timed.items()}
  rates = {name: trials for name, (_, trials) in timed.items()}
  ratios = {f'{guard}_over_unguarded': medians[guard] / medians['unguarded']
            for guard in train.GUARDS}
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, batch '
        f'{args.batch_size}, {args.steps} steps per call, median of '
        f'{args.trials} interleaved trials')
  for name, median in medians.items():
    print(f'  {name:10s} {median:8.2f} steps/s')
  for guard in train.GUARDS:
    print(f'  {guard} / unguarded = {ratios[f"{guard}_over_unguarded"]:.3f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind,
                 'jax': jax.__version__, 'batch_size': args.batch_size,
                 'steps': args.steps, 'trials': args.trials,
                 'steps_per_sec': medians, 'rates': rates,
                 'finiteness_checks': finiteness_checks,
                 'selects': selects, **ratios}, f, indent=2)


if __name__ == '__main__':
  main()
