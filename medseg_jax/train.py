"""Training: state, jitted steps over a device mesh, early stopping, checkpoints.

`train_and_evaluate(config, workdir)` trains (resuming from the latest
checkpoint in ``workdir`` if there is one), then evaluates the best checkpoint
on the test split. What it writes to ``workdir``:

- ``config.json``        the resolved config of the run
- ``splits.json``        the case split, reused by later runs and evaluation
- ``preprocess.json``    the intensity normalisation plan per task
- ``metrics.jsonl``      one JSON object per log step and per epoch
- ``checkpoints/``       Orbax checkpoints (latest and best by validation Dice)
- ``test_metrics.json`` / ``test_metrics.md``  per-case and aggregated test metrics
- ``.lock``              held while a run uses the workdir (a second run is refused)

Every step's loss and gradient norm are checked (at the log steps, without extra
device syncs): a non-finite one stops the run naming the step, before it is saved.
SIGTERM makes the run save a checkpoint of its last step (mid-epoch if need be)
and raise ``Preempted``; the next run resumes there with the same data order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
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
from flax.training import train_state

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import losses, metrics, report, sharding, transfer
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import augment, pipeline
from medseg_jax import models
from medseg_jax.models import count_params


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def setup_compilation_cache(config) -> None:
    path = config.train.compilation_cache_dir
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_model(config, num_classes: int):
    return models.from_config(config.model, num_classes)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    t = config.train
    if t.lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(t.learning_rate, max(1, total_steps))
    else:
        lr = t.learning_rate
    opt = optax.adamw(lr, weight_decay=t.weight_decay) if t.weight_decay > 0 else optax.adam(lr)
    # Always in the chain (a no-op at inf), so clipping can be switched on when
    # resuming a run that diverged: the optimizer state keeps its structure.
    max_norm = t.grad_clip_norm if t.grad_clip_norm > 0 else float("inf")
    return optax.chain(optax.clip_by_global_norm(max_norm), opt)


def create_state(config, model, input_shape, total_steps: int, rng) -> TrainState:
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=make_optimizer(config, total_steps))


def init_state(config, model, input_shape, total_steps: int, mesh) -> TrainState:
    """Initialises the state directly onto the mesh, replicated."""
    init = jax.jit(
        functools.partial(create_state, config, model, input_shape, total_steps),
        out_shardings=sharding.replicated(mesh))
    return init(jax.random.key(config.seed))


def abstract_state(config, model, input_shape, total_steps: int, mesh):
    shapes = jax.eval_shape(
        functools.partial(create_state, config, model, input_shape, total_steps),
        jax.random.key(config.seed))
    return ckpt_lib.abstract_like(shapes, sharding.replicated(mesh))


def _variables(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def train_step(state: TrainState, batch: dict, *, config, num_classes: int,
               freeze_steps: int = 0):
    """One Adam step on a global batch: on-device augmentation, Dice + CE.

    For the first ``freeze_steps`` steps the encoder stays fixed (transfer learning).
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    images, labels = augment.augment_batch(aug_rng, batch["image"], batch["label"],
                                           config.augment)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        loss = losses.dice_ce_loss(logits, labels, num_classes,
                                   dice_weight=config.train.dice_weight,
                                   ce_weight=config.train.ce_weight)
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


def eval_step(state: TrainState, batch: dict, *, config, num_classes: int):
    """Loss (weighted by real rows) and Dice counts of one padded batch."""
    logits = state.apply_fn(_variables(state), batch["image"], train=False)
    mask = batch["mask"]
    loss = losses.dice_ce_loss(logits, batch["label"], num_classes,
                               dice_weight=config.train.dice_weight,
                               ce_weight=config.train.ce_weight, mask=mask)
    counts = metrics.dice_counts(jnp.argmax(logits, -1), batch["label"], num_classes, mask=mask)
    return {"loss_sum": loss * mask.sum(), "n": mask.sum(), "counts": jnp.stack(counts)}


