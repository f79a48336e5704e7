"""Step timing, the one copy: ``StepTimer`` (windows of steps after untimed warm-up
windows; mean, median and rate). Training's ETA and images/s, the time budget's
measurement, ``tools/throughput.py``, ``tools/plan.py`` and the benchmark suite time
steps with it."""

from __future__ import annotations

import statistics
import time
from typing import Callable


class StepTimer:
    """Seconds per step, from windows of steps (``add``) or from timing a blocking
    callable (``time``). The first ``warmup`` windows are not counted (compilation,
    cold caches)."""

    def __init__(self, warmup: int = 0):
        self.warmup, self.windows = warmup, []  # windows: (seconds, steps)

    def add(self, seconds: float, steps: int = 1) -> None:
        """A window of ``steps`` steps that took ``seconds``."""
        if self.warmup > 0:
            self.warmup -= 1
            return
        self.windows.append((float(seconds), int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, n in self.windows)

    def mean(self) -> float:
        """Seconds per step over every counted step (nan before the first)."""
        steps = self.steps
        return sum(s for s, _ in self.windows) / steps if steps else float("nan")

    def median(self) -> float:
        """The median of the windows' seconds per step (nan before the first)."""
        return (statistics.median(s / n for s, n in self.windows) if self.windows
                else float("nan"))

    def time(self, run: Callable[[], object], steps: int) -> float:
        """Calls ``run`` (which must block until the device is done) for the warm-up,
        then ``steps`` timed times; returns the median seconds of a call."""
        for _ in range(self.warmup + steps):
            t = time.perf_counter()
            run()
            self.add(time.perf_counter() - t)
        return self.median()
