"""Training: a run's data, set-up (``state.initialize``), time budget, checkpoint
restore and resume, then the step loop (``loop.py``). Nothing here is imported by
another job (``state.py`` holds what they share).

`train_and_evaluate(config, workdir)` trains (resuming from the latest
checkpoint in ``workdir`` if there is one), then evaluates the best checkpoint
on the test split. What it writes to ``workdir``:

- ``config.json``        the resolved config of the run (a resume: checked against it,
                         safe changes recorded with their step; workdir.py)
- ``splits.json``        the case split, reused by later runs and evaluation
- ``preprocess.json``    the intensity normalisation plan per task
- ``plans.json``         with ``data.plan="auto"``: the plan from the data and what it set
- ``metrics.jsonl``      one JSON object per log step and per epoch
- ``checkpoints/``       Orbax checkpoints (latest and best by validation Dice)
- ``events.out.tfevents.*``  TensorBoard scalars and validation overlays (``train.tensorboard``)
- ``test_metrics.json`` / ``test_metrics.md``  per-case and aggregated test metrics
  (``test_auto_*`` and ``postprocessing.json`` with ``eval.postprocess=choose``)
- ``profile/``           with ``train.profile_steps="A:B"``: a jax.profiler trace of steps A..B
- ``.lock``              held while a run uses the workdir (a second run is refused)

Every step's loss and gradient norm are checked (at the log steps, without extra
device syncs): a non-finite one stops the run naming the step, before it is saved.
SIGTERM makes the run save a checkpoint of its last step (mid-epoch if need be)
and raise ``Preempted``; the next run resumes from that step alone, with the same
data order.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import (evaluate, evaluators, fileio, planning, postprocess, sharding, timing,
                        transfer, writers)
from medseg_jax import loop as loop_lib
from medseg_jax import state as state_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import cache, laterality, loader
from medseg_jax.data import dataset as dataset_lib
from medseg_jax.loop import Preempted  # noqa: F401 (what main.py catches)
from medseg_jax.models import count_params


@contextlib.contextmanager
def _sigterm_sets(flag: threading.Event):
    """While inside, SIGTERM (a cluster's preemption notice) sets ``flag``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config: ml_collections.ConfigDict, workdir: str, *, return_state: bool = False):
    """Trains (or resumes); returns the final early-stopping/meta record (and, with
    ``return_state``, the final TrainState as ``(meta, state)``)."""
    config_lib.check_numbers(config)  # before the workdir is touched
    plan = None
    if planning.wanted(config):  # the fields left to the plan, from the data
        with workdir_lib.run_lock(workdir):
            config, plan = planning.resolve(config, workdir)
    config_lib.validate(config)
    state_lib.setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    with workdir_lib.run_lock(workdir):
        return _train(config, workdir, mesh, plan, return_state)


def _budget_epochs(config, workdir: str):
    """With ``train.budget_minutes``: ``config`` with the run's recorded num_epochs (the
    budget's; a resume with the same budget keeps it), else ``config`` itself."""
    path = os.path.join(workdir, "config.json")
    if not config.train.budget_minutes or not os.path.exists(path):
        return config
    previous = fileio.read_json(path, "the run's config", workdir_lib.CONFIG_RECOVER)
    epochs = previous.get("train", {}).get("num_epochs") if isinstance(previous, dict) else None
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    out.train.num_epochs = epochs
    return out


def _train(config, workdir: str, mesh, plan: dict | None, return_state: bool = False):
    # Before anything is read or written: a run of other settings is refused as it is
    # (the epochs a budget sets are compared once fitted, when config.json is written).
    workdir_lib.check_config(_budget_epochs(config, workdir), workdir)
    dataset, plans, samples = cache.prepare(config, workdir)
    pairs = laterality.parse_pairs(config.data.lateral_pairs, dataset.labels)
    swap = laterality.permutation(pairs, dataset.num_classes)
    if pairs:
        logging.info("Left / right label pairs, exchanged in mirrored training samples and "
                     "flip TTA (data.lateral_pairs): %s",
                     laterality.describe(pairs, dataset.labels))
    train_samples, val_samples = samples["train"], samples["val"]
    batch = config.train.batch_size
    if isinstance(train_samples, cache.Volumes):  # patches covering the data once
        n_train = train_samples.patches_per_pass(tuple(config.data.image_size),
                                                 config.data.slice_axis)
    else:
        n_train = len(train_samples)
    steps_per_epoch = config.train.steps_per_epoch or max(1, n_train // batch)
    budget = None
    if config.train.budget_minutes:
        config, budget = _fit_budget(config, workdir, mesh, dataset, train_samples,
                                     val_samples, steps_per_epoch, swap)
    total_steps = steps_per_epoch * config.train.num_epochs
    n_val = evaluators.val_indices(val_samples, config)
    logging.info("Data: %d train / %d val / %d test cases; %d train %s and %d val samples "
                 "(%s validated per epoch) of shape %s x %d channel(s); %d classes %s",
                 *(len(dataset.splits[s]) for s in dataset_lib.SPLITS), len(train_samples),
                 "volumes" if isinstance(train_samples, cache.Volumes) else "samples",
                 len(val_samples), "all" if n_val is None else len(n_val),
                 tuple(config.data.image_size), dataset.num_channels,
                 dataset.num_classes, dataset.labels)

    freeze_steps = (config.train.freeze_encoder_epochs * steps_per_epoch
                    if config.train.init_from else 0)
    setup = state_lib.initialize(config, dataset.num_classes, dataset.num_channels,
                                 total_steps, mesh, freeze_steps=freeze_steps, swap=swap)
    state = setup.state
    logging.info("Model %s (%dD, base %d, depth %d): %s parameters", config.model.name,
                 config.model.spatial_dims, config.model.base_features, config.model.depth,
                 f"{count_params(state.params):,}")

    with ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"), config.train.checkpoint_max_to_keep,
            keep_every_seconds=60 * float(config.train.keep_every_minutes)) as checkpointer:
        meta = {"epoch": -1, "best_val_loss": float("inf"), "bad_epochs": 0,
                "best_val_dice": -1.0, "best_epoch": -1, "stopped": False,
                "best_score": float("-inf"), "best_metric_value": float("nan")}
        # The newest checkpoint that verifies; damaged ones are moved aside with a warning.
        restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state,
                                                                      sharding.replicated(mesh)))
        latest = restored[0] if restored else None
        # Once the data are read and the checkpoint restored: a failed start changes nothing.
        workdir_lib.write_config(config, workdir, latest or 0)
        planning.write(plan, workdir)
        if latest is not None:
            _, state, meta = restored
            meta.pop("epoch_progress", None)  # older checkpoints: the step alone resumes
            # Older checkpoints: chosen by their raw val_dice.
            meta.setdefault("best_score", meta["best_val_dice"])
            meta.setdefault("best_metric_value", meta["best_val_dice"])
            done = latest % steps_per_epoch or steps_per_epoch
            logging.info("Resumed from the checkpoint of step %d (epoch %d, %d of %d steps done)",
                         latest, (latest - done) // steps_per_epoch + 1, done, steps_per_epoch)
        elif config.train.init_from:
            state, _ = transfer.load_pretrained(state, config.train.init_from, mesh)
            state = state_lib.with_ema(config, state)  # the average starts there
        log = writers.create(workdir, int(state.step),
                             [n for v, n in sorted(dataset.labels.items()) if v != 0],
                             tensorboard=config.train.tensorboard)
        if meta["stopped"] or int(state.step) >= total_steps:
            logging.info("Training already finished (epoch %d, stopped early: %s)",
                         meta["epoch"] + 1, meta["stopped"])
            log.close()
            return (meta, state) if return_state else meta

        t_run, stop = time.time(), threading.Event()
        train_fn, eval_fn, revise = setup.train_fn, setup.eval_fn, None
        if budget is not None and int(state.step) % steps_per_epoch == 0:
            train_fn, eval_fn = budget.timed("train", train_fn), budget.timed("eval", eval_fn)
            checkpointer.save = budget.timed("save", checkpointer.save)
            revise = budget.revise
        with _sigterm_sets(stop):
            try:
                loop = loop_lib.Loop(config, workdir, checkpointer, log, train_fn, eval_fn,
                                     mesh, train_samples, val_samples, steps_per_epoch, stop,
                                     *_overlay_setup(config, mesh, val_samples),
                                     cases=_case_setup(config, mesh, dataset, plans, swap),
                                     revise=revise)
                state = loop.run(state, meta)
            except FloatingPointError as e:  # the next resume may lower the rate or clip
                workdir_lib.record_divergence(workdir, getattr(e, "step", -1))
                raise
            finally:  # also on Ctrl-C or SIGTERM: let a pending checkpoint save finish
                checkpointer.close()
                log.close()
        logging.info("Training finished in %s", loop_lib.fmt_seconds(time.time() - t_run))
        return (meta, state) if return_state else meta


def _overlay_setup(config, mesh, val_samples) -> tuple[int | None, Any]:
    """(index of the validation sample with the most foreground, a prediction function)
    for the per-epoch overlay image in TensorBoard; (None, None) when off."""
    if (not config.train.tensorboard or not len(val_samples)
            or "overlay" not in config_lib.evaluator_names(config.train.evals)):
        return None, None
    labels = val_samples.labels
    counts = [int(np.count_nonzero(labels[i])) for i in range(len(labels))]
    return int(np.argmax(counts)), state_lib.make_predict_fn(config, mesh, tta=False)


def _case_setup(config, mesh, dataset, plans, swap) -> evaluators.Cases | None:
    """What the ``case_dice`` evaluator reads (None when ``train.evals`` lacks it): the
    data set, the plan and evaluation's prediction function (``eval.tta``)."""
    if "case_dice" not in config_lib.evaluator_names(config.train.evals):
        return None
    return evaluators.Cases(dataset, plans, state_lib.make_predict_fn(config, mesh, swap=swap))


_BUDGET_WARMUP, _BUDGET_STEPS = 2, 8  # untimed (on a Zen 5 25-45% slower), then timed steps
_clock = time.time  # the time budget's clock
# A checkpoint save, as the budget plans it (Orbax's first save also sets itself up: 8 s
# on a busy 2-core CPU for a tiny model whose later saves took under 0.1 s).
_SAVE_S = 1.0


def _fit_budget(config, workdir: str, mesh, dataset, train_samples, val_samples,
                steps_per_epoch: int, swap: tuple[int, ...] | None = None):
    """``(config, budget)``: ``config`` with ``train.num_epochs`` set so that training
    fits ``train.budget_minutes``, and the ``Budget`` that revises it after the first
    epoch. A resume with the same budget keeps the run's recorded epochs (as revised) and
    gets no ``Budget``; else they are measured on a throw-away state (a few steps after
    compilation, and a few validation batches). The budget counts from here: the
    measurement and the compilations are part of it."""
    budget = float(config.train.budget_minutes)
    path = os.path.join(workdir, "config.json")
    out = ml_collections.ConfigDict(config.to_dict())
    if os.path.exists(path):
        previous = fileio.read_json(path, "the run's config").get("train", {})
        if previous.get("budget_minutes") == budget and previous.get("num_epochs"):
            out.train.num_epochs = int(previous["num_epochs"])
            return out, None
    t0 = _clock()
    m = _measure(config, mesh, dataset, train_samples, val_samples, steps_per_epoch, swap)
    epoch_s = steps_per_epoch * m["step_s"] + m["val_s"] + _SAVE_S
    left = budget * 60 - (_clock() - t0) - 2 * m["compile_s"]  # the real run compiles too
    out.train.num_epochs = _agree(max(1, min(loop_lib.MAX_EPOCHS, int(left // epoch_s))))
    logging.info("Time budget %.1f min: %.2f s per step, %.1f s per validation, %.1f s per "
                 "epoch of %d steps -> %d epochs (measured in %.1f s)", budget, m["step_s"],
                 m["val_s"], epoch_s, steps_per_epoch, out.train.num_epochs, _clock() - t0)
    return out, Budget(60 * budget, t0, m["step_s"], m["val_batch_s"], workdir,
                       steps_per_epoch)


def _measure(config, mesh, dataset, train_samples, val_samples, steps_per_epoch: int,
             swap) -> dict:
    """Seconds of a training step (``step_s``) and of its compilation (``compile_s``),
    of one validation batch (``val_batch_s``) and of a validation (``val_s``)."""
    setup = state_lib.initialize(config, dataset.num_classes, dataset.num_channels,
                                 steps_per_epoch, mesh, swap=swap)
    state, train_fn, eval_fn = setup.state, setup.train_fn, setup.eval_fn
    # Batches read as the loop reads them (pre-made ones planned 10-25% too few s/step),
    # after one untimed read that pages their cases in, as the loop's first pass does (on
    # a cold page cache FCN's plan was 40% too slow on OpenKBP).
    n = 1 + _BUDGET_WARMUP + _BUDGET_STEPS
    with contextlib.closing(loader.epoch_batches(train_samples, config, 0, n)) as warm:
        collections.deque(warm, maxlen=0)  # closed: grain's workers stop here
    host = loader.epoch_batches(train_samples, config, 0, n)
    try:
        first = sharding.to_global(next(host), mesh)
        t_compile = time.time()
        state, out_ = train_fn(state, first)
        jax.block_until_ready(out_)
        compile_s = time.time() - t_compile
        timer = timing.StepTimer()
        for i, b in enumerate(host):
            if i == _BUDGET_WARMUP:  # the steps before are not timed
                jax.block_until_ready(out_)
                t_window = time.time()
            state, out_ = train_fn(state, sharding.to_global(b, mesh))
        jax.block_until_ready(out_)
        timer.add(time.time() - t_window, _BUDGET_STEPS)
    finally:
        host.close()
    val = list(loader.padded_batches(val_samples.images, val_samples.labels,
                                     config.eval.batch_size, jax.process_index(),
                                     jax.process_count(), val_samples.annotated,
                                     evaluators.val_indices(val_samples, config)))
    jax.block_until_ready(eval_fn(state, sharding.to_global(val[0], mesh)))  # compiles
    t_val = time.time()
    timed = val[1:4] or val[:1]
    for b in timed:
        jax.block_until_ready(eval_fn(state, sharding.to_global(b, mesh)))
    val_batch_s = (time.time() - t_val) / len(timed)
    return {"step_s": timer.mean(), "compile_s": compile_s, "val_batch_s": val_batch_s,
            "val_s": val_batch_s * len(val)}


def _agree(n: int) -> int:
    """Process 0's epoch count ``n`` on every process."""
    return int(sharding.from_process_0(np.int32(n)))


@dataclasses.dataclass
class Budget:
    """A time budget's revision: once, at the end of the first epoch a run trains after
    measuring (``revise``), ``train.num_epochs`` is set again from that epoch as the loop
    took it (its steps, the evaluators, the checkpoint save; less what the first calls
    cost once, timed by ``timed``: the steps' compilation, the first save's set-up beyond
    ``_SAVE_S``) and the time spent since the measurement began, so that a run given N
    minutes trains for about N minutes on a busy or an idle machine:
    ``done + (budget - spent - recompilation) // epoch``, at least the epochs done, at
    most ``loop.MAX_EPOCHS``. A cosine or poly schedule then runs over the revised total:
    the state's optimizer is made again (its state, the step count included, carries on;
    the steps compile once more, which the budget counts). config.json records the
    revised epochs (with a ``changes`` entry), so a resume with the same budget keeps
    them. A resumed run keeps the recorded epochs (revised or not: the time its earlier
    processes spent is not known), and one that measured anew (a changed budget) revises
    only if it starts at an epoch's end."""

    seconds: float  # the budget
    start: float  # _clock() when the measurement began
    step_s: float  # one training step, as measured before training
    val_batch_s: float  # one validation batch
    workdir: str
    steps_per_epoch: int
    first_calls: dict = dataclasses.field(default_factory=dict)  # name: (start, seconds)

    def timed(self, name: str, fn):
        """``fn``, its first call timed to its result (the loop's first step waits on its
        result anyway; the first validation batch waits once)."""
        def call(*args):
            if name in self.first_calls:
                return fn(*args)
            t = _clock()
            out = jax.block_until_ready(fn(*args))
            self.first_calls[name] = (t, _clock() - t)
            return out
        return call

    def revise(self, state, config, epoch: int):
        """``(state, config)`` with the epochs the rest of the budget allows after epoch
        ``epoch`` (0-based, just ended); logs the revision and records it."""
        now, planned = _clock(), int(config.train.num_epochs)
        t_first, train_s = self.first_calls.get("train", (now, 0.0))
        eval_s = self.first_calls.get("eval", (now, 0.0))[1]
        save_s = self.first_calls.get("save", (now, 0.0))[1]
        compile_s = max(0.0, train_s - self.step_s) + max(0.0, eval_s - self.val_batch_s)
        epoch_s = max(now - t_first - compile_s - max(0.0, save_s - _SAVE_S), 1e-3)
        schedule = config.train.lr_schedule
        left = self.seconds - (now - self.start) - (compile_s if schedule != "constant" else 0)
        done = epoch + 1
        revised = _agree(max(done, min(loop_lib.MAX_EPOCHS, done + int(left // epoch_s))))
        logging.info("Time budget %.1f min: planned %d epochs, measured %.1f s per epoch "
                     "(%.1f s spent), revised to %d", self.seconds / 60, planned, epoch_s,
                     now - self.start, revised)
        if revised == planned:
            return state, config
        out = ml_collections.ConfigDict(config.to_dict())
        out.train.num_epochs = revised
        workdir_lib.record_revision(
            self.workdir, "train.num_epochs", revised, done * self.steps_per_epoch,
            f"train.budget_minutes: {epoch_s:.1f} s per epoch measured in epoch {done}")
        if schedule != "constant":  # the schedule over the revised total (one retrace)
            state = state.replace(tx=state_lib.make_optimizer(
                out, self.steps_per_epoch * revised))
        return state, out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming if possible), then evaluates the best checkpoint."""
    config_lib.check_numbers(config)  # before the workdir is touched
    with workdir_lib.run_lock(workdir):
        postprocess.require_choice(config.eval.postprocess, workdir,
                                   config.eval.sw_window)  # before the plan
        train(config, workdir)
        return evaluate.evaluate(config, workdir)
