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
