r"""Host time at the example's epoch boundaries, when nothing else is queued.

Between an epoch's last call and the next epoch's first, the device has
only what the host queues meanwhile; on an accelerator it idles for the
rest. This runs `examples/mnist_dcgan.py` with the flags given after `--`
and measures, at each boundary, the time from the end of the epoch's loop
(its last metrics fetched) to the next epoch's first call. The first
boundary also compiles (or loads from the compilation cache) what the
evaluation runs, so later boundaries are summarised apart.

  python benchmarks/epoch_gaps.py --json=/tmp/gaps.json -- \
      --workdir=/tmp/gaps --steps_per_epoch=3 --num_epochs=5 \
      --eval_samples=1000 --sample_every_epochs=1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, 'examples', 'mnist_dcgan.py')

# Runs in the example's process before it starts: time stamps each train
# loop call, and the close of each epoch's progress bar (the end of the
# epoch's loop, after its last fetch).
_PRELUDE = '''
import atexit, time
import tqdm
from jaxgan import parallel
_marks = []
_make_loop = parallel.train_loop
def _timed_make_loop(mesh):
  loop = _make_loop(mesh)
  def call(*args, **kwargs):
    _marks.append(('call', time.perf_counter()))
    return loop(*args, **kwargs)
  if hasattr(loop, 'lower'):
    call.lower = loop.lower
  return call
parallel.train_loop = _timed_make_loop
_close = tqdm.tqdm.close
def _timed_close(self):
  _marks.append(('epoch_end', time.perf_counter()))
  return _close(self)
tqdm.tqdm.close = _timed_close
def _report():
  gaps, end = [], None
  for kind, when in _marks:
    if kind == 'epoch_end':
      end = when
    elif end is not None:
      gaps.append(when - end)
      end = None
  print('EPOCH_GAPS_SECONDS', *gaps)
atexit.register(_report)
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='also write the results here')
  parser.add_argument('example_flags', nargs='*',
                      help='flags for the example, after --')
  args = parser.parse_args()
  argv = [EXAMPLE, '--noprogress', *args.example_flags]
  code = (f'{_PRELUDE}\nimport runpy, sys\nsys.argv = {argv!r}\n'
          f'runpy.run_path({EXAMPLE!r}, run_name="__main__")')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=REPO)
  if result.returncode:
    sys.exit(f'the example failed ({result.returncode}):\n'
             f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
  line = next(l for l in result.stdout.splitlines()
              if l.startswith('EPOCH_GAPS_SECONDS'))
  gaps = [float(g) for g in line.split()[1:]]
  if not gaps:
    sys.exit('No epoch boundary was timed: run at least two epochs.')
  later = gaps[1:]
  summary = {
      'example_flags': args.example_flags,
      'gaps_ms': [round(g * 1000, 2) for g in gaps],
      'first_gap_ms': round(gaps[0] * 1000, 2),
      'later_gaps_median_ms': (round(statistics.median(later) * 1000, 2)
                               if later else None),
  }
  print(f'host time at each epoch boundary before the next call (ms): '
        f'{" ".join(f"{g * 1000:.0f}" for g in gaps)}')
  print(f'first {summary["first_gap_ms"]:.0f} ms (it compiles or loads the '
        f'evaluation\'s programs); later, median '
        + (f'{summary["later_gaps_median_ms"]:.1f} ms'
           if later else 'n/a (two epochs only)'))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()
