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
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
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
from medseg_jax import losses, metrics, sharding
from medseg_jax.data import augment, pipeline
from medseg_jax.models import count_params, create_model


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def setup_compilation_cache(config) -> None:
    path = config.train.compilation_cache_dir
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_model(config, num_classes: int):
    return create_model(
        config.model.name, num_classes=num_classes, spatial_dims=config.model.spatial_dims,
        base_features=config.model.base_features, depth=config.model.depth,
        norm=config.model.norm, dtype=jnp.dtype(config.model.dtype),
        remat=config.model.remat)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    t = config.train
    if t.lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(t.learning_rate, max(1, total_steps))
    else:
        lr = t.learning_rate
    opt = optax.adamw(lr, weight_decay=t.weight_decay) if t.weight_decay > 0 else optax.adam(lr)
    if t.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
    return opt


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


def train_step(state: TrainState, batch: dict, *, config, num_classes: int):
    """One Adam step on a global batch: on-device augmentation, Dice + CE."""
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


def jit_steps(config, mesh, num_classes: int):
    repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    train = jax.jit(
        functools.partial(train_step, config=config, num_classes=num_classes),
        in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
    evaluate = jax.jit(
        functools.partial(eval_step, config=config, num_classes=num_classes),
        in_shardings=(repl, data), out_shardings=repl)
    predict = jax.jit(predict_step, in_shardings=(repl, data), out_shardings=data)
    return train, evaluate, predict


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
    dice = metrics.dice_from_counts(counts[0], counts[1], counts[2])
    return {"val_loss": float(loss_sum) / max(float(n), 1.0),
            "val_dice": float(np.mean(dice[1:])),
            "val_dice_per_class": [float(d) for d in dice[1:]]}


def write_config(config, workdir: str) -> None:
    """Writes config.json; refuses to resume a workdir made with another model/data."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        differ = [f"{section}.{k}: {previous.get(section, {}).get(k)!r} -> {v!r}"
                  for section in ("model", "data")
                  for k, v in current[section].items()
                  if k not in ("num_workers", "cache_dir")
                  and previous.get(section, {}).get(k) != v]
        if differ:
            raise ValueError(
                f"{workdir} holds a run with a different config ({'; '.join(differ)}); "
                "use another --workdir or the same settings")
    current["versions"] = {"jax": jax.__version__, "medseg_jax": _version(),
                           "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    if jax.process_index() == 0:
        pipeline.write_json_atomic(path, current)


def _version() -> str:
    from medseg_jax import __version__  # noqa: PLC0415
    return __version__


class MetricsLog:
    """metrics.jsonl, truncated on resume to what the restored checkpoint has seen."""

    def __init__(self, workdir: str, restored_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= restored_step]
            if len(kept) != len(rows):
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(kept)
                os.replace(tmp, self.path)

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def _transfer_guard(level: str):
    """``jax.transfer_guard(level)``, or nothing for ""."""
    return jax.transfer_guard(level) if level else contextlib.nullcontext()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(config: ml_collections.ConfigDict, workdir: str, *, return_state: bool = False):
    """Trains (or resumes); returns the final early-stopping/meta record (and, with
    ``return_state``, the final TrainState as ``(meta, state)``)."""
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    write_config(config, workdir)

    dataset, _, samples = pipeline.prepare(config, workdir)
    train_samples, val_samples = samples["train"], samples["val"]
    batch = config.train.batch_size
    if isinstance(train_samples, pipeline.Volumes):  # 3D: patches covering the data once
        n_train = train_samples.patches_per_pass(tuple(config.data.image_size))
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
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(
            latest, ckpt_lib.abstract_like(state, sharding.replicated(mesh)))
        logging.info("Resumed from the checkpoint of step %d (after epoch %d)", latest,
                     meta["epoch"] + 1)
    log = MetricsLog(workdir, int(state.step))

    train_fn, eval_fn, _ = jit_steps(config, mesh, dataset.num_classes)
    start_epoch = meta["epoch"] + 1
    if meta["stopped"] or start_epoch >= config.train.num_epochs:
        logging.info("Training already finished (epoch %d, stopped early: %s)",
                     meta["epoch"] + 1, meta["stopped"])
        checkpointer.close()
        return (meta, state) if return_state else meta

    t_run = time.time()
    try:
        state = _train_epochs(config, state, meta, checkpointer, log, train_fn, eval_fn, mesh,
                      train_samples, val_samples, start_epoch, steps_per_epoch)
    finally:  # also on Ctrl-C: let a pending checkpoint save finish
        checkpointer.close()
    logging.info("Training finished in %s", _fmt_seconds(time.time() - t_run))
    return (meta, state) if return_state else meta


def _train_epochs(config, state, meta, checkpointer, log, train_fn, eval_fn, mesh,
                  train_samples, val_samples, start_epoch, steps_per_epoch):
    """The epoch loop; updates ``meta`` in place, checkpoints every epoch, returns the
    final state."""
    batch = config.train.batch_size
    total_steps = steps_per_epoch * config.train.num_epochs
    images_seen, time_in_steps, first = 0, 0.0, True
    for epoch in range(start_epoch, config.train.num_epochs):
        batches = sharding.prefetch_to_device(
            pipeline.epoch_batches(train_samples, config, epoch, steps_per_epoch), mesh,
            config.train.prefetch)
        t_epoch = t_window = time.time()
        window_images, losses_epoch = 0, []
        with _transfer_guard(config.train.transfer_guard):
            for i, device_batch in enumerate(batches):
                t0 = time.time()
                state, out = train_fn(state, device_batch)
                losses_epoch.append(out["loss"])  # stays on the device until the epoch ends
                window_images += batch
                step = epoch * steps_per_epoch + i + 1
                if first:
                    first = False
                    loss0 = float(jax.device_get(out["loss"]))  # waits: includes the compile
                    logging.info("First step (compilation included) took %.1f s, loss %.4f",
                                 time.time() - t0, loss0)
                    t_window, window_images = time.time(), 0
                    continue
                if step % config.train.log_every_steps == 0 or i + 1 == steps_per_epoch:
                    fetched = jax.device_get(out)  # the only host round trip of the loop
                    loss = float(fetched["loss"])
                    if not np.isfinite(loss):
                        raise FloatingPointError(
                            f"loss is {loss} at step {step}; the last good checkpoint is kept "
                            f"in {checkpointer.directory}. Lower config.train.learning_rate or "
                            "set config.train.grad_clip_norm")
                    dt = time.time() - t_window
                    ips = window_images / dt if dt > 0 else float("nan")
                    images_seen += window_images
                    time_in_steps += dt
                    avg_ips = images_seen / time_in_steps if time_in_steps else ips
                    left = (total_steps - step) * batch / avg_ips if avg_ips > 0 else 0.0
                    logging.info("epoch %d/%d step %d/%d loss %.4f | %.1f images/s | ~%s left "
                                 "(training steps only)", epoch + 1, config.train.num_epochs,
                                 step, total_steps, loss, ips, _fmt_seconds(left))
                    log.write(step=step, epoch=epoch + 1, loss=loss,
                              grad_norm=float(fetched["grad_norm"]), images_per_second=ips)
                    t_window, window_images = time.time(), 0

        train_loss = float(np.mean(jax.device_get(losses_epoch)))
        t_val = time.time()
        val = validate(eval_fn, state, val_samples, config, mesh)
        step = int(state.step)
        improved = val["val_loss"] < meta["best_val_loss"] - config.train.min_delta
        meta["bad_epochs"] = 0 if improved else meta["bad_epochs"] + 1
        meta["best_val_loss"] = min(meta["best_val_loss"], val["val_loss"])
        if val["val_dice"] > meta["best_val_dice"]:
            meta["best_val_dice"], meta["best_epoch"] = val["val_dice"], epoch + 1
        meta["epoch"] = epoch
        patience = config.train.patience
        meta["stopped"] = bool(patience and meta["bad_epochs"] >= patience)
        checkpointer.save(step, state, dict(meta, **{k: val[k] for k in ("val_loss", "val_dice")}),
                          {"val_dice": val["val_dice"], "val_loss": val["val_loss"]})
        epoch_time = time.time() - t_epoch
        log.write(step=step, epoch=epoch + 1, train_loss=train_loss,
                  val_loss=val["val_loss"], val_dice=val["val_dice"],
                  val_dice_per_class=val["val_dice_per_class"],
                  images_per_second=steps_per_epoch * batch / (t_val - t_epoch),
                  epoch_seconds=epoch_time)
        logging.info("epoch %d/%d done in %.1f s: train loss %.4f, val loss %.4f, val Dice "
                     "%.4f (best %.4f at epoch %d)%s", epoch + 1, config.train.num_epochs,
                     epoch_time, train_loss, val["val_loss"], val["val_dice"],
                     meta["best_val_dice"], meta["best_epoch"],
                     "" if improved else f", no val-loss improvement for {meta['bad_epochs']}")
        if meta["stopped"]:
            logging.info("Early stopping: validation loss has not improved for %d epochs",
                         patience)
            break
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming if possible), then evaluates the best checkpoint."""
    from medseg_jax import evaluate  # noqa: PLC0415

    train(config, workdir)
    return evaluate.evaluate(config, workdir)
