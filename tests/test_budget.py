"""The time budget's revision after the first epoch (train.Budget), on a fake clock: the
measurement before training and the first epoch's time are set by the test."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medseg_jax import loop as loop_lib
from medseg_jax import train

LR = 0.1
# What _measure reports: epochs of 2 steps plan 2 * 1.0 + 1.0 + 1.0 (save) = 4 s each.
MEASURED = {"step_s": 1.0, "compile_s": 0.0, "val_batch_s": 0.5, "val_s": 1.0}


def _next_lr(state) -> float:
    """The learning rate of the state's next step: SGD without momentum or decay moves
    each parameter by -lr times its gradient (ones here)."""
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    values = np.concatenate([np.ravel(np.asarray(u)) for u in jax.tree.leaves(updates)])
    np.testing.assert_allclose(values, values[0], rtol=1e-6)
    return -float(values[0])


@pytest.fixture
def clock(monkeypatch):
    """A fake budget clock; ``epoch_seconds[e]``: how long epoch ``e`` (0-based) takes,
    added as it ends. Records per epoch end: (epoch, step, optimizer count, next lr,
    the state's tx); ``stop_after``: the epoch after which SIGTERM arrives."""
    now = [1000.0]
    fake = {"epoch_seconds": {}, "ends": [], "measured": 0, "stop_after": None,
            "starts": []}
    monkeypatch.setattr(train, "_clock", lambda: now[0])

    def measure(*args, **kwargs):
        fake["measured"] += 1
        return dict(MEASURED)

    monkeypatch.setattr(train, "_measure", measure)
    end_epoch, run = loop_lib.Loop.end_epoch, loop_lib.Loop.run

    def timed_end(self, state, meta, epoch, losses, t_epoch):
        now[0] += fake["epoch_seconds"].get(epoch, 0.0)
        end_epoch(self, state, meta, epoch, losses, t_epoch)
        count = optax.tree_utils.tree_get(state.opt_state, "count")  # None: constant
        fake["ends"].append((epoch, int(state.step), None if count is None else int(count),
                             _next_lr(state), state.tx))
        if epoch == fake["stop_after"]:
            self.stop.set()

    def recording_run(self, state, meta):
        fake["starts"].append((int(state.step), _next_lr(state)))
        return run(self, state, meta)

    monkeypatch.setattr(loop_lib.Loop, "end_epoch", timed_end)
    monkeypatch.setattr(loop_lib.Loop, "run", recording_run)
    return fake


def _config(make_tiny_config, schedule="poly", **overrides):
    return make_tiny_config(**{"train.budget_minutes": 1.0, "train.num_epochs": 1,
                               "train.patience": 0, "train.lr_schedule": schedule,
                               "train.optimizer": "sgd", "train.momentum": 0.0,
                               "train.weight_decay": 0.0, "train.learning_rate": LR,
                               **overrides})


def _recorded(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


def _epoch_rows(workdir):
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if "val_loss" in r]


def test_a_slower_first_epoch_revises_the_epochs_and_the_poly_schedule_follows(
        tmp_path, make_tiny_config, clock):
    workdir = str(tmp_path / "run")
    # Planned: (60 s - 0 spent) // 4 s = 15 epochs. The first epoch takes 18 s: 42 s are
    # left, two more epochs: 3 in all, the schedule over 3 * 2 = 6 steps.
    clock["epoch_seconds"] = {0: 18.0}
    clock["stop_after"] = 1  # SIGTERM at the end of epoch 2: resumed below
    with pytest.raises(train.Preempted):
        train.train(_config(make_tiny_config), workdir)
    recorded = _recorded(workdir)
    assert recorded["train"]["num_epochs"] == 3
    change = recorded["changes"][-1]
    assert (change["field"], change["old"], change["new"], change["step"]) == (
        "train.num_epochs", 15, 3, 2)
    assert "18.0 s per epoch" in change["reason"]
    (e0, step0, count0, lr0, tx0), (e1, step1, count1, lr1, tx1) = clock["ends"]
    assert (e0, step0, count0) == (0, 2, 2) and (e1, step1, count1) == (1, 4, 4)
    assert lr0 == pytest.approx(LR * (1 - 2 / 30) ** 0.9, rel=1e-5)  # before: 15 epochs
    assert lr1 == pytest.approx(LR * (1 - 4 / 6) ** 0.9, rel=1e-5)  # after: 3 epochs
    assert tx1 is not tx0
    # The resume with the same budget keeps the 3 epochs (not refused, not measured
    # again), with the schedule over 6 steps from the checkpoint's count on.
    clock["stop_after"], clock["ends"] = None, []
    train.train(_config(make_tiny_config), workdir)
    assert clock["measured"] == 1
    assert clock["starts"][-1][0] == 4
    assert clock["starts"][-1][1] == pytest.approx(LR * (1 - 4 / 6) ** 0.9, rel=1e-5)
    assert [e[:3] for e in clock["ends"]] == [(2, 6, 6)]
    assert _recorded(workdir)["train"]["num_epochs"] == 3
    assert len(_epoch_rows(workdir)) == 3


def test_a_faster_first_epoch_adds_epochs_and_a_constant_rate_stays(tmp_path,
                                                                    make_tiny_config,
                                                                    clock, monkeypatch):
    workdir = str(tmp_path / "run")
    monkeypatch.setitem(MEASURED, "step_s", 10.0)  # planned: 60 // 31 = 1 epoch
    clock["epoch_seconds"] = {0: 15.0}  # 45 s left: 3 more
    train.train(_config(make_tiny_config, "constant"), workdir)
    assert _recorded(workdir)["train"]["num_epochs"] == 4
    assert [e[:2] for e in clock["ends"]] == [(e, 2 * e + 2) for e in range(4)]
    assert [e[3] for e in clock["ends"]] == pytest.approx([LR] * 4)
    assert len({id(e[4]) for e in clock["ends"]}) == 1  # the optimizer is kept
    assert len(_epoch_rows(workdir)) == 4


def test_a_first_epoch_past_the_budget_ends_the_run_there(tmp_path, make_tiny_config, clock):
    workdir = str(tmp_path / "run")
    clock["epoch_seconds"] = {0: 100.0}  # the budget is spent: at least the epoch done
    train.train(_config(make_tiny_config), workdir)
    assert _recorded(workdir)["train"]["num_epochs"] == 1
    assert [e[:2] for e in clock["ends"]] == [(0, 2)]
    assert len(_epoch_rows(workdir)) == 1


def test_the_revision_counts_compilation_and_stops_at_the_most_epochs(monkeypatch):
    from medseg_jax.config import default_config

    class State:  # what revise asks of a state: replace(tx=...)
        def replace(self, **fields):
            return fields

    now = [100.0]
    monkeypatch.setattr(train, "_clock", lambda: now[0])
    config = default_config()
    config.train.num_epochs, config.train.lr_schedule = 5, "constant"
    budget = train.Budget(600.0, 0.0, 1.0, 0.5, "/nonexistent", 2)
    calls = budget.timed("train", lambda x: now.__setitem__(0, now[0] + 21.0) or x)
    assert calls(1) == 1 and budget.first_calls["train"] == (100.0, 21.0)
    calls(2)
    assert budget.first_calls["train"] == (100.0, 21.0)  # only the first call
    # The epoch ended at 150: 50 s less the compilation (21 s less 1 s of a step) = 30 s;
    # of 600 s, 450 are left: 15 more epochs, the optimizer kept.
    now[0] = 150.0
    state, revised = budget.revise(State(), config, 0)
    assert revised.train.num_epochs == 16 and isinstance(state, State)
    # A poly schedule compiles the steps once more: 20 s fewer left, 14 more, and the
    # optimizer is made again.
    config.train.lr_schedule = "poly"
    state, revised = budget.revise(State(), config, 0)
    assert revised.train.num_epochs == 15 and set(state) == {"tx"}
    # The planned epochs again: nothing changes.
    state, same = budget.revise(State(), revised, 0)
    assert same is revised and isinstance(state, State)
    # Orbax's first save sets itself up: 6 s where the plan allows 1, 5 s once; the
    # epoch counts 25 s: 450 // 25 = 18 more.
    budget.first_calls["save"] = (140.0, 6.0)
    config.train.lr_schedule = "constant"
    assert budget.revise(State(), config, 0)[1].train.num_epochs == 19
    # An epoch of 10 ms: capped at MAX_EPOCHS.
    now[0] = 100.01
    budget = train.Budget(600.0, 0.0, 0.0, 0.0, "/nonexistent", 2, {"train": (100.0, 0.0)})
    assert budget.revise(State(), config, 0)[1].train.num_epochs == loop_lib.MAX_EPOCHS


def test_without_a_budget_nothing_is_measured_or_revised(tmp_path, make_tiny_config, clock,
                                                         monkeypatch):
    workdir = str(tmp_path / "run")
    clock["epoch_seconds"] = {0: 1000.0}
    monkeypatch.setattr(train.Budget, "timed", None)  # a budget's wrappers: not made
    train.train(_config(make_tiny_config, **{"train.budget_minutes": 0.0,
                                             "train.num_epochs": 2}), workdir)
    assert clock["measured"] == 0
    recorded = _recorded(workdir)
    assert recorded["train"]["num_epochs"] == 2 and "changes" not in recorded
    assert [e[:3] for e in clock["ends"]] == [(0, 2, 2), (1, 4, 4)]
    assert clock["ends"][0][3] == pytest.approx(LR * (1 - 2 / 4) ** 0.9, rel=1e-5)
    assert clock["ends"][0][4] is clock["ends"][1][4]
