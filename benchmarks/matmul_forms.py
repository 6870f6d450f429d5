r"""Matrix-product rates by operand layout and dtype, at the step's shapes.

A convolution computed as patches times kernel needs three products: the
forward pass `P[M, K] @ W[K, N]` ('NN'), the patches' gradient
`G[M, N] @ W[K, N]^T` ('NT', contracting the second axes of both) and the
kernel's gradient `P[M, K]^T @ G[M, N]` ('TN', contracting the first axes).
The libraries a backend calls for matmuls need not run the three forms, or
each dtype, equally fast; this script times each form in float32, in
bfloat16 accumulating in float32 (`preferred_element_type`) and in bfloat16
with a bfloat16 result, trials taken in turn.

  python benchmarks/matmul_forms.py --trials=7 --json=/tmp/matmul_forms.json

The default shapes are the two largest products of the train step at batch 64
(the discriminator's second convolution and the generator's first transposed
convolution, as `jaxgan.layers`' im2col computes them) and a 2048^3 product.
"""

import argparse
import json
import platform
import statistics

import jax
import jax.numpy as jnp
from jax import lax

from timing import interleaved_rates

# (M, K, N): patches [M, K], kernel [K, N].
DEFAULT_SHAPES = '3136x1600x128,3136x1152x256,2048x2048x2048'
FORMS = ('NN', 'NT', 'TN')
# name: (operand dtype, result dtype)
DTYPES = {
    'float32': (jnp.float32, jnp.float32),
    'bfloat16_f32_accumulation': (jnp.bfloat16, jnp.float32),
    'bfloat16_result': (jnp.bfloat16, jnp.bfloat16),
}


def operands(form: str, m: int, k: int, n: int, dtype) -> tuple:
  """The two operands of `form` for an `[M, K] x [K, N]`-sized product."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  shapes = {'NN': ((m, k), (k, n)), 'NT': ((m, n), (k, n)),
            'TN': ((m, k), (m, n))}[form]
  return tuple(jax.random.normal(key, shape, dtype)
               for key, shape in zip((key_a, key_b), shapes))


def product(form: str, result_dtype):
  """The jitted product of `form`, accumulating to `result_dtype`."""
  contracting = {'NN': ((1,), (0,)), 'NT': ((1,), (1,)),
                 'TN': ((0,), (0,))}[form]
  return jax.jit(lambda a, b: lax.dot_general(
      a, b, (contracting, ((), ())), preferred_element_type=result_dtype))


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
  """'MxKxN,...' -> [(M, K, N), ...]; raises ValueError naming a bad one."""
  shapes = []
  for item in text.split(','):
    parts = item.strip().lower().split('x')
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f'shape {item!r} is not MxKxN with positive sizes, '
                       f'e.g. 3136x1600x128')
    shapes.append(tuple(int(p) for p in parts))
  return shapes


def measure(shapes, trials: int, repeats: int) -> list[dict]:
  """GFLOP/s of every shape, form and dtype: the median of `trials`."""
  rows = []
  for m, k, n in shapes:
    runs = {}
    for form in FORMS:
      for name, (operand_dtype, result_dtype) in DTYPES.items():
        args = operands(form, m, k, n, operand_dtype)
        fn = product(form, result_dtype)
        jax.block_until_ready(fn(*args))  # Compiles.

        def run(fn=fn, args=args):
          for _ in range(repeats):
            out = fn(*args)
          jax.block_until_ready(out)

        runs[(form, name)] = run
    gflops = 2 * m * k * n / 1e9
    for (form, name), (_, per_trial) in interleaved_rates(
        runs, repeats, trials).items():
      rates = [products_per_sec * gflops for products_per_sec in per_trial]
      rows.append({'m': m, 'k': k, 'n': n, 'form': form, 'dtype': name,
                   'gflops_per_sec': statistics.median(rates),
                   'gflops_per_sec_trials': rates})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default=DEFAULT_SHAPES,
                      help='comma-separated MxKxN')
  parser.add_argument('--trials', type=int, default=7)
  parser.add_argument('--repeats', type=int, default=5,
                      help='products per trial')
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args()
  try:
    shapes = parse_shapes(args.shapes)
  except ValueError as error:
    parser.error(str(error))
  if args.trials < 1 or args.repeats < 1:
    parser.error('--trials and --repeats must be positive')

  rows = measure(shapes, args.trials, args.repeats)
  device = jax.devices()[0]
  print(f'{device.device_kind} ({device.platform}), jax {jax.__version__}; '
        f'GFLOP/s, median of {args.trials} trials')
  names = list(DTYPES)
  print(f'{"M x K x N":>20s} {"form":>4s} ' +
        ' '.join(f'{name:>26s}' for name in names))
  for i in range(0, len(rows), len(names)):
    group = rows[i:i + len(names)]
    first = group[0]
    shape = f'{first["m"]}x{first["k"]}x{first["n"]}'
    print(f'{shape:>20s} {first["form"]:>4s} ' +
          ' '.join(f'{row["gflops_per_sec"]:26.0f}' for row in group))
  print('NN: P[M,K] @ W[K,N]; NT: G[M,N] @ W[K,N]^T; TN: P[M,K]^T @ G[M,N]')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': device.device_kind, 'platform': device.platform,
                 'jax': jax.__version__, 'python': platform.python_version(),
                 'trials': args.trials, 'repeats': args.repeats,
                 'results': rows}, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
