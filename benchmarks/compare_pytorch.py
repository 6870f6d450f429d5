r"""jaxgan against the same DCGAN step in PyTorch, timed the same way.

The PyTorch model mirrors jaxgan's default DCGAN layer for layer (BatchNorm in
G, leaky ReLU 0.2, BatchNorm momentum 0.1 = flax's 0.9), the same loss
(non-saturating, on logits), Adam(2e-4, betas (0.5, 0.999)) and the same step:
one G forward whose output serves a D update and then a G update. Both run in
this one process on the same machine, batches taken from a resident uint8
dataset; steps/sec are medians of several trials after warm-up. jaxgan's and
PyTorch eager's trials are taken in turn, so that the machine's changing load
touches them alike; torch.compile is timed last. PyTorch is
optional: without it the script says so and exits 0. It also reports the rate
of a jaxgan step made only of its matrix products and convolutions, each timed
alone (`train_step.contractions_alone`): about the most that making the rest
of the step cheaper could give.

With --bfloat16 both also run in mixed precision, timed in turn with the
others: jaxgan's fused loop with `compute_dtype='bfloat16'` and PyTorch eager
under `torch.autocast(dtype=torch.bfloat16)`, each library's own way of
computing in bfloat16 while keeping float32 parameters.

  python benchmarks/compare_pytorch.py --batch_size=64 --trials=5 --json=/tmp/cmp.json
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from timing import interleaved_rates


def torch_dcgan(torch, device):
  nn = torch.nn

  class Generator(nn.Module):

    def __init__(self):
      super().__init__()
      self.net = nn.Sequential(
          nn.Linear(100, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.2),
          nn.Linear(128, 7 * 7 * 128), nn.BatchNorm1d(7 * 7 * 128),
          nn.LeakyReLU(0.2))
      self.conv = nn.Sequential(
          nn.ConvTranspose2d(128, 64, 5, 2, padding=2, output_padding=1),
          nn.BatchNorm2d(64), nn.LeakyReLU(0.2),
          nn.ConvTranspose2d(64, 1, 5, 2, padding=2, output_padding=1),
          nn.Tanh())

    def forward(self, z):
      return self.conv(self.net(z).view(-1, 128, 7, 7))

  discriminator = nn.Sequential(
      nn.Conv2d(1, 64, 5, 2, padding=2), nn.LeakyReLU(0.2),
      nn.Conv2d(64, 128, 5, 2, padding=2), nn.BatchNorm2d(128),
      nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(7 * 7 * 128, 1))
  return Generator().to(device), discriminator.to(device)


def torch_runner(batch_size, steps, images_u8, use_compile, autocast=False):
  """`(run, device, version)`: `run()` does `steps` PyTorch steps, warmed up.

  With `autocast`, each step runs under `torch.autocast` in bfloat16.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':
    # The same arithmetic as jax's default float32 precision on GPUs
    # (TensorFloat-32 for matmuls and convolutions), and the fastest cuDNN
    # algorithms for these fixed shapes: PyTorch at its best, not its
    # defaults.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  generator, discriminator = torch_dcgan(torch, device)
  opt_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4,
                           betas=(0.5, 0.999))
  bce = torch.nn.BCEWithLogitsLoss()
  # NCHW uint8 on the device, like jaxgan's resident dataset.
  data = torch.from_numpy(images_u8).permute(0, 3, 1, 2).contiguous().to(device)
  num_batches = len(data) // batch_size
  ones = torch.ones(batch_size, 1, device=device)
  zeros = torch.zeros(batch_size, 1, device=device)

  def forward():
    # Autocast covers the forward passes and losses; PyTorch runs each
    # backward pass in the dtypes its forward pass chose.
    if autocast:
      return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def step(real_u8):
    real = real_u8.float() / 127.5 - 1.0
    z = torch.rand(batch_size, 100, device=device) * 2 - 1
    with forward():
      fake = generator(z)
    opt_d.zero_grad(set_to_none=True)
    with forward():
      d_loss = bce(discriminator(real), ones) + bce(
          discriminator(fake.detach()), zeros)
    d_loss.backward()
    opt_d.step()
    opt_g.zero_grad(set_to_none=True)
    with forward():
      g_loss = bce(discriminator(fake), ones)
    g_loss.backward()
    opt_g.step()
    return d_loss, g_loss

  if use_compile:
    step = torch.compile(step)
  position = [0]

  def run():
    for _ in range(steps):
      i = position[0] % num_batches
      position[0] += 1
      losses = step(data[i * batch_size:(i + 1) * batch_size])
    float(losses[0].detach())  # Waits for the device.
    if device.type == 'cuda':
      torch.cuda.synchronize()

  run()  # Warm-up (and, with torch.compile, compilation).
  return run, str(device), torch.__version__


