r"""FCD of the default DCGAN trained with each GAN loss for the same steps.

Runs `examples/mnist_dcgan.py` once per loss (and seed) with the same
budget, reads each run's `eval_summary.json`, and prints a Markdown table of
the final FCD and classifier score (mean and std over seeds), written as
JSON too. The Wasserstein loss is run with the gradient penalty and without
BatchNorm in D, the combination WGAN-GP was designed for.

  python benchmarks/compare_losses.py --workdir=/tmp/losses \
      --mnist_dir=../shared/datasets/mnist --num_epochs=1 --seeds=0
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jaxgan

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples', 'mnist_dcgan.py')
# Flags beyond --loss that each loss runs with.
EXTRA_FLAGS = {'wasserstein': ['--penalty=gradient_penalty',
                               '--nodiscriminator_batch_norm']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--losses', default=','.join(jaxgan.available_losses()))
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--num_epochs', type=int, default=1)
  parser.add_argument('--steps_per_epoch', type=int, default=None)
  parser.add_argument('--eval_samples', type=int, default=10_000)
  parser.add_argument('--mnist_dir', default=None)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--json', default=None, help='write results here')
  args, extra = parser.parse_known_args()
  names = args.losses.split(',')
  unknown = sorted(set(names) - set(jaxgan.available_losses()))
  if unknown:
    parser.error(f'unknown losses {unknown}; choose from '
                 f'{jaxgan.available_losses()}')
  seeds = [int(s) for s in args.seeds.split(',')]

  rows = []
  for name in names:
    runs = []
    for seed in seeds:
      workdir = os.path.join(args.workdir, f'{name}_seed{seed}')
      flags = [f'--workdir={workdir}', f'--loss={name}', f'--seed={seed}',
               f'--num_epochs={args.num_epochs}',
               f'--eval_samples={args.eval_samples}', '--eval_every_epochs=0',
               '--noprogress', *EXTRA_FLAGS.get(name, []), *extra]
      for flag in ('steps_per_epoch', 'mnist_dir', 'data_dir'):
        if getattr(args, flag) is not None:
          flags.append(f'--{flag}={getattr(args, flag)}')
      start = time.time()
      subprocess.run([sys.executable, EXAMPLE, *flags], check=True,
                     stdout=subprocess.DEVNULL)
      with open(os.path.join(workdir, 'eval_summary.json')) as f:
        final = json.load(f)['final']
      runs.append({'seed': seed, 'fcd': final['fcd'],
                   'classifier_score': final['classifier_score'],
                   'classes_present': final['classes_present'],
                   'step': final['step'], 'seconds': time.time() - start})
      print(f'{name} seed {seed}: FCD {final["fcd"]:.1f}', flush=True)
    fcds = [r['fcd'] for r in runs]
    scores = [r['classifier_score'] for r in runs]
    rows.append({
        'loss': name, 'flags': EXTRA_FLAGS.get(name, []) + extra,
        'fcd_mean': statistics.mean(fcds),
        'fcd_std': statistics.stdev(fcds) if len(fcds) > 1 else 0.0,
        'classifier_score_mean': statistics.mean(scores), 'runs': runs})

  print(f'\n| loss | FCD (mean ± std over {len(seeds)} seed(s)) | '
        'classifier score |\n|---|---|---|')
  for row in rows:
    flags = f' ({" ".join(row["flags"])})' if row['flags'] else ''
    print(f'| {row["loss"]}{flags} | {row["fcd_mean"]:.1f} ± '
          f'{row["fcd_std"]:.1f} | {row["classifier_score_mean"]:.2f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'num_epochs': args.num_epochs,
                 'steps_per_epoch': args.steps_per_epoch, 'seeds': seeds,
                 'eval_samples': args.eval_samples, 'results': rows}, f,
                indent=2)


if __name__ == '__main__':
  main()
