r"""Per-layer forward + backward times: flax's convolutions against jaxgan's.

For each convolution of the DCGAN at the given batch size, times the jitted
gradient (w.r.t. kernel and input) with `flax.linen` and with both
implementations of `jaxgan.layers` (`layers.IMPLEMENTATIONS`), as a plain
program and inside `lax.scan` (where XLA:CPU behaves differently).
Reports the median and spread of several trials, side by side in one run.

  python benchmarks/layers.py --batch_size=64 --trials=7 --json=/tmp/layers.json
"""

import argparse
import json
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgan import layers

# name, flax layer, jaxgan layer, input shape without the batch axis
LAYERS = (
    ('G ConvTranspose 7x7x128 -> 14x14x64',
     lambda m: m.ConvTranspose(64, (5, 5), (2, 2)), (7, 7, 128)),
    ('G ConvTranspose 14x14x64 -> 28x28x1',
     lambda m: m.ConvTranspose(1, (5, 5), (2, 2)), (14, 14, 64)),
    ('D Conv 28x28x1 -> 14x14x64',
     lambda m: m.Conv(64, (5, 5), (2, 2)), (28, 28, 1)),
    ('D Conv 14x14x64 -> 7x7x128',
     lambda m: m.Conv(128, (5, 5), (2, 2)), (14, 14, 64)),
)
SCAN_LENGTH = 4
IMPLEMENTATIONS = ('flax', *layers.IMPLEMENTATIONS)


def _layer(make, implementation):
  if implementation == 'flax':
    return make(nn)
  return make(layers).clone(implementation=implementation)


def _time(fn, args, trials: int) -> list[float]:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(trials):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def _programs(layer):
  def loss(params, x):
    return jnp.sum(layer.apply(params, x) ** 2)

  plain = jax.jit(jax.grad(loss, argnums=(0, 1)))

  @jax.jit
  def scanned(params, x):
    def body(carry, _):
      grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x + carry)
      # Feed the result back so iterations cannot be merged or removed.
      return carry + 1e-12 * (jnp.mean(grad_x) + jnp.mean(
          grad_params['params']['kernel'])), None
    return jax.lax.scan(body, jnp.zeros(()), None, length=SCAN_LENGTH)[0]

  return plain, scanned


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--trials', type=int, default=7)
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args()
  if args.batch_size < 1 or args.trials < 1:
    parser.error('--batch_size and --trials must be positive')

  results = []
  # Accelerators take fractions of a millisecond per layer.
  digits = 1 if jax.default_backend() == 'cpu' else 3
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax '
        f'{jax.__version__}, batch {args.batch_size}, median of '
        f'{args.trials} trials, ms per forward+backward')
  print(f'{"layer":38s}' + ''.join(f'{name:>13s}' for name in IMPLEMENTATIONS)
        + ''.join(f'{name + " scan":>18s}' for name in IMPLEMENTATIONS))
  for name, make, shape in LAYERS:
    x = jax.random.normal(jax.random.key(0), (args.batch_size, *shape))
    row = {'layer': name}
    params = make(nn).init(jax.random.key(1), x)
    for impl in IMPLEMENTATIONS:
      plain, scanned = _programs(_layer(make, impl))
      for mode, fn, per_call in (('plain', plain, 1),
                                 ('scan', scanned, SCAN_LENGTH)):
        times = [t / per_call * 1e3 for t in _time(fn, (params, x),
                                                   args.trials)]
        row[f'{impl}_{mode}_ms'] = statistics.median(times)
        row[f'{impl}_{mode}_spread_ms'] = max(times) - min(times)
    results.append(row)
    print(f'{name:38s}' + ''.join(
        f'{row[f"{impl}_{mode}_ms"]:{width}.{digits}f}' for mode, width in
        (('plain', 13), ('scan', 18)) for impl in IMPLEMENTATIONS))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind,
                 'backend': jax.default_backend(), 'jax': jax.__version__,
                 'python': platform.python_version(),
                 'batch_size': args.batch_size, 'trials': args.trials,
                 'layers': results}, f, indent=2)


if __name__ == '__main__':
  main()
