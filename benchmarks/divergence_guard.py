r"""Cost of the fused loop's divergence guard: guarded against unguarded steps/s.

`jaxgan.train_loop` checks every step's states and metrics for NaN and
infinity and freezes the states from the first bad step on (a select per
array). This times the loop as shipped against the same loop with the guard
replaced by a pass-through, interleaving the trials of both so that machine
noise hits them alike, and prints the median steps/s and their ratio.

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


def _unguarded(step_fn):
  """The guard's interface without its checks: `finite` is always True."""

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
      'num_shards'))


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
  runs, finiteness_checks = {}, {}
  for name, guarded in (('guarded', True), ('unguarded', False)):
    original = train._guarded  # pylint: disable=protected-access
    if not guarded:
      train._guarded = _unguarded  # pylint: disable=protected-access
    try:
      loop = _loop()
      states = list(config.create_train_states(jax.random.key(0)))
      options = dict(num_steps=args.steps, batch_size=args.batch_size)
      # The guard is the loop's only isfinite: count them in the program.
      finiteness_checks[name] = str(jax.make_jaxpr(
          lambda g, d, loop=loop: loop(g, d, images, jax.random.key(1),
                                       **options))(*states)).count('is_finite')

      def run(loop=loop, states=states, options=options):
        g, d, metrics = loop(states[0], states[1], images, jax.random.key(1),
                             **options)
        jax.block_until_ready(metrics)
        states[:] = [g, d]

      run()  # Traces and compiles here, with the guard as chosen.
    finally:
      train._guarded = original  # pylint: disable=protected-access
    runs[name] = run
  if not finiteness_checks['guarded'] or finiteness_checks['unguarded']:
    raise SystemExit(f'expected finiteness checks only in the guarded loop, '
                     f'got {finiteness_checks}')
  timed = interleaved_rates(runs, args.steps, args.trials)
  medians = {name: median for name, (median, _) in timed.items()}
  rates = {name: trials for name, (_, trials) in timed.items()}
  ratio = medians['guarded'] / medians['unguarded']
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, batch '
        f'{args.batch_size}, {args.steps} steps per call, median of '
        f'{args.trials} interleaved trials')
  for name, median in medians.items():
    print(f'  {name:10s} {median:8.2f} steps/s')
  print(f'  guarded / unguarded = {ratio:.3f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind,
                 'jax': jax.__version__, 'batch_size': args.batch_size,
                 'steps': args.steps, 'trials': args.trials,
                 'steps_per_sec': medians, 'rates': rates,
                 'finiteness_checks': finiteness_checks,
                 'guarded_over_unguarded': ratio}, f, indent=2)


if __name__ == '__main__':
  main()