def predict_step(state: TrainState, images):
    logits = state.apply_fn(_variables(state), images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def jit_steps(config, mesh, num_classes: int, freeze_steps: int = 0):
    repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    train = jax.jit(
        functools.partial(train_step, config=config, num_classes=num_classes,
                          freeze_steps=freeze_steps),
        in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
    evaluate = jax.jit(
        functools.partial(eval_step, config=config, num_classes=num_classes),
        in_shardings=(repl, data), out_shardings=repl)
    return train, evaluate


def validate(eval_fn, state, samples: pipeline.Samples, config, mesh) -> dict:
    """Validation loss and Dice (counts summed over the whole split, divided once)."""
    loss_sum, n, counts = 0.0, 0.0, 0.0
    for batch in pipeline.padded_batches(samples.images, samples.labels,
                                         config.eval.batch_size, jax.process_index(),
                                         jax.process_count()):
        out = eval_fn(state, sharding.to_global(batch, mesh))
        loss_sum, n, counts = loss_sum + out["loss_sum"], n + out["n"], counts + out["counts"]
    loss_sum, n, counts = jax.device_get((loss_sum, n, counts))
    counts = np.asarray(counts)
    dice = metrics.dice_from_counts(counts[0], counts[1], counts[2])[1:]
    present = dice[np.isfinite(dice)]  # a class absent from the whole split is skipped
    return {"val_loss": float(loss_sum) / max(float(n), 1.0),
            "val_dice": float(present.mean()) if present.size else 0.0,
            "val_dice_per_class": [float(d) for d in dice]}


# Fields that may change between runs in one workdir (they change neither the
# model, the data nor the checkpoint's structure).
_FREE_FIELDS = ("data.num_workers", "data.cache_dir")
# What evaluation compares: what the network is and what it is fed.
EVAL_FIELDS = ("model", "data.image_size", "data.slice_axis", "data.rescale_01",
               "data.target_spacing", "data.in_plane")


def config_differences(previous: dict, current: dict,
                       fields=("model", "data")) -> list[str]:
    """``section.field: old -> new`` for each of ``fields`` (sections or section.field)
    that differs between two config.json contents."""
    differ = []
    defaults = _config_json(config_lib.default_config())
    for name in fields:
        section, _, only = name.partition(".")
        for k, v in current[section].items():
            if k not in previous.get(section, {}) and defaults.get(section, {}).get(k) == v:
                continue  # a field added since that run, at its default: same behaviour
            old = previous.get(section, {}).get(k)
            dotted = f"{section}.{k}"
            if (not only or k == only) and dotted not in _FREE_FIELDS and old != v:
                differ.append(f"{dotted}: {old!r} -> {v!r}")
    old = previous.get("train", {}).get("weight_decay", 0.0)
    new = current.get("train", {}).get("weight_decay", 0.0)
    if (old > 0) != (new > 0):  # Adam <-> AdamW: another optimizer state to restore
        differ.append(f"train.weight_decay: {old!r} -> {new!r} (switches Adam/AdamW)")
    return differ


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def check_workdir_config(config, workdir: str, fields=("model", "data")) -> None:
    """Raises ValueError naming each field in which ``config`` differs from the workdir's run."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the run's config: {e}") from e
    differ = config_differences(previous, _config_json(config), fields)
    if differ:
        raise ValueError(
            f"{workdir} holds a run with a different config ({'; '.join(differ)}); "
            "use another --workdir or the same settings")


def write_config(config, workdir: str) -> None:
    """Writes config.json (with versions); refuses a workdir made with another model/data."""
    check_workdir_config(config, workdir)
    current = _config_json(config)
    current["versions"] = versions()
    if jax.process_index() == 0:
        pipeline.write_json_atomic(os.path.join(workdir, "config.json"), current)


def versions() -> dict:
    """Python, the libraries that decide the numbers, and the devices."""
    import importlib.metadata  # noqa: PLC0415
    import platform  # noqa: PLC0415

    out = {"python": platform.python_version(), "medseg_jax": _version(),
           "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
                 "scipy", "nibabel"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _version() -> str:
    from medseg_jax import __version__  # noqa: PLC0415
    return __version__


class MetricsLog:
    """metrics.jsonl, truncated on resume to what the restored checkpoint has seen.

    A line cut short by a kill (or a full disk) is dropped then too.
    """

    def __init__(self, workdir: str, restored_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(self.path):
            with open(self.path) as f:
                rows = f.readlines()
            kept = [r for r in rows if _row_step(r) <= restored_step]
            if len(kept) != len(rows):
                pipeline.write_text_atomic(self.path, "".join(kept))

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank, cut or unreadable line."""
    row = report.metrics_row(line)
    return float("inf") if row is None else row.get("step", 0)


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
    config_lib.validate(config)
    setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    with workdir_lock(workdir):
        return _train(config, workdir, mesh, return_state)


def workdir_lock(workdir: str):
    """The workdir's lock (process 0 holds it for all hosts of the run)."""
    return workdir_lib.lock(workdir, enabled=jax.process_index() == 0)


def _train(config, workdir: str, mesh, return_state: bool = False):
    check_workdir_config(config, workdir)
    dataset, _, samples = pipeline.prepare(config, workdir)
    write_config(config, workdir)  # once the data are read: a failed start changes nothing
    train_samples, val_samples = samples["train"], samples["val"]
    batch = config.train.batch_size
    if isinstance(train_samples, pipeline.Volumes):  # patches covering the data once
        n_train = train_samples.patches_per_pass(tuple(config.data.image_size),
                                                 config.data.slice_axis)
    else:
        n_train = len(train_samples)
    steps_per_epoch = config.train.steps_per_epoch or max(1, n_train // batch)
    total_steps = steps_per_epoch * config.train.num_epochs
    logging.info("Data: %d train / %d val / %d test cases; %d train %s and %d val samples of "
                 "shape %s x %d channel(s); %d classes %s",
                 *(len(dataset.splits[s]) for s in pipeline.SPLITS), len(train_samples),
                 "volumes" if isinstance(train_samples, pipeline.Volumes) else "samples",
                 len(val_samples), tuple(config.data.image_size), dataset.num_channels,
                 dataset.num_classes, dataset.labels)

    model = build_model(config, dataset.num_classes)
    input_shape = (batch, *config.data.image_size, dataset.num_channels)
    state = init_state(config, model, input_shape, total_steps, mesh)
    logging.info("Model %s (%dD, base %d, depth %d): %s parameters", config.model.name,
                 config.model.spatial_dims, config.model.base_features, config.model.depth,
                 f"{count_params(state.params):,}")

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         config.train.checkpoint_max_to_keep)
    meta = {"epoch": -1, "best_val_loss": float("inf"), "bad_epochs": 0,
            "best_val_dice": -1.0, "best_epoch": -1, "stopped": False}
    progress = None
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(
            latest, ckpt_lib.abstract_like(state, sharding.replicated(mesh)))
        progress = meta.pop("epoch_progress", None)
        logging.info("Resumed from the checkpoint of step %d (epoch %d, %d of %d steps done)",
                     latest, meta["epoch"] + 2 if progress else meta["epoch"] + 1,
                     progress["steps"] if progress else steps_per_epoch, steps_per_epoch)
    elif config.train.init_from:
        state, _ = transfer.load_pretrained(state, config.train.init_from, mesh)
    log = MetricsLog(workdir, int(state.step))

    freeze_steps = (config.train.freeze_encoder_epochs * steps_per_epoch
                    if config.train.init_from else 0)
    train_fn, eval_fn = jit_steps(config, mesh, dataset.num_classes, freeze_steps)
    start_epoch = meta["epoch"] + 1
    if meta["stopped"] or start_epoch >= config.train.num_epochs:
        logging.info("Training already finished (epoch %d, stopped early: %s)",
                     meta["epoch"] + 1, meta["stopped"])
        checkpointer.close()
        return (meta, state) if return_state else meta

    t_run, stop = time.time(), threading.Event()
    with _sigterm_sets(stop):
        try:
            loop = _Loop(config, checkpointer, log, train_fn, eval_fn, mesh, train_samples,
                         val_samples, steps_per_epoch, stop)
            state = loop.run(state, meta, start_epoch, progress)
        finally:  # also on Ctrl-C or SIGTERM: let a pending checkpoint save finish
            checkpointer.close()
    logging.info("Training finished in %s", _fmt_seconds(time.time() - t_run))
    return (meta, state) if return_state else meta


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
    log: MetricsLog
    train_fn: Any
    eval_fn: Any
    mesh: Any
    train_samples: Any
    val_samples: Any
    steps_per_epoch: int
    stop: threading.Event

    def run(self, state, meta: dict, start_epoch: int, progress: dict | None):
        """Trains epochs from ``start_epoch`` (``progress``: steps already done in it);
        updates ``meta`` in place and returns the final state."""
        self.images_seen, self.time_in_steps, self.first = 0, 0.0, True
        config = self.config
        first = start_epoch * self.steps_per_epoch + (progress["steps"] if progress else 0)
        # One input pipeline for the whole run (grain workers start once), consumed epoch
        # by epoch; prefetching runs on into the next epoch.
        host = pipeline.run_batches(self.train_samples, config, self.steps_per_epoch, first)
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
            self.log.write(step=step, epoch=epoch + 1, loss=loss,
                           grad_norm=float(fetched["grad_norm"]), images_per_second=ips)
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
        raise FloatingPointError(
            f"training diverged: non-finite {'loss' if not np.isfinite(loss) else 'gradient'} "
            f"at step {step} (loss {loss}, gradient norm {grad_norm}); stopped without "
            f"saving it: {kept}. Lower config.train.learning_rate or set "
            "config.train.grad_clip_norm, then run the same command again")

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
        self.log.write(step=step, epoch=epoch + 1, train_loss=train_loss,
                       val_loss=val["val_loss"], val_dice=val["val_dice"],
                       val_dice_per_class=val["val_dice_per_class"],
                       images_per_second=self.steps_per_epoch * config.train.batch_size
                       / max(t_val - t_epoch, 1e-9),
                       epoch_seconds=epoch_time)
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
    from medseg_jax import evaluate  # noqa: PLC0415

    with workdir_lock(workdir):
        train(config, workdir)
        return evaluate.evaluate(config, workdir)
