"""Timing shared by the benchmark scripts."""

import statistics
import time
from typing import Callable


def interleaved_rates(runs: dict[str, Callable[[], None]], steps: int,
                      trials: int) -> dict[str, tuple[float, list[float]]]:
  """Steps/s of each run, trials taken in turn: run A, B, C, A, B, C, ...

  Each run does `steps` steps and waits for them. Taking the trials in turn,
  rather than all of one implementation and then all of the next, lets a
  change in the machine's load touch every implementation alike.

  Returns:
    `{name: (median steps/s, [steps/s of each trial])}`.
  """
  rates = {name: [] for name in runs}
  for _ in range(trials):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      rates[name].append(steps / (time.perf_counter() - start))
  return {name: (statistics.median(r), r) for name, r in rates.items()}
