r"""Steps/sec of jaxgan's DCGAN train step: one call per step, and fused.

For each batch size: compile time (measured apart), then several timed trials
of (a) `jaxgan.train_step`, one call per step on batches gathered from a
device-resident dataset, and (b) `jaxgan.train_loop`, K steps per compiled
call. Warm-up is excluded, every timing ends in `block_until_ready`, and the
median and spread of the trials are reported. FLOPs per step come from the
compiled step's cost analysis and from an analytic count of the layers; model
FLOP utilisation is given against the device's peak where it is known, and
every device's achieved FLOP/s against its measured float32 matmul rate.
Last, the step's matrix products and convolutions are timed one by one: the
rate of a step made of them alone (column matmul/s) shows how much of the
step they are, and about how fast it could run if the rest cost nothing.

  python benchmarks/train_step.py --batch_sizes=64,256,1024 --json=/tmp/bench.json
  python benchmarks/train_step.py --data=both --mnist_dir=../shared/datasets/mnist
  python benchmarks/train_step.py --batch_sizes=64 --conv_kernel_grad=auto,xla,im2col --compute_dtype=float32,bfloat16

With several --conv_kernel_grad or --compute_dtype values, every combination
is measured in the same process, one after the other.
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxgan

# Dense peak FLOP/s per device: for float32 work as XLA runs it by default
# (TF32 tensor cores on NVIDIA GPUs, bfloat16 passes on TPUs) and for
# bfloat16; None where unknown.
PEAK_FLOPS = (
    ('H200', {'float32': 494.7e12, 'bfloat16': 989.4e12}),
    ('H100', {'float32': 494.7e12, 'bfloat16': 989.4e12}),
    ('A100', {'float32': 156e12, 'bfloat16': 312e12}),
    ('TPU v5 lite', {'float32': 197e12, 'bfloat16': 197e12}),
    ('TPU v5e', {'float32': 197e12, 'bfloat16': 197e12}),
    ('TPU v4', {'float32': 275e12, 'bfloat16': 275e12}),
)


def peak_flops(device_kind: str, dtype: str = 'float32') -> float | None:
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops[dtype]
  return None


def analytic_flops_per_step(config: jaxgan.DCGANConfig,
                            batch_size: int) -> float:
  """Multiply-adds x 2 of one train step, counting only non-zero products.

  Per image: G forward once (its output serves both updates) and backward
  (2x forward: input and kernel gradients); D forward and backward on the real
  and the generated batch for D's update (2 x 3x forward); D forward and
  input-only backward on the generated batch for G's update (2x forward).
  """
  def dense(n_in, n_out):
    return 2 * n_in * n_out

  def conv(h_out, w_out, k, c_in, c_out):
    return 2 * h_out * w_out * k * k * c_in * c_out

  c = config
  generator = (dense(c.noise_dim, c.generator_hidden_dim)
               + dense(c.generator_hidden_dim, 7 * 7 * c.generator_base_channels)
               # A transposed conv does k*k products per input pixel.
               + conv(7, 7, 5, c.generator_base_channels,
                      c.generator_conv_channels)
               + conv(14, 14, 5, c.generator_conv_channels, 1))
  discriminator = (conv(14, 14, 5, 1, c.discriminator_channels_1)
                   + conv(7, 7, 5, c.discriminator_channels_1,
                          c.discriminator_channels_2)
                   + dense(7 * 7 * c.discriminator_channels_2, 1))
  return batch_size * (3 * generator + 6 * discriminator + 2 * discriminator)


def xla_flops(stage) -> float | None:
  """FLOPs from XLA's cost analysis of a lowered or compiled function."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Not every backend and jax version offers it.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def measured_matmul_flops(device, size: int = 2048, trials: int = 5) -> float:
  """FLOP/s of a jitted float32 `[size, size] @ [size, size]` on `device`.

  Where no peak is tabulated (CPUs), this is the practical ceiling: a train
  step made only of such matmuls could at best run at this rate.
  """
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  times = _trials(lambda: jax.block_until_ready(matmul(a, a)), trials)
  return 2 * size ** 3 / statistics.median(times)


