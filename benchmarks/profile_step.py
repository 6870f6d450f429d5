"""Where the fused loop's time goes: a profiler trace summarised per operation.

Traces one call of `jaxgan.train_loop` (after a compiling call and a warm-up
call) with `jax.profiler`, then sums the trace's events by name within each
timeline (on a GPU: the host threads and the device's streams). Per step it
reports the wall time, each timeline's busy time (the union of its events)
and the operations that cost the most. A device that is busy for much less
than the wall time is waiting on launches or the host, not computing.

  python benchmarks/profile_step.py --batch_size=64 --steps=100 --json=/tmp/profile.json

--compute_dtype and --conv_kernel_grad choose the models' settings, as in
`train_step.py`, to see where a variant's time goes.

The trace itself stays in --trace_dir (default: a temporary folder), readable
with TensorBoard's profile plugin or https://ui.perfetto.dev.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
import numpy as np

import jaxgan


def _union_length(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of `[start, end)` intervals, in their units."""
  total, reach = 0.0, -float('inf')
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def summarise_trace(trace: dict, steps: int, top: int) -> list[dict]:
  """Per timeline: busy time and the costliest operations, per step.

  Args:
    trace: a Chrome/Perfetto trace (`{'traceEvents': [...]}`), times in µs.
    steps: train steps the trace covers, to express times per step.
    top: how many operations to keep per timeline.

  Returns:
    `[{'timeline', 'busy_us_per_step', 'events_per_step',
    'operations': [{'name', 'us_per_step', 'calls_per_step'}]}]`, busiest
    timeline first.
  """
  names = {}
  for event in trace['traceEvents']:
    if event.get('ph') == 'M' and event.get('name') == 'process_name':
      names[event['pid']] = event['args']['name']
    if event.get('ph') == 'M' and event.get('name') == 'thread_name':
      names[(event['pid'], event['tid'])] = event['args']['name']
  by_timeline = collections.defaultdict(list)
  for event in trace['traceEvents']:
    if event.get('ph') == 'X' and 'dur' in event:
      by_timeline[(event['pid'], event.get('tid'))].append(event)
  summaries = []
  for (pid, tid), events in by_timeline.items():
    costs = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
      costs[event['name']][0] += event['dur']
      costs[event['name']][1] += 1
    busy = _union_length([(e['ts'], e['ts'] + e['dur']) for e in events])
    operations = sorted(costs.items(), key=lambda item: -item[1][0])[:top]
    summaries.append({
        'timeline': f'{names.get(pid, pid)} / {names.get((pid, tid), tid)}',
        'busy_us_per_step': busy / steps,
        'events_per_step': len(events) / steps,
        'operations': [{'name': name, 'us_per_step': total / steps,
                        'calls_per_step': calls / steps}
                       for name, (total, calls) in operations]})
  summaries.sort(key=lambda s: -s['busy_us_per_step'])
  return summaries


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=100,
                      help='steps in the traced fused call')
  parser.add_argument('--top', type=int, default=15,
                      help='operations listed per timeline')
  parser.add_argument('--timelines', type=int, default=4,
                      help='timelines printed: the devices\' first, '
                           'then the busiest')
  parser.add_argument('--compute_dtype', default='float32',
                      choices=('float32', 'bfloat16'),
                      help='the models\' computation dtype')
  parser.add_argument('--conv_kernel_grad', default='auto',
                      choices=jaxgan.models.KERNEL_GRADS,
                      help='how the convolutions are computed')
  parser.add_argument('--trace_dir', default=None)
  parser.add_argument('--json', default=None, help='write the summary here')
  args = parser.parse_args()
  if min(args.batch_size, args.steps, args.top, args.timelines) < 1:
    parser.error('--batch_size, --steps, --top and --timelines must be '
                 'positive')

  config = jaxgan.DCGANConfig(batch_size=args.batch_size,
                              compute_dtype=args.compute_dtype,
                              conv_kernel_grad=args.conv_kernel_grad)
  state_g, state_d = config.create_train_states(jax.random.key(0))
  images = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (max(60000, args.batch_size), 28, 28, 1), dtype=np.uint8))
  key = jax.random.key(1)

  def call(state_g, state_d):
    state_g, state_d, metrics = jaxgan.train_loop(
        state_g, state_d, images, key, num_steps=args.steps,
        batch_size=args.batch_size)
    jax.block_until_ready(metrics)
    return state_g, state_d

  state_g, state_d = call(state_g, state_d)  # Compiles.
  state_g, state_d = call(state_g, state_d)
  start = time.perf_counter()
  state_g, state_d = call(state_g, state_d)
  untraced = time.perf_counter() - start

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='jaxgan_profile')
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    state_g, state_d = call(state_g, state_d)
  traced = time.perf_counter() - start
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise SystemExit(f'the profiler wrote no *.trace.json.gz under '
                     f'{trace_dir}')
  with gzip.open(files[-1], 'rt') as f:
    trace = json.load(f)
  timelines = summarise_trace(trace, args.steps, args.top)

  device = jax.devices()[0]
  report = {'device': device.device_kind, 'jax': jax.__version__,
            'batch_size': args.batch_size, 'steps': args.steps,
            'compute_dtype': args.compute_dtype,
            'conv_kernel_grad': args.conv_kernel_grad,
            'wall_us_per_step_untraced': untraced / args.steps * 1e6,
            'wall_us_per_step_traced': traced / args.steps * 1e6,
            'trace': files[-1], 'timelines': timelines}
  print(f'{device.device_kind}, jax {jax.__version__}, batch '
        f'{args.batch_size}, {args.compute_dtype}, conv_kernel_grad='
        f'{args.conv_kernel_grad}: '
        f'{report["wall_us_per_step_untraced"]:.0f} µs per fused step '
        f'untraced, {report["wall_us_per_step_traced"]:.0f} traced')
  # Device timelines first: on a GPU the host's threads can be busier than
  # its compute stream, which is what the step is waiting on.
  printed = sorted(timelines,
                   key=lambda t: not t['timeline'].startswith('/device:'))
  for timeline in printed[:args.timelines]:
    print(f'\n{timeline["timeline"]}: busy {timeline["busy_us_per_step"]:.0f} '
          f'µs per step, {timeline["events_per_step"]:.0f} events per step')
    for op in timeline['operations']:
      print(f'  {op["us_per_step"]:9.1f} µs {op["calls_per_step"]:6.1f}x  '
            f'{op["name"][:90]}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
