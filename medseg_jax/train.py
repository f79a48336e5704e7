"""Training: the jitted step over a device mesh, the epoch loop, early stopping,
checkpoints and resume. Nothing here is imported by another job (``state.py`` holds
what they share).

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
- ``.lock``              held while a run uses the workdir (a second run is refused)

Every step's loss and gradient norm are checked (at the log steps, without extra
device syncs): a non-finite one stops the run naming the step, before it is saved.
SIGTERM makes the run save a checkpoint of its last step (mid-epoch if need be)
and raise ``Preempted``; the next run resumes there with the same data order.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import (evaluate, fileio, inference, losses, metrics, planning,
                        postprocess, report, sharding, transfer, writers)
from medseg_jax import state as state_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import augment, cache, laterality, loader, preprocess
from medseg_jax.data import dataset as dataset_lib
from medseg_jax.models import count_params


def train_step(state: state_lib.TrainState, batch: dict, *, config, num_classes: int,
               freeze_steps: int = 0, swap: tuple[int, ...] | None = None):
    """One optimizer step on a global batch: on-device augmentation, Dice + CE (plus the
    coarser outputs with ``model.deep_supervision``).

    For the first ``freeze_steps`` steps the encoder stays fixed (transfer learning).
    ``swap``: the left / right label permutation a mirrored sample takes (laterality).
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    annotated = batch.get("annotated")
    images, labels, *rest = augment.augment_batch(
        aug_rng, batch["image"], batch["label"], config.augment, swap, annotated,
        context=int(config.data.get("context_slices", 0)))
    annotated = rest[0] if rest else None

    deep = bool(config.model.get("deep_supervision", False))

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats", "aux"] if deep else ["batch_stats"],
            rngs={"dropout": dropout_rng})
        aux = {int(name.split("_")[1]): value[-1]
               for name, value in updates.get("aux", {}).items()}
        loss = losses.supervised_loss(logits, labels, num_classes,
                                      dice_weight=config.train.dice_weight,
                                      ce_weight=config.train.ce_weight, aux=aux,
                                      annotated=annotated)
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if freeze_steps:
        frozen = state.step < freeze_steps
        grads = transfer.zero_encoder(grads, frozen)
        old = state
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        state = state.replace(
            params=transfer.freeze_encoder(old.params, state.params, frozen),
            batch_stats=transfer.freeze_encoder(old.batch_stats, state.batch_stats, frozen))
    else:
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    grad_norm = optax.tree.norm(grads)
    return state, {"loss": loss, "grad_norm": grad_norm}


def eval_step(state: state_lib.TrainState, batch: dict, *, config, num_classes: int):
    """Loss (weighted by real rows) and Dice counts of one padded batch."""
    logits = state.apply_fn(state_lib.variables(state), batch["image"], train=False)
    mask, annotated = batch["mask"], batch.get("annotated")
    loss = losses.supervised_loss(logits, batch["label"], num_classes,
                                  dice_weight=config.train.dice_weight,
                                  ce_weight=config.train.ce_weight, mask=mask,
                                  annotated=annotated)
    counts = metrics.dice_counts(jnp.argmax(logits, -1), batch["label"], num_classes, mask=mask,
                                 annotated=annotated)
    return {"loss_sum": loss * mask.sum(), "n": mask.sum(), "counts": jnp.stack(counts)}