def jax_runners(batch_size, steps, images_u8, compute_dtype='float32',
                per_step=True):
  """jaxgan's two ways to run `steps` steps, warmed up, and what they run.

  Args:
    per_step: also compile the one-call-per-step loop; without it
      `run_steps` is None.

  Returns:
    `(run_steps, run_fused, contractions_alone, device, version)`, where
    `contractions_alone(trials)` times the step's matrix products and
    convolutions one by one (see `train_step.contractions_alone`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxgan  # pylint: disable=g-import-not-at-top
  import train_step as train_step_benchmark  # pylint: disable=g-import-not-at-top
  config = jaxgan.DCGANConfig(batch_size=batch_size,
                              compute_dtype=compute_dtype)
  state = list(config.create_train_states(jax.random.key(0)))
  images = jax.device_put(jnp.asarray(images_u8))
  num_batches = len(images) // batch_size
  keys = [jax.random.fold_in(jax.random.key(1), i) for i in range(steps)]
  batches = [images[(i % num_batches) * batch_size:
                    (i % num_batches + 1) * batch_size] for i in range(steps)]

  def run_steps():
    g, d = state
    for batch, key in zip(batches, keys):
      g, d, metrics = jaxgan.train_step(g, d, batch, key)
    jax.block_until_ready(metrics)
    state[:] = [g, d]

  def run_fused():
    g, d, metrics = jaxgan.train_loop(
        state[0], state[1], images, jax.random.key(2), num_steps=steps,
        batch_size=batch_size)
    jax.block_until_ready(metrics)
    state[:] = [g, d]

  if per_step:
    run_steps()  # Warm-up and compilation.
  else:
    run_steps = None
  run_fused()

  def contractions_alone(trials):
    return train_step_benchmark.contractions_alone(
        state[0], state[1], batches[0], keys[0], trials)['steps_per_sec']

  return (run_steps, run_fused, contractions_alone,
          jax.devices()[0].device_kind, jax.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=10,
                      help='steps per timed trial')
  parser.add_argument('--trials', type=int, default=5)
  parser.add_argument('--no_compile', action='store_true',
                      help='skip torch.compile')
  parser.add_argument('--bfloat16', action='store_true',
                      help='also time both in mixed bfloat16 precision')
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args()
  if min(args.batch_size, args.steps, args.trials) < 1:
    parser.error('--batch_size, --steps and --trials must be positive')
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('PyTorch is not installed; nothing to compare against. '
          "Install it (e.g. pip install torch) to run this benchmark.")
    return 0

  images = np.random.default_rng(0).integers(
      0, 256, (max(10000, args.batch_size * args.steps), 28, 28, 1),
      dtype=np.uint8)
  report = {'batch_size': args.batch_size, 'steps': args.steps,
            'trials': args.trials, 'python': platform.python_version(),
            'cpu_count': os.cpu_count(), 'date': time.strftime('%Y-%m-%d')}
  run_steps, run_fused, contractions_alone, jax_device, jax_version = (
      jax_runners(args.batch_size, args.steps, images))
  runs = {'step': run_steps, 'fused': run_fused}
  runs['eager'], torch_device, torch_version = torch_runner(
      args.batch_size, args.steps, images, use_compile=False)
  if args.bfloat16:
    _, runs['fused_bfloat16'], _, _, _ = jax_runners(
        args.batch_size, args.steps, images, compute_dtype='bfloat16',
        per_step=False)
    runs['eager_bfloat16'], _, _ = torch_runner(
        args.batch_size, args.steps, images, use_compile=False,
        autocast=True)
  rates = interleaved_rates(runs, args.steps, args.trials)
  (step_rate, step_all), (fused_rate, fused_all) = rates['step'], rates['fused']
  eager_rate, eager_all = rates['eager']
  alone_rate = contractions_alone(args.trials)
  # torch.compile last and on its own: once it has run, other work in the
  # process ran about 15% slower on a 2-core CPU.
  compile_error = None
  if not args.no_compile:
    try:
      run_compiled, _, _ = torch_runner(args.batch_size, args.steps, images,
                                        use_compile=True)
      rates.update(interleaved_rates({'compile': run_compiled}, args.steps,
                                      args.trials))
    except Exception as e:  # torch.compile fails in many environment-specific ways.
      compile_error = f'{type(e).__name__}: {e}'[:500]
      print(f'torch.compile did not work here: {compile_error[:200]}',
            file=sys.stderr)
  report['jaxgan'] = {'device': jax_device, 'jax': jax_version,
                      'step_per_call_steps_per_sec': step_rate,
                      'fused_steps_per_sec': fused_rate,
                      'contractions_alone_steps_per_sec': alone_rate,
                      'trials_step': step_all, 'trials_fused': fused_all}
  report['pytorch'] = {'device': torch_device, 'torch': torch_version,
                       'eager_steps_per_sec': eager_rate,
                       'trials_eager': eager_all}
  compiled_rate = None
  if 'compile' in rates:
    compiled_rate, compiled_all = rates['compile']
    report['pytorch']['compile_steps_per_sec'] = compiled_rate
    report['pytorch']['trials_compile'] = compiled_all
  elif compile_error:
    report['pytorch']['compile_error'] = compile_error
  if args.bfloat16:
    jax_bf16, report['jaxgan']['trials_fused_bfloat16'] = (
        rates['fused_bfloat16'])
    torch_bf16, report['pytorch']['trials_eager_bfloat16'] = (
        rates['eager_bfloat16'])
    report['jaxgan']['fused_bfloat16_steps_per_sec'] = jax_bf16
    report['pytorch']['eager_bfloat16_steps_per_sec'] = torch_bf16
    report['ratio_bfloat16_jaxgan_over_eager'] = jax_bf16 / torch_bf16

  best_jax = max(step_rate, fused_rate)
  report['ratio_jaxgan_over_eager'] = best_jax / eager_rate
  report['ratio_contractions_alone_over_eager'] = alone_rate / eager_rate
  if compiled_rate:
    report['ratio_jaxgan_over_compile'] = best_jax / compiled_rate
  print(f'batch {args.batch_size}, median of {args.trials} interleaved '
        f'trials of {args.steps} steps; jaxgan on {jax_device} '
        f'(jax {jax_version}), PyTorch {torch_version} on {torch_device}')
  print(f'  jaxgan train_step, one call per step  {step_rate:8.2f} steps/s')
  print(f'  jaxgan train_loop, {args.steps} steps per call  '
        f'{fused_rate:8.2f} steps/s')
  print(f'  PyTorch eager                         {eager_rate:8.2f} steps/s')
  if compiled_rate:
    print(f'  PyTorch torch.compile                 {compiled_rate:8.2f} '
          'steps/s')
  print(f'  jaxgan (best) / PyTorch eager = '
        f'{report["ratio_jaxgan_over_eager"]:.2f}')
  print(f'  jaxgan step made only of its matrix products and convolutions, '
        f'each timed alone: {alone_rate:.2f} steps/s = '
        f'{report["ratio_contractions_alone_over_eager"]:.2f} x PyTorch eager')
  if compiled_rate:
    print(f'  jaxgan (best) / torch.compile = '
          f'{report["ratio_jaxgan_over_compile"]:.2f}')
  if args.bfloat16:
    print(f'  bfloat16: jaxgan train_loop {jax_bf16:.2f} steps/s, PyTorch '
          f'eager (autocast) {torch_bf16:.2f} steps/s, ratio '
          f'{report["ratio_bfloat16_jaxgan_over_eager"]:.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