CONTRACTIONS = ('dot_general', 'conv_general_dilated')


def _sub_jaxprs(value):
  # Duck-typed: the classes' import paths have moved between jax versions.
  if hasattr(value, 'eqns'):  # A Jaxpr.
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value, 'consts'):  # ClosedJaxpr.
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def step_contractions(jaxpr) -> dict:
  """The matrix products and convolutions a jaxpr runs, with their counts.

  Walks into nested jaxprs (jit, scan, custom VJPs, cond branches: a branch
  counts as if it always ran).

  Returns:
    `{signature: (primitive, input avals, params, count)}`, one entry per
    distinct operation.
  """
  found = {}

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      repeat = times * (eqn.params.get('length', 1)
                        if eqn.primitive.name == 'scan' else 1)
      if eqn.primitive.name in CONTRACTIONS:
        avals = tuple(v.aval for v in eqn.invars)
        signature = (eqn.primitive.name, str(avals), str(eqn.params))
        entry = found.get(signature)
        found[signature] = (eqn.primitive, avals, eqn.params,
                            (entry[3] if entry else 0) + repeat)
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          walk(sub, repeat)

  walk(jaxpr, 1)
  return found


def _contraction_flops(primitive, avals, params) -> float:
  out = jax.eval_shape(lambda *xs: primitive.bind(*xs, **params),
                       *[jax.ShapeDtypeStruct(a.shape, a.dtype)
                         for a in avals])
  lhs, rhs = avals
  if primitive.name == 'dot_general':
    (contract, _), _ = params['dimension_numbers']
    per_output = int(np.prod([lhs.shape[d] for d in contract]))
  else:
    spec = params['dimension_numbers']
    # Multiply-adds per output: the kernel's window times its input features.
    per_output = int(np.prod([rhs.shape[d] for d in spec.rhs_spec[1:]]))
  return 2.0 * int(np.prod(out.shape)) * per_output


def _contraction_timer(primitive, avals, params, device):
  """A function that times one run of an operation, in seconds per call.

  A `fori_loop` repeats the operation (about 50 ms per run, at least twice)
  so that launches and Python dispatch do not count. Each repetition writes
  one element of its input from the previous result (in place: the input is
  loop-carried), so XLA cannot hoist the operation out of the loop, and no
  extra pass over the input is timed.
  """
  # Drawn on the host: jax.random.normal would compile one program per
  # operand shape, about a third of this function's time on a CPU.
  rng = np.random.default_rng(0)
  inputs = [jax.device_put(rng.standard_normal(a.shape, np.float32)
                           .astype(a.dtype), device) for a in avals]
  corner = (0,) * len(avals[0].shape)

  def repeated(repetitions, lhs, *rest):
    def body(_, lhs):
      out = primitive.bind(lhs, *rest, **params)
      return lhs.at[corner].add(0 * out.reshape(-1)[0])
    return jax.lax.fori_loop(0, repetitions, body, lhs)[corner]

  run = jax.jit(repeated, static_argnums=0)
  jax.block_until_ready(run(1, *inputs))
  start = time.perf_counter()
  jax.block_until_ready(run(1, *inputs))
  repetitions = max(2, min(1000, int(0.05 / max(time.perf_counter() - start,
                                                 1e-6))))
  jax.block_until_ready(run(repetitions, *inputs))

  def seconds_per_call():
    start = time.perf_counter()
    jax.block_until_ready(run(repetitions, *inputs))
    return (time.perf_counter() - start) / repetitions

  return seconds_per_call