def jit_steps(config, mesh, num_classes: int, freeze_steps: int = 0,
              swap: tuple[int, ...] | None = None):
    repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    train = jax.jit(
        functools.partial(train_step, config=config, num_classes=num_classes,
                          freeze_steps=freeze_steps, swap=swap),
        in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
    evaluate = jax.jit(
        functools.partial(eval_step, config=config, num_classes=num_classes),
        in_shardings=(repl, data), out_shardings=repl)
    return train, evaluate


def _val_indices(samples: cache.Samples, config) -> np.ndarray | None:
    return loader.evenly_spaced(len(samples), config.train.get("val_max_samples", 0))


def validate(eval_fn, state, samples: cache.Samples, config, mesh) -> dict:
    """Validation loss and Dice (counts summed over the split, or over its
    ``train.val_max_samples`` evenly spaced samples, divided once)."""
    loss_sum, n, counts = 0.0, 0.0, 0.0
    for batch in loader.padded_batches(samples.images, samples.labels,
                                       config.eval.batch_size, jax.process_index(),
                                       jax.process_count(), samples.annotated,
                                       _val_indices(samples, config)):
        out = eval_fn(state, sharding.to_global(batch, mesh))
        loss_sum, n, counts = loss_sum + out["loss_sum"], n + out["n"], counts + out["counts"]
    loss_sum, n, counts = jax.device_get((loss_sum, n, counts))
    counts = np.asarray(counts)
    dice = metrics.dice_from_counts(counts[0], counts[1], counts[2])[1:]
    present = dice[np.isfinite(dice)]  # a class absent from the whole split is skipped
    return {"val_loss": float(loss_sum) / max(float(n), 1.0),
            "val_dice": float(present.mean()) if present.size else 0.0,
            "val_dice_per_class": [float(d) for d in dice]}


def _transfer_guard(level: str):
    """``jax.transfer_guard(level)``, or nothing for ""."""
    return jax.transfer_guard(level) if level else contextlib.nullcontext()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Preempted(Exception):
    """SIGTERM arrived: the run saved a checkpoint of its last step and stopped."""


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
    if not config.train.get("budget_minutes", 0) or not os.path.exists(path):
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
    dataset, _, samples = cache.prepare(config, workdir)
    pairs = laterality.parse_pairs(config.data.get("lateral_pairs", "auto"), dataset.labels)
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
    if config.train.get("budget_minutes", 0):
        config = _fit_budget(config, workdir, mesh, dataset, train_samples, val_samples,
                             steps_per_epoch, swap)
    total_steps = steps_per_epoch * config.train.num_epochs
    n_val = _val_indices(val_samples, config)
    logging.info("Data: %d train / %d val / %d test cases; %d train %s and %d val samples "
                 "(%s validated per epoch) of shape %s x %d channel(s); %d classes %s",
                 *(len(dataset.splits[s]) for s in dataset_lib.SPLITS), len(train_samples),
                 "volumes" if isinstance(train_samples, cache.Volumes) else "samples",
                 len(val_samples), "all" if n_val is None else len(n_val),
                 tuple(config.data.image_size), dataset.num_channels,
                 dataset.num_classes, dataset.labels)

    model = state_lib.build_model(config, dataset.num_classes)
    input_shape = (batch, *config.data.image_size, dataset.num_channels)
    state = state_lib.init_state(config, model, input_shape, total_steps, mesh)
    logging.info("Model %s (%dD, base %d, depth %d): %s parameters", config.model.name,
                 config.model.spatial_dims, config.model.base_features, config.model.depth,
                 f"{count_params(state.params):,}")

    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), config.train.checkpoint_max_to_keep,
        keep_every_seconds=60 * float(config.train.get("keep_every_minutes", 0.0)))
    meta = {"epoch": -1, "best_val_loss": float("inf"), "bad_epochs": 0,
            "best_val_dice": -1.0, "best_epoch": -1, "stopped": False}
    progress = None
    # The newest checkpoint that verifies; damaged ones are moved aside with a warning.
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state,
                                                                  sharding.replicated(mesh)))
    latest = restored[0] if restored else None
    # Once the data are read and the checkpoint restored: a failed start changes nothing.
    workdir_lib.write_config(config, workdir, latest or 0)
    planning.write(plan, workdir)
    if latest is not None:
        _, state, meta = restored
        progress = meta.pop("epoch_progress", None)
        logging.info("Resumed from the checkpoint of step %d (epoch %d, %d of %d steps done)",
                     latest, meta["epoch"] + 2 if progress else meta["epoch"] + 1,
                     progress["steps"] if progress else steps_per_epoch, steps_per_epoch)
    elif config.train.init_from:
        state, _ = transfer.load_pretrained(state, config.train.init_from, mesh)
    log = writers.create(workdir, int(state.step),
                         [n for v, n in sorted(dataset.labels.items()) if v != 0],
                         tensorboard=config.train.tensorboard)

    freeze_steps = (config.train.freeze_encoder_epochs * steps_per_epoch
                    if config.train.init_from else 0)
    train_fn, eval_fn = jit_steps(config, mesh, dataset.num_classes, freeze_steps, swap)
    start_epoch = meta["epoch"] + 1
    if meta["stopped"] or start_epoch >= config.train.num_epochs:
        logging.info("Training already finished (epoch %d, stopped early: %s)",
                     meta["epoch"] + 1, meta["stopped"])
        checkpointer.close()
        log.close()
        return (meta, state) if return_state else meta

    t_run, stop = time.time(), threading.Event()
    with _sigterm_sets(stop):
        try:
            loop = _Loop(config, checkpointer, log, train_fn, eval_fn, mesh, train_samples,
                         val_samples, steps_per_epoch, stop, *_overlay_setup(config, mesh,
                                                                             val_samples))
            state = loop.run(state, meta, start_epoch, progress)
        except FloatingPointError as e:  # the next resume may lower the rate or clip
            workdir_lib.record_divergence(workdir, getattr(e, "step", -1))
            raise
        finally:  # also on Ctrl-C or SIGTERM: let a pending checkpoint save finish
            checkpointer.close()
            log.close()
    logging.info("Training finished in %s", _fmt_seconds(time.time() - t_run))
    return (meta, state) if return_state else meta


