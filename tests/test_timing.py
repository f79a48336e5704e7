import math

from medseg_jax import timing


def test_step_timer_skips_warmup_windows_and_weighs_steps():
    timer = timing.StepTimer(warmup=1)
    assert math.isnan(timer.mean()) and math.isnan(timer.median())
    timer.add(100.0, 1)  # compilation: not counted
    timer.add(2.0, 4)  # 0.5 s per step
    timer.add(1.0, 1)
    timer.add(3.0, 1)
    assert timer.steps == 6
    assert timer.mean() == 6.0 / 6  # every counted step, whatever its window
    assert timer.median() == 1.0  # of the windows' per-step times 0.5, 1, 3


def test_step_timer_time_calls_warmup_then_steps_and_gives_the_median(monkeypatch):
    durations = iter([50.0, 3.0, 1.0, 2.0])  # the first call is the warm-up
    clock = {"t": 0.0}

    def run():
        clock["t"] += next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    assert timing.StepTimer(warmup=1).time(run, 3) == 2.0


def test_step_timer_call_returns_the_value_and_counts_windows_of_steps(monkeypatch):
    clock = {"t": 0.0}

    def run(seconds, value):
        def inner():
            clock["t"] += seconds
            return value
        return inner

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    timer = timing.StepTimer(warmup=1)
    assert math.isnan(timer.min())
    assert timer.call(run(9.0, "warm")) == "warm"  # not counted
    assert timer.call(run(4.0, "a"), steps=2) == "a"  # 2 s per step
    assert timer.call(run(3.0, "b")) == "b"
    assert timer.windows == [(4.0, 2), (3.0, 1)]
    assert (timer.min(), timer.median(), timer.mean()) == (2.0, 2.5, 7.0 / 3)
    assert timing.timed(run(5.0, "c")) == ("c", 5.0)


def test_step_timer_reads_the_clock_it_is_given():
    """Two timers around one call: the wall clock and a clock of its own (e.g. CPU time)."""
    ticks = iter([10.0, 10.5])
    cpu = timing.StepTimer(clock=lambda: next(ticks))
    wall = timing.StepTimer()
    assert cpu.call(lambda: wall.call(lambda: 7)) == 7
    assert cpu.windows == [(0.5, 1)] and len(wall.windows) == 1 and wall.mean() >= 0