def contractions_alone(state_g, state_d, batch, key, trials: int) -> dict:
  """The train step's matrix products and convolutions, each timed alone.

  `steps_per_sec` is the rate of a step made of them alone, one after the
  other: about the fastest the step could run if its normalisation,
  activations, losses and Adam updates cost nothing. About, not at most:
  inside the step XLA runs independent operations side by side, which can
  use the device better than one at a time (on a 2-core CPU at batch 256
  the whole fused step ran 5% faster than its contractions timed alone).

  Returns:
    `{'seconds_per_step', 'steps_per_sec', 'flops_per_step',
    'operations': [{'op', 'shapes', 'count', 'gflop', 'ms'}]}`.
  """
  jaxpr = jax.make_jaxpr(jaxgan.train_step)(state_g, state_d, batch,
                                             key).jaxpr
  found = list(step_contractions(jaxpr).values())
  (device,) = batch.devices()
  timers = [_contraction_timer(*op[:3], device) for op in found]
  # Round robin: a burst of load from elsewhere spoils one trial of every
  # operation, which the median drops, not every trial of one operation.
  times = [[] for _ in timers]
  for _ in range(trials):
    for timer, op_times in zip(timers, times):
      op_times.append(timer())
  operations, total_seconds, total_flops = [], 0.0, 0.0
  for (primitive, avals, params, count), op_times in zip(found, times):
    seconds = statistics.median(op_times)
    flops = _contraction_flops(primitive, avals, params)
    total_seconds += count * seconds
    total_flops += count * flops
    operations.append({
        'op': primitive.name,
        'shapes': [list(a.shape) for a in avals],
        'count': count, 'gflop': flops / 1e9, 'ms': seconds * 1e3})
  operations.sort(key=lambda op: -op['count'] * op['ms'])
  return {'seconds_per_step': total_seconds,
          'steps_per_sec': 1.0 / total_seconds,
          'flops_per_step': total_flops,
          'operations': operations}


def _trials(run, trials: int) -> list[float]:
  times = []
  for _ in range(trials):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def _summary(times: list[float], steps: int, batch_size: int) -> dict:
  rates = sorted(steps / t for t in times)
  median = statistics.median(rates)
  return {'steps_per_sec': median, 'images_per_sec': median * batch_size,
          'steps_per_sec_min': rates[0], 'steps_per_sec_max': rates[-1],
          'trials': len(times)}


