"""Run logs: per-step CSV, per-epoch JSON lines, TensorBoard events, plots.

All writers live on the host and take already-fetched numbers; nothing here
touches the compiled step.
"""

import csv
import importlib
import io
import json
import os
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np

STEP_COLUMNS = ('phase', 'step', 'd_loss', 'g_loss', 'd_real', 'd_fake',
                'd_penalty')


def _tensorboardx():
  """The `tensorboardX` package, imported without loading PyTorch.

  tensorboardX's writer imports torch when it is installed, only to accept
  torch tensors. That costs seconds at start-up (more with CUDA builds, as on
  GPU machines) and jaxgan logs numpy values only, so unless torch is
  already loaded, its import is made to fail while tensorboardX loads (a
  `None` in `sys.modules` makes `import torch` raise ImportError, which
  tensorboardX handles); torch imports normally afterwards.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return importlib.import_module('tensorboardX')
  sys.modules['torch'] = None
  try:
    return importlib.import_module('tensorboardX')
  finally:
    del sys.modules['torch']


class _EventWriter:
  """TensorBoard events written in the calling thread and flushed on demand.

  tensorboardX's `FileWriter` hands events to a worker thread through a
  queue that its `flush` does not drain: a run killed between epochs lost
  the events of steps its CSV already held. Serialising an event here costs
  about what queueing it did.
  """

  def __init__(self, logdir: str):
    tensorboardx = _tensorboardx()
    os.makedirs(logdir, exist_ok=True)
    self._event = tensorboardx.proto.event_pb2.Event
    self._writer = tensorboardx.event_file_writer.EventsWriter(
        os.path.join(logdir, 'events'))

  def add_summary(self, summary, step: int) -> None:
    self._writer.write_event(self._event(summary=summary, step=step,
                                         wall_time=time.time()))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def truncate_log(path: str, keep) -> None:
  """Rewrites a CSV or JSON-lines log keeping only rows where `keep(row)`.

  Used on resume, so rows written after the restored checkpoint are not
  duplicated when those steps run again.
  """
  if not os.path.isfile(path):
    return
  if path.endswith('.csv'):
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
    kept = [r for r in rows if _kept(keep, r)]
    if len(kept) == len(rows):
      return
    _atomic_write(path, lambda f: _write_csv(f, kept))
  else:
    with open(path) as f:
      rows = []
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          rows.append(None)  # A line cut short by a crash.
    kept = [r for r in rows if r is not None and _kept(keep, r)]
    if len(kept) == len(rows):
      return
    _atomic_write(path, lambda f: f.writelines(
        json.dumps(r) + '\n' for r in kept))


def _kept(keep, row) -> bool:
  """keep(row), with rows cut short by a crash (missing fields) dropped."""
  try:
    return bool(keep(row))
  except (KeyError, TypeError, ValueError):
    return False


def _write_csv(f, rows) -> None:
  writer = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
  writer.writeheader()
  writer.writerows(rows)


def _atomic_write(path: str, write, binary: bool = False) -> None:
  tmp = f'{path}.tmp'
  with (open(tmp, 'wb') if binary else open(tmp, 'w', newline='')) as f:
    write(f)
  os.replace(tmp, path)


class RunLogger:
  """Writes a run's numbers to `steps.csv`, `metrics.jsonl` and TensorBoard.

  Args:
    workdir: the run's folder.
    enabled: False makes every method a no-op (for non-writing processes).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.steps_path = os.path.join(workdir, 'steps.csv')
    self.metrics_path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      self._tb = _EventWriter(os.path.join(workdir, 'tensorboard'))

  def forget_after(self, phase: str, step: int, epoch: int) -> None:
    """Drops logged rows of `phase` past `step` / `epoch` (see truncate_log)."""
    if not self.enabled:
      return
    truncate_log(self.steps_path, lambda r: r['phase'] != phase or int(
        r['step']) <= step)
    truncate_log(self.metrics_path, lambda r: r['phase'] != phase or int(
        r['epoch']) <= epoch)

  def log_steps(self, phase: str, first_step: int,
                metrics: Mapping[str, np.ndarray]) -> None:
    """Logs per-step metrics `[K]` of steps first_step+1 .. first_step+K."""
    if not self.enabled:
      return
    num = len(next(iter(metrics.values())))
    new_file = not os.path.isfile(self.steps_path)
    with open(self.steps_path, 'a', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
      if new_file:
        writer.writeheader()
      tags = [f'{phase}/{name}' for name in metrics]
      columns = [np.asarray(values, np.float64).tolist()
                 for values in metrics.values()]
      for i in range(num):
        step = first_step + i + 1
        values = [column[i] for column in columns]
        row = {'phase': phase, 'step': step}
        row.update((name, f'{value:.6g}')
                   for name, value in zip(metrics, values))
        writer.writerow(row)
        # One event per step, holding all its metrics.
        self._tb.add_summary(_scalars(zip(tags, values)), step)
    # On disk with the CSV's rows: a killed run keeps both.
    self._tb.flush()

  def log_epoch(self, record: dict[str, Any]) -> None:
    """Appends one JSON line and the record's numbers to TensorBoard."""
    if not self.enabled:
      return
    with open(self.metrics_path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    self._tb.add_summary(_scalars(
        (f'{record["phase"]}_epoch/{name}', value)
        for name, value in record.items()
        if isinstance(value, (int, float)) and name not in ('epoch', 'step')),
        record['epoch'])
    self._tb.flush()

  def log_image(self, tag: str, picture: np.ndarray, step: int) -> None:
    """Adds a uint8 `[H, W, C]` picture to TensorBoard."""
    if self.enabled:
      self._tb.add_summary(
          _tensorboardx().summary.image(tag, picture, dataformats='HWC'), step)

  def read_steps(self, phase: str, upto: int | None = None
                 ) -> dict[str, np.ndarray]:
    """All logged per-step metrics of a phase, as arrays.

    Args:
      phase: 'train' or 'discriminator'.
      upto: read only the file's first `upto` bytes (its size after the
        last `log_steps`), so that a reader in another thread never sees a
        row that is being appended.

    Returns:
      `{column: [N]}` for the step columns.
    """
    if not os.path.isfile(self.steps_path):
      return {}
    with open(self.steps_path, newline='') as f:
      text = f.read() if upto is None else f.read(upto)
    rows = [r for r in csv.DictReader(io.StringIO(text, newline=''))
            if r['phase'] == phase]
    return {name: np.array([float(r[name]) if r.get(name) else np.nan
                            for r in rows])
            for name in STEP_COLUMNS[1:]}

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _scalars(tagged_values: Iterable[tuple[str, float]]):
  """A TensorBoard `Summary` of several scalars."""
  Summary = _tensorboardx().proto.summary_pb2.Summary  # pylint: disable=invalid-name
  return Summary(value=[Summary.Value(tag=tag, simple_value=float(value))
                        for tag, value in tagged_values])


def plot_losses(steps: Mapping[str, np.ndarray], path: str,
                title: str = '') -> str | None:
  """Plots per-step losses and D's outputs to a PNG; None if no data.

  Safe to call from a background thread: it uses no pyplot state, and the
  file is replaced whole, never seen half written.
  """
  if not steps or not len(steps.get('step', ())):
    return None
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  def smooth(values: np.ndarray) -> np.ndarray:
    window = max(1, len(values) // 100)
    return np.convolve(values, np.ones(window) / window, mode='valid')

  fig = Figure(figsize=(8, 6))
  top, bottom = fig.subplots(2, 1, sharex=True)
  for name, axis in (('d_loss', top), ('g_loss', top), ('d_real', bottom),
                     ('d_fake', bottom)):
    values = steps.get(name)
    if values is None or np.all(np.isnan(values)):
      continue
    smoothed = smooth(values)
    axis.plot(steps['step'][len(steps['step']) - len(smoothed):], smoothed,
              label=name)
  top.set_ylabel('loss')
  bottom.set_ylabel('mean D output')
  bottom.set_xlabel('step')
  bottom.set_ylim(0, 1)
  for axis in (top, bottom):
    axis.legend(loc='upper right')
    axis.grid(alpha=0.3)
  if title:
    top.set_title(title)
  fig.tight_layout()
  _atomic_write(path, lambda f: fig.savefig(f, dpi=100, format='png'),
                binary=True)
  return path


def iter_chunks(total: int, size: int) -> Iterable[int]:
  """Sizes of consecutive chunks covering `total` with at most `size` each."""
  while total > 0:
    yield min(size, total)
    total -= size