def _overlay_setup(config, mesh, val_samples) -> tuple[int | None, Any]:
    """(index of the validation sample with the most foreground, a prediction function)
    for the per-epoch overlay image in TensorBoard; (None, None) when off."""
    if not config.train.tensorboard or not len(val_samples):
        return None, None
    labels = val_samples.labels
    counts = [int(np.count_nonzero(labels[i])) for i in range(len(labels))]
    return int(np.argmax(counts)), state_lib.make_predict_fn(config, mesh, tta=False)


_BUDGET_WARMUP, _BUDGET_STEPS = 2, 8  # untimed (on a Zen 5 25-45% slower), then timed steps


def _fit_budget(config, workdir: str, mesh, dataset, train_samples, val_samples,
                steps_per_epoch: int, swap: tuple[int, ...] | None = None):
    """``config`` with ``train.num_epochs`` set so that training fits
    ``train.budget_minutes``: the run's earlier value when it resumes, else measured on a
    throw-away state (a few steps after compilation, and a few validation batches)."""
    budget = float(config.train.budget_minutes)
    path = os.path.join(workdir, "config.json")
    out = ml_collections.ConfigDict(config.to_dict())
    if os.path.exists(path):
        previous = fileio.read_json(path, "the run's config").get("train", {})
        if previous.get("budget_minutes") == budget and previous.get("num_epochs"):
            out.train.num_epochs = int(previous["num_epochs"])
            return out
    t0 = time.time()
    num_classes, batch = dataset.num_classes, config.train.batch_size
    model = state_lib.build_model(config, num_classes)
    shape = (batch, *config.data.image_size, dataset.num_channels)
    state = state_lib.init_state(config, model, shape, steps_per_epoch, mesh)
    train_fn, eval_fn = jit_steps(config, mesh, num_classes, swap=swap)
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
        for i, b in enumerate(host):
            if i == _BUDGET_WARMUP:
                jax.block_until_ready(out_)
                t_step = time.time()
            state, out_ = train_fn(state, sharding.to_global(b, mesh))
        jax.block_until_ready(out_)
        step_s = (time.time() - t_step) / _BUDGET_STEPS
    finally:
        host.close()
    val = list(loader.padded_batches(val_samples.images, val_samples.labels,
                                     config.eval.batch_size, jax.process_index(),
                                     jax.process_count(), val_samples.annotated,
                                     _val_indices(val_samples, config)))
    jax.block_until_ready(eval_fn(state, sharding.to_global(val[0], mesh)))  # compiles
    t_val = time.time()
    timed = val[1:4] or val[:1]
    for b in timed:
        jax.block_until_ready(eval_fn(state, sharding.to_global(b, mesh)))
    val_s = (time.time() - t_val) / len(timed) * len(val)
    epoch_s = steps_per_epoch * step_s + val_s + 1.0  # + the checkpoint save
    left = budget * 60 - (time.time() - t0) - 2 * compile_s  # the real run compiles too
    out.train.num_epochs = max(1, min(1000, int(left // epoch_s)))
    logging.info("Time budget %.1f min: %.2f s per step, %.1f s per validation, %.1f s per "
                 "epoch of %d steps -> %d epochs (measured in %.1f s)", budget, step_s, val_s,
                 epoch_s, steps_per_epoch, out.train.num_epochs, time.time() - t0)
    return out


def _first_bad(pending) -> tuple[int, float, float] | None:
    """(step, loss, grad norm) of the first step in ``pending`` that is not finite."""
    fetched = jax.device_get([out for _, out in pending])  # one explicit host round trip
    for (step, _), out in zip(pending, fetched):
        loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            return step, loss, grad_norm
    return None


@dataclasses.dataclass
class _Loop:
    """The epoch loop: steps, finiteness checks, validation, checkpoints, SIGTERM."""

    config: Any
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

    def overlay(self, state) -> np.ndarray:
        """The validation sample ``overlay_index`` with its reference (green) and predicted
        (red) outlines; for 3D samples, the axial slice with the most foreground."""
        i = self.overlay_index
        image = np.asarray(self.val_samples.images[i:i + 1])
        label = np.asarray(self.val_samples.labels[i])
        probs = inference.predict_batches(self.predict_fn, state, image,
                                          self.config.eval.batch_size, self.mesh)
        centre = preprocess.centre_channel(image.shape[-1], self.config)  # not a neighbour's
        pred, image = np.argmax(probs[0], axis=-1), image[0, ..., centre]
        if label.ndim == 3:
            k = int(np.argmax((label > 0).sum(axis=(0, 1))))
            image, label, pred = image[..., k], label[..., k], pred[..., k]
        return report.overlay(image, label, pred, scale=max(1, 256 // max(label.shape)))

    def run(self, state, meta: dict, start_epoch: int, progress: dict | None):
        """Trains epochs from ``start_epoch`` (``progress``: steps already done in it);
        updates ``meta`` in place and returns the final state."""
        self.images_seen, self.time_in_steps, self.first = 0, 0.0, True
        config = self.config
        first = start_epoch * self.steps_per_epoch + (progress["steps"] if progress else 0)
        # One input pipeline for the whole run (grain workers start once), consumed epoch
        # by epoch; prefetching runs on into the next epoch.
        host = loader.run_batches(self.train_samples, config, self.steps_per_epoch, first)
        batches = sharding.prefetch_to_device(host, self.mesh, config.train.prefetch)
        try:
            for epoch in range(start_epoch, config.train.num_epochs):
                done = progress["steps"] if progress else 0
                losses = [np.float32(x) for x in progress["losses"]] if progress else []
                progress = None
                t_epoch = time.time()
                state, train_loss = self.train_epoch(state, meta, epoch, done, losses, batches)
                self.end_epoch(state, meta, epoch, train_loss, t_epoch)
                if self.stop.is_set():
                    self.preempted(int(state.step), epoch, self.steps_per_epoch)
                if meta["stopped"]:
                    logging.info("Early stopping: validation loss has not improved for %d "
                                 "epochs", config.train.patience)
                    break
        finally:
            batches.close()
            host.close()  # stops grain's worker processes
        return state

    def train_epoch(self, state, meta, epoch: int, done: int, losses: list, batches):
        """The steps of one epoch from step ``done`` on, taken from the run's ``batches``;
        returns (state, mean loss)."""
        config = self.config
        with _transfer_guard(config.train.transfer_guard):  # no hidden host round trip
            state = self._steps(state, meta, epoch, done, losses, batches)
        return state, float(np.mean(jax.device_get(losses)))

    def _steps(self, state, meta, epoch: int, done: int, losses: list, batches):
        config, batch = self.config, self.config.train.batch_size
        total_steps = self.steps_per_epoch * config.train.num_epochs
        t_window, window_images, pending = time.time(), 0, []
        for i in range(done, self.steps_per_epoch):
            if self.stop.is_set() and i > done:  # SIGTERM: save what is done, then stop
                self.save_progress(state, meta, epoch, i, losses, pending)
            device_batch = next(batches)
            t0 = time.time()
            state, out = self.train_fn(state, device_batch)
            step = int(epoch * self.steps_per_epoch + i + 1)
            pending.append((step, out))
            losses.append(out["loss"])
            window_images += batch
            if self.first:
                self.first = False
                loss0 = float(jax.device_get(out["loss"]))  # waits: includes the compile
                logging.info("First step (compilation included) took %.1f s, loss %.4f",
                             time.time() - t0, loss0)
                t_window, window_images = time.time(), 0
                if i + 1 < self.steps_per_epoch:
                    continue
            if step % config.train.log_every_steps and i + 1 < self.steps_per_epoch:
                continue
            self.check_finite(pending)
            pending = []
            self.checkpointer.check()  # a save that failed (disk full) stops the run now
            if not window_images:
                continue
            fetched = jax.device_get(out)
            loss = float(fetched["loss"])
            dt = time.time() - t_window
            ips = window_images / dt if dt > 0 else float("nan")
            self.images_seen += window_images
            self.time_in_steps += dt
            avg_ips = self.images_seen / self.time_in_steps if self.time_in_steps else ips
            left = (total_steps - step) * batch / avg_ips if avg_ips > 0 else 0.0
            logging.info("epoch %d/%d step %d/%d loss %.4f | %.1f images/s | ~%s left "
                         "(training steps only)", epoch + 1, config.train.num_epochs,
                         step, total_steps, loss, ips, _fmt_seconds(left))
            self.log.write_scalars(step, dict(loss=loss, grad_norm=float(fetched["grad_norm"]),
                                              images_per_second=ips),
                                   section="train", epoch=epoch + 1)
            t_window, window_images = time.time(), 0
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

    def save_progress(self, state, meta, epoch: int, steps_done: int, losses, pending):
        """SIGTERM mid-epoch: checkpoints the steps done (never best), then Preempted."""
        self.check_finite(pending)
        step = int(jax.device_get(state.step))
        progress = {"steps": steps_done, "losses": [float(x) for x in jax.device_get(losses)]}
        self.checkpointer.save(step, state, dict(meta, epoch_progress=progress), None)
        self.preempted(step, epoch, steps_done)

    def preempted(self, step: int, epoch: int, steps_done: int):
        self.checkpointer.wait()
        raise Preempted(
            f"SIGTERM: saved the checkpoint of step {step} (epoch {epoch + 1}, {steps_done} "
            f"of {self.steps_per_epoch} steps) in {self.checkpointer.directory}; run the "
            "same command to resume")

    def end_epoch(self, state, meta: dict, epoch: int, train_loss: float, t_epoch: float):
        """Validation, early-stopping bookkeeping, the epoch's log row and checkpoint."""
        config = self.config
        t_val = time.time()
        val = validate(self.eval_fn, state, self.val_samples, config, self.mesh)
        step = int(state.step)
        improved = val["val_loss"] < meta["best_val_loss"] - config.train.min_delta
        meta["bad_epochs"] = 0 if improved else meta["bad_epochs"] + 1
        meta["best_val_loss"] = min(meta["best_val_loss"], val["val_loss"])
        if val["val_dice"] > meta["best_val_dice"]:
            meta["best_val_dice"], meta["best_epoch"] = val["val_dice"], epoch + 1
        meta["epoch"] = epoch
        patience = config.train.patience
        meta["stopped"] = bool(patience and meta["bad_epochs"] >= patience)
        epoch_time = time.time() - t_epoch
        # The row goes first: a run killed before the checkpoint is complete resumes
        # from the previous one and drops this row (its step is past the checkpoint).
        self.log.write_scalars(step, dict(
            train_loss=train_loss, val_loss=val["val_loss"], val_dice=val["val_dice"],
            val_dice_per_class=val["val_dice_per_class"],
            images_per_second=self.steps_per_epoch * config.train.batch_size
            / max(t_val - t_epoch, 1e-9),
            epoch_seconds=epoch_time), section="epoch", epoch=epoch + 1)
        if self.overlay_index is not None:
            self.log.write_images(step, {"epoch/val_overlay": self.overlay(state)})
        self.checkpointer.save(step, state,
                               dict(meta, **{k: val[k] for k in ("val_loss", "val_dice")}),
                               {"val_dice": val["val_dice"], "val_loss": val["val_loss"]})
        logging.info("epoch %d/%d done in %.1f s: train loss %.4f, val loss %.4f, val Dice "
                     "%.4f (best %.4f at epoch %d)%s", epoch + 1, config.train.num_epochs,
                     epoch_time, train_loss, val["val_loss"], val["val_dice"],
                     meta["best_val_dice"], meta["best_epoch"],
                     "" if improved else f", no val-loss improvement for {meta['bad_epochs']}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming if possible), then evaluates the best checkpoint."""
    config_lib.check_numbers(config)  # before the workdir is touched
    with workdir_lib.run_lock(workdir):
        postprocess.require_choice(config.eval.get("postprocess", ""), workdir,
                                   config.eval.get("sw_window", "patch"))  # before the plan
        train(config, workdir)
        return evaluate.evaluate(config, workdir)