def benchmark(images: jax.Array, batch_size: int, steps: int, fused_steps: int,
              trials: int, device, matmul_flops: float,
              alone_cache: dict | None, conv_kernel_grad: str = 'auto',
              compute_dtype: str = 'float32') -> dict:
  """One row of the table: rates, compile times and FLOPs of one setting.

  `alone_cache` maps a setting to its `contractions_alone` result (the data
  does not change the operations); None skips that measurement.
  """
  config = jaxgan.DCGANConfig(batch_size=batch_size,
                              conv_kernel_grad=conv_kernel_grad,
                              compute_dtype=compute_dtype)
  num_batches = len(images) // batch_size
  if num_batches < 1:
    raise SystemExit(f'batch size {batch_size} exceeds the dataset '
                     f'({len(images)} images)')
  state_g, state_d = jax.device_put(
      config.create_train_states(jax.random.key(0)), device)
  keys = [jax.random.fold_in(jax.random.key(1), i) for i in range(steps)]
  batches = [images[(i % num_batches) * batch_size:
                    (i % num_batches + 1) * batch_size] for i in range(steps)]

  start = time.perf_counter()
  lowered = jaxgan.train_step.lower(state_g, state_d, batches[0], keys[0])
  compiled = lowered.compile()
  compile_step = time.perf_counter() - start
  flops_xla = xla_flops(compiled)
  # Before optimisation, where no convolution or matmul has become a library
  # call yet: XLA:GPU's compiled count leaves out cuDNN's and cuBLAS's work.
  flops_hlo = xla_flops(lowered)

  state = {'g': state_g, 'd': state_d}

  def run_steps():
    g, d = state['g'], state['d']
    for batch, key in zip(batches, keys):
      g, d, metrics = jaxgan.train_step(g, d, batch, key)
    jax.block_until_ready(metrics)
    state['g'], state['d'] = g, d

  run_steps()  # Warm-up (and the first, compiling, call).
  step_times = _trials(run_steps, trials)

  loop_key = jax.random.key(2)
  start = time.perf_counter()
  jaxgan.train_loop.lower(
      state['g'], state['d'], images, loop_key, num_steps=fused_steps,
      batch_size=batch_size).compile()
  compile_loop = time.perf_counter() - start

  def run_loop():
    g, d, metrics = jaxgan.train_loop(
        state['g'], state['d'], images, loop_key, num_steps=fused_steps,
        batch_size=batch_size)
    jax.block_until_ready(metrics)
    state['g'], state['d'] = g, d

  run_loop()
  loop_times = _trials(run_loop, trials)

  setting = (batch_size, conv_kernel_grad, compute_dtype)
  if alone_cache is not None and setting not in alone_cache:
    alone_cache[setting] = contractions_alone(
        state['g'], state['d'], batches[0], keys[0], trials)
  flops = analytic_flops_per_step(config, batch_size)
  result = {
      'batch_size': batch_size,
      'conv_kernel_grad': conv_kernel_grad,
      'compute_dtype': compute_dtype,
      'compile_seconds_step': compile_step,
      'compile_seconds_loop': compile_loop,
      'flops_per_step_analytic': flops,
      'flops_per_step_xla': flops_xla,
      'flops_per_step_xla_unoptimized': flops_hlo,
      'step': _summary(step_times, steps, batch_size),
      'fused': {**_summary(loop_times, fused_steps, batch_size),
                'steps_per_call': fused_steps},
      'contractions_alone': (None if alone_cache is None
                             else alone_cache[setting]),
  }
  peak = peak_flops(device.device_kind, compute_dtype)
  for mode in ('step', 'fused'):
    achieved = flops * result[mode]['steps_per_sec']
    result[mode]['mfu'] = achieved / peak if peak else None
    result[mode]['fraction_of_matmul_rate'] = achieved / matmul_flops
  return result


def _print_row(result: dict):
  mfu = result['fused']['mfu']
  xla = result['flops_per_step_xla']
  alone = result['contractions_alone']
  print(f'{result["data"]:10s}{result["batch_size"]:6d}'
        f'{result["conv_kernel_grad"]:>9s}{result["compute_dtype"]:>9s}'
        f'{result["compile_seconds_step"]:10.1f}'
        f'{result["step"]["steps_per_sec"]:9.2f}'
        f'{result["step"]["images_per_sec"]:10.0f}'
        f'{result["fused"]["steps_per_sec"]:9.2f}'
        f'{result["fused"]["images_per_sec"]:10.0f}'
        f'{result["flops_per_step_analytic"] / 1e9:11.2f}'
        f'{xla / 1e9 if xla else float("nan"):8.2f}'
        f'{"unknown" if mfu is None else f"{mfu:.1%}":>8s}'
        f'{result["fused"]["fraction_of_matmul_rate"]:10.1%}'
        f'{alone["steps_per_sec"] if alone else float("nan"):9.2f}')


