"""The training loop: one loop over steps, with triggers at step counts and epoch ends.

A step is a function of its number (``loader.run_batches``: the batch; the state: the
dropout and augmentation keys), so a run resumes from the step of its checkpoint alone.
Triggers, checked after each step ``s`` (1-based: the state's step once it is taken):

- every ``train.log_every_steps`` steps and at epoch ends: the finiteness check of the
  steps since the last one, the disk-full check of the checkpointer, a log row;
- at epoch ends (``s % steps_per_epoch == 0``): the evaluators of ``train.evals``
  (``evaluators``), early-stopping bookkeeping (``val_loss``), the best-checkpoint score
  (``train.best_metric``, ``train.best_ema``), the epoch's row and a checkpoint
  (``train.keep_every_minutes``: the checkpointer keeps one every M minutes);
- ``train.profile_steps="A:B"``: a ``jax.profiler`` trace of steps A..B in
  ``<workdir>/profile`` (TensorBoard's profile plugin or Perfetto);
- SIGTERM: a checkpoint of the last step taken, then ``Preempted``.

With a time budget (``train.budget_minutes``) the loop calls ``revise`` once, at the end
of the first epoch it trains: it returns the state (its optimizer scheduled over the
revised total) and the config with the revised ``train.num_epochs``, which the ETA, the
epoch printouts and the end follow (``train.py``).

An epoch resumed mid-way reports as its ``train_loss`` the mean over the steps taken
since the resume, with their count as ``train_loss_steps``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import evaluators, sharding, timing, writers
from medseg_jax.data import loader


MAX_EPOCHS = 1000  # the most epochs a time budget sets


class Preempted(Exception):
    """SIGTERM arrived: the run saved a checkpoint of its last step and stopped."""


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _transfer_guard(level: str):
    """``jax.transfer_guard(level)``, or nothing for ""."""
    return jax.transfer_guard(level) if level else contextlib.nullcontext()


def _first_bad(pending) -> tuple[int, float, float] | None:
    """(step, loss, grad norm) of the first step in ``pending`` that is not finite."""
    fetched = jax.device_get([out for _, out in pending])  # one explicit host round trip
    for (step, _), out in zip(pending, fetched):
        loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            return step, loss, grad_norm
    return None


class Profile:
    """A ``jax.profiler`` trace of steps A..B (``train.profile_steps="A:B"``, 1-based,
    both included; "" off) written to ``<workdir>/profile``. A run that starts inside the
    range traces from its first step."""

    def __init__(self, spec: str, workdir: str):
        self.range = config_lib.profile_steps(spec)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def annotate(self, step: int):
        """Starts the trace at the range's first step; the step's trace annotation."""
        if self.range and not self.active and self.range[0] <= step <= self.range[1]:
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # every Python call: a million events a step
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True,
                                     profiler_options=options)
            self.active = True
        return (jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active
                else contextlib.nullcontext())

    def after(self, step: int, out) -> None:
        """Stops the trace once step B is done on the device."""
        if self.active and step >= self.range[1]:
            jax.block_until_ready(out)
            self.close()
            logging.info("Profile of steps %d..%d written to %s", *self.range, self.directory)

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


@dataclasses.dataclass
class Loop:
    """Steps, finiteness checks, validation, checkpoints, profiling and SIGTERM."""

    config: Any
    workdir: str
    checkpointer: ckpt_lib.Checkpointer
    log: writers.MetricWriter
    train_fn: Any
    eval_fn: Any
    mesh: Any
    train_samples: Any
    val_samples: Any
    steps_per_epoch: int
    stop: threading.Event
    overlay_index: int | None = None  # the validation sample drawn into TensorBoard
    predict_fn: Any = None
    cases: evaluators.Cases | None = None  # the validation cases (case_dice)
    revise: Any = None  # (state, config, epoch) -> (state, config): a budget's revision

    def __post_init__(self):
        self.evaluators = evaluators.create(self.config, self.eval_fn, self.predict_fn,
                                            self.val_samples, self.mesh, self.overlay_index,
                                            self.cases)

    def run(self, state, meta: dict):
        """Trains from the state's step to ``train.num_epochs`` epochs (as ``revise`` sets
        them, or early stopping); updates ``meta`` in place and returns the final state."""
        config, per_epoch = self.config, self.steps_per_epoch
        first, total = int(state.step), per_epoch * config.train.num_epochs
        self.timer, self.profile = timing.StepTimer(), Profile(config.train.profile_steps,
                                                               self.workdir)
        # One input pipeline for the whole run (grain workers start once); with a
        # revision to come, batches as far as it may reach (made as the steps take them).
        host = loader.run_batches(self.train_samples, config, per_epoch, first,
                                  None if self.revise is None else per_epoch * MAX_EPOCHS)
        batches = sharding.prefetch_to_device(host, self.mesh, config.train.prefetch)
        self.losses, self.pending, self.window = [], [], (time.time(), 0)
        t_epoch = time.time()
        step = first
        try:
            while step < total:
                step += 1
                if self.stop.is_set() and step - 1 > first:  # SIGTERM: save, then stop
                    self.save_and_stop(state, meta, step - 1)
                with _transfer_guard(config.train.transfer_guard):  # no hidden round trip
                    state = self.step(state, step, next(batches), first)
                if step % per_epoch:
                    continue
                epoch = step // per_epoch - 1
                self.end_epoch(state, meta, epoch, self.losses, t_epoch)
                if self.revise is not None:  # once: the epochs the time budget allows
                    state, self.config = self.revise(state, self.config, epoch)
                    self.revise, total = None, per_epoch * self.config.train.num_epochs
                self.losses, t_epoch = [], time.time()
                if self.stop.is_set():
                    self.preempted(step, epoch, per_epoch)
                if meta["stopped"]:
                    logging.info("Early stopping: validation loss has not improved for %d "
                                 "epochs", config.train.patience)
                    break
        finally:
            self.profile.close()
            batches.close()
            host.close()  # stops grain's worker processes
        return state

    def step(self, state, step: int, device_batch, first: int):
        """Takes step ``step``; at the log trigger checks the steps since the last one and
        writes the row."""
        config, batch = self.config, self.config.train.batch_size
        t0 = time.time()
        with self.profile.annotate(step):
            state, out = self.train_fn(state, device_batch)
        self.profile.after(step, out)
        self.pending.append((step, out))
        self.losses.append(out["loss"])
        epoch_end = step % self.steps_per_epoch == 0
        if step == first + 1:
            loss0 = float(jax.device_get(out["loss"]))  # waits: includes the compile
            logging.info("First step (compilation included) took %.1f s, loss %.4f",
                         time.time() - t0, loss0)
            self.window = (time.time(), 0)
            if not epoch_end:
                return state
        else:
            self.window = (self.window[0], self.window[1] + 1)
        if step % config.train.log_every_steps and not epoch_end:
            return state
        self.check_finite(self.pending)
        self.pending = []
        self.checkpointer.check()  # a save that failed (disk full) stops the run now
        t_window, steps = self.window
        if not steps:
            return state
        fetched = jax.device_get(out)
        loss, dt = float(fetched["loss"]), time.time() - t_window
        ips = steps * batch / dt if dt > 0 else float("nan")
        self.timer.add(dt, steps)
        total = self.steps_per_epoch * config.train.num_epochs
        left = (total - step) * self.timer.mean()
        epoch = (step - 1) // self.steps_per_epoch
        logging.info("epoch %d/%d step %d/%d loss %.4f | %.1f images/s | ~%s left "
                     "(training steps only)", epoch + 1, config.train.num_epochs,
                     step, total, loss, ips, fmt_seconds(left if np.isfinite(left) else 0))
        self.log.write_scalars(step, dict(loss=loss, grad_norm=float(fetched["grad_norm"]),
                                          images_per_second=ips),
                               section="train", epoch=epoch + 1)
        self.window = (time.time(), 0)
        return state

    def check_finite(self, pending) -> None:
        """Stops training (FloatingPointError) at the first non-finite loss or gradient."""
        bad = _first_bad(pending)
        if bad is None:
            return
        step, loss, grad_norm = bad
        self.checkpointer.wait()
        last = self.checkpointer.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in "
                f"{self.checkpointer.directory}; a new run resumes from it" if last is not None
                else "no checkpoint had been saved yet; a new run starts from scratch")
        error = FloatingPointError(
            f"training diverged: non-finite {'loss' if not np.isfinite(loss) else 'gradient'} "
            f"at step {step} (loss {loss}, gradient norm {grad_norm}); stopped without "
            f"saving it: {kept}. Lower config.train.learning_rate or set "
            "config.train.grad_clip_norm, then run the same command again")
        error.step = step
        raise error

    def save_and_stop(self, state, meta, step: int):
        """SIGTERM mid-epoch: checkpoints the step taken last (never best), then Preempted."""
        self.check_finite(self.pending)
        self.checkpointer.save(step, state, dict(meta), None)
        self.preempted(step, step // self.steps_per_epoch, step % self.steps_per_epoch)

    def preempted(self, step: int, epoch: int, steps_done: int):
        self.checkpointer.wait()
        raise Preempted(
            f"SIGTERM: saved the checkpoint of step {step} (epoch {epoch + 1}, {steps_done} "
            f"of {self.steps_per_epoch} steps) in {self.checkpointer.directory}; run the "
            "same command to resume")

    def end_epoch(self, state, meta: dict, epoch: int, losses: list, t_epoch: float):
        """Validation, early-stopping bookkeeping, the epoch's log row and checkpoint;
        ``losses``: the epoch's step losses (since the resume, for a resumed epoch)."""
        config = self.config
        t_val = time.time()
        train_loss = float(np.mean(jax.device_get(losses)))
        val, images = {}, {}
        for evaluator in self.evaluators:  # train.evals, in order
            scalars, pictures = evaluator.run(state)
            val.update(scalars)
            images.update(pictures)
        step = int(state.step)
        improved = val["val_loss"] < meta["best_val_loss"] - config.train.min_delta
        meta["bad_epochs"] = 0 if improved else meta["bad_epochs"] + 1
        meta["best_val_loss"] = min(meta["best_val_loss"], val["val_loss"])
        metric = config.train.best_metric
        if evaluators.update_best(meta, val[metric], epoch, metric, config.train.best_ema):
            meta["best_val_dice"] = val["val_dice"]  # the raw Dice of the best epoch
        meta["epoch"] = epoch
        patience = config.train.patience
        meta["stopped"] = bool(patience and meta["bad_epochs"] >= patience)
        epoch_time = time.time() - t_epoch
        partial = ({"train_loss_steps": len(losses)} if len(losses) < self.steps_per_epoch
                   else {})
        # The row goes first: a run killed before the checkpoint is complete resumes
        # from the previous one and drops this row (its step is past the checkpoint).
        smoothed = ({"best_metric_ema": meta["best_metric_ema"]} if config.train.best_ema
                    else {})
        self.log.write_scalars(step, dict(
            train_loss=train_loss, **val, **smoothed,
            images_per_second=len(losses) * config.train.batch_size
            / max(t_val - t_epoch, 1e-9),
            epoch_seconds=epoch_time, **partial), section="epoch", epoch=epoch + 1)
        if images:
            self.log.write_images(step, images)
        score = meta["best_metric_ema"] * (1 if evaluators.METRICS[metric] == "max" else -1)
        self.checkpointer.save(step, state,
                               dict(meta, **{k: val[k] for k in ("val_loss", "val_dice")}),
                               {"val_dice": val["val_dice"], "val_loss": val["val_loss"],
                                ckpt_lib.BEST_METRIC: score})
        logging.info("epoch %d/%d done in %.1f s: train loss %.4f, val loss %.4f, val Dice "
                     "%.4f (best %s %.4f at epoch %d)%s", epoch + 1, config.train.num_epochs,
                     epoch_time, train_loss, val["val_loss"], val["val_dice"], metric,
                     meta["best_metric_value"], meta["best_epoch"],
                     "" if improved else f", no val-loss improvement for {meta['bad_epochs']}")
