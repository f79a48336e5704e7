"""Step timing, the one copy: ``StepTimer`` (windows of steps after untimed warm-up
windows, on one clock; mean, median, fastest and rate). Training's ETA and images/s,
the time budget's measurement, ``tools/throughput.py``, ``tools/plan.py``, the benchmark
suite and the scripts of ``benchmarks/`` time steps with it."""

from __future__ import annotations

import statistics
import time
from typing import Callable


class StepTimer:
    """Seconds per step, from windows of steps (``add``) or from timing a blocking
    callable (``call``, ``time``). The first ``warmup`` windows are not counted
    (compilation, cold caches). ``clock``: what a second is read from (default
    ``time.perf_counter``; ``time.process_time`` for the process's CPU time)."""

    def __init__(self, warmup: int = 0, clock: Callable[[], float] | None = None):
        self.warmup, self.windows = warmup, []  # windows: (seconds, steps)
        self.clock = clock

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

    def min(self) -> float:
        """The fastest window's seconds per step (nan before the first)."""
        return min((s / n for s, n in self.windows), default=float("nan"))

    def call(self, run: Callable[[], object], steps: int = 1):
        """Calls ``run`` once (it must block until the device is done), a window of
        ``steps`` steps (not counted while warming up); returns what ``run`` returns."""
        clock = self.clock or time.perf_counter
        t = clock()
        value = run()
        self.add(clock() - t, steps)
        return value

    def time(self, run: Callable[[], object], steps: int) -> float:
        """Calls ``run`` (which must block until the device is done) for the warm-up,
        then ``steps`` timed times; returns the median seconds of a call."""
        for _ in range(self.warmup + steps):
            self.call(run)
        return self.median()


def timed(run: Callable[[], object]) -> tuple[object, float]:
    """(what ``run`` returns, the seconds it took): one call, one window."""
    timer = StepTimer()
    value = timer.call(run)
    return value, timer.mean()