def _dataset(kind: str, args, device) -> jax.Array:
  if kind == 'mnist':
    images, _ = jaxgan.load_mnist('train', data_dir=args.data_dir,
                                  mnist_dir=args.mnist_dir)
  else:
    images = np.random.default_rng(0).integers(
        0, 256, (60000, 28, 28, 1), dtype=np.uint8)
  return jax.device_put(jnp.asarray(images), device)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_sizes', default='64,256,1024')
  parser.add_argument('--trials', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10,
                      help='steps per trial of the one-call-per-step loop')
  parser.add_argument('--fused_steps', type=int, default=10,
                      help='steps per fused call (one call per trial)')
  parser.add_argument('--device', default=None,
                      help='platform to run on: cpu, gpu or tpu (default: '
                           "jax's default)")
  parser.add_argument('--data', choices=('synthetic', 'mnist', 'both'),
                      default='synthetic')
  parser.add_argument('--conv_kernel_grad', default='auto',
                      help='comma-separated convolution implementations '
                           f'{jaxgan.models.KERNEL_GRADS} to measure')
  parser.add_argument('--compute_dtype', default='float32',
                      help='comma-separated dtypes (float32, bfloat16) to '
                           'measure')
  parser.add_argument('--no_contractions', action='store_true',
                      help='skip timing the contractions one by one')
  parser.add_argument('--mnist_dir', default=None)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args()
  try:
    batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  except ValueError:
    parser.error(f'--batch_sizes must be comma-separated integers, got '
                 f'{args.batch_sizes!r}')
  if min(batch_sizes) < 1 or min(args.trials, args.steps,
                                 args.fused_steps) < 1:
    parser.error('batch sizes, --trials, --steps and --fused_steps must be '
                 'positive')
  settings = [(conv, dtype) for conv in args.conv_kernel_grad.split(',')
              for dtype in args.compute_dtype.split(',')]
  for conv, dtype in settings:
    try:
      jaxgan.DCGANConfig(conv_kernel_grad=conv, compute_dtype=dtype)
    except ValueError as e:
      parser.error(str(e))
  try:
    device = jax.devices(args.device)[0]
  except RuntimeError as e:
    parser.error(f'no {args.device} device: {e}')

  kinds = ('synthetic', 'mnist') if args.data == 'both' else (args.data,)
  report = {'device': device.device_kind, 'platform': device.platform,
            'jax': jax.__version__, 'python': platform.python_version(),
            'date': time.strftime('%Y-%m-%d'), 'results': []}
  matmul_flops = measured_matmul_flops(device)
  report['matmul_flops_per_sec'] = matmul_flops
  print(f'{device.device_kind} ({device.platform}), jax {jax.__version__}; '
        f'median of {args.trials} trials; 2048^3 float32 matmul '
        f'{matmul_flops / 1e9:.0f} GFLOP/s')
  print(f'{"data":10s}{"batch":>6s}{"conv":>9s}{"dtype":>9s}'
        f'{"compile s":>10s}{"step/s":>9s}'
        f'{"img/s":>10s}{"fused/s":>9s}{"img/s":>10s}{"GFLOP/step":>11s}'
        f'{"XLA":>8s}{"MFU":>8s}{"of matmul":>10s}{"matmul/s":>9s}')
  alone_cache = None if args.no_contractions else {}
  with jax.default_device(device):
    for kind in kinds:
      images = _dataset(kind, args, device)
      for batch_size in batch_sizes:
        for conv, dtype in settings:
          result = benchmark(images, batch_size, args.steps, args.fused_steps,
                             args.trials, device, matmul_flops, alone_cache,
                             conv, dtype)
          result['data'] = kind
          report['results'].append(result)
          _print_row(result)
  print('matmul/s: steps/s of a step made only of its matrix products and '
        'convolutions, each timed alone (no normalisation, activations, '
        'losses or optimiser)')
  if args.data == 'both':
    conv, dtype = settings[0]
    for batch_size in batch_sizes:
      rates = {r['data']: r['fused']['steps_per_sec']
               for r in report['results'] if r['batch_size'] == batch_size
               and r['conv_kernel_grad'] == conv
               and r['compute_dtype'] == dtype}
      ratio = rates['mnist'] / rates['synthetic']
      report.setdefault('real_over_synthetic', {})[batch_size] = ratio
      print(f'batch {batch_size} ({conv}, {dtype}): real-data / '
            f'synthetic-data fused steps/s = {ratio:.3f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
