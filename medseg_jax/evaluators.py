"""The evaluators run at epoch ends, declared by ``train.evals`` (after big_vision's
``config.evals``): each one's ``run(state)`` returns ``(scalars, images)`` that the loop
writes in the epoch's row and to TensorBoard.

- ``dice``: validation loss and Dice (``validate``); early stopping reads its
  ``val_loss``, the best checkpoint ``train.best_metric`` (one of ``METRICS``);
- ``dice_raw``: the same of the raw weights (``val_loss_raw``, ``val_dice_raw``), beside
  their average (``train.ema_decay``), which the others score (``state.for_eval``);
- ``overlay``: one validation sample with its reference (green) and predicted (red)
  outlines (``epoch/val_overlay``; only with ``train.tensorboard``);
- ``case_dice``: Dice per validation case (``val_case_dice``), each case predicted whole
  as ``--mode=eval`` predicts it, on the grid training sees (``CaseDice``).

The best-checkpoint score (``train.best_metric`` smoothed by ``train.best_ema``) is kept
by ``update_best`` in the checkpoint's meta, so a resumed run continues it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from medseg_jax import config as config_lib
from medseg_jax import inference, metrics, report, sharding
from medseg_jax import state as state_lib
from medseg_jax.data import cache, loader, preprocess

# train.best_metric: which way is best
METRICS = {"val_dice": "max", "val_loss": "min", "val_case_dice": "max"}


def val_indices(samples: cache.Samples, config) -> np.ndarray | None:
    return loader.evenly_spaced(len(samples), config.train.val_max_samples)


def validate(eval_fn, state, samples: cache.Samples, config, mesh) -> dict:
    """Validation loss and Dice (counts summed over the split, or over its
    ``train.val_max_samples`` evenly spaced samples, divided once)."""
    loss_sum, n, counts = 0.0, 0.0, 0.0
    for batch in loader.padded_batches(samples.images, samples.labels,
                                       config.eval.batch_size, jax.process_index(),
                                       jax.process_count(), samples.annotated,
                                       val_indices(samples, config)):
        out = eval_fn(state, sharding.to_global(batch, mesh))
        loss_sum, n, counts = loss_sum + out["loss_sum"], n + out["n"], counts + out["counts"]
    loss_sum, n, counts = jax.device_get((loss_sum, n, counts))
    counts = np.asarray(counts)
    dice = metrics.dice_from_counts(counts[0], counts[1], counts[2])[1:]
    present = dice[np.isfinite(dice)]  # a class absent from the whole split is skipped
    return {"val_loss": float(loss_sum) / max(float(n), 1.0),
            "val_dice": float(present.mean()) if present.size else 0.0,
            "val_dice_per_class": [float(d) for d in dice]}


class ValDice:
    """``val_loss``, ``val_dice`` and ``val_dice_per_class`` of the validation split (of
    the averaged weights with ``train.ema_decay``)."""

    def __init__(self, config, eval_fn, samples, mesh):
        self.config, self.eval_fn, self.samples, self.mesh = config, eval_fn, samples, mesh

    def run(self, state) -> tuple[dict, dict]:
        return validate(self.eval_fn, state_lib.for_eval(state), self.samples, self.config,
                        self.mesh), {}


class ValDiceRaw(ValDice):
    """``val_loss_raw`` and ``val_dice_raw``: those of the raw (not averaged) weights."""

    def run(self, state) -> tuple[dict, dict]:
        val = validate(self.eval_fn, state, self.samples, self.config, self.mesh)
        return {"val_loss_raw": val["val_loss"], "val_dice_raw": val["val_dice"]}, {}


class Overlay:
    """The validation sample ``index`` with its reference (green) and predicted (red)
    outlines; for 3D samples, the axial slice with the most foreground."""

    def __init__(self, config, predict_fn, samples, mesh, index: int):
        self.config, self.predict_fn, self.samples = config, predict_fn, samples
        self.mesh, self.index = mesh, index

    def run(self, state) -> tuple[dict, dict]:
        i = self.index
        image = np.asarray(self.samples.images[i:i + 1])
        label = np.asarray(self.samples.labels[i])
        probs = inference.predict_batches(self.predict_fn, state_lib.for_eval(state), image,
                                          self.config.eval.batch_size, self.mesh)
        centre = preprocess.centre_channel(image.shape[-1], self.config)  # not a neighbour's
        pred, image = np.argmax(probs[0], axis=-1), image[0, ..., centre]
        if label.ndim == 3:
            k = int(np.argmax((label > 0).sum(axis=(0, 1))))
            image, label, pred = image[..., k], label[..., k], pred[..., k]
        return {}, {"epoch/val_overlay": report.overlay(
            image, label, pred, scale=max(1, 256 // max(label.shape)))}


@dataclasses.dataclass
class Cases:
    """What ``case_dice`` reads: the data set, the run's preprocessing plan and a
    prediction function (flips averaged with ``eval.tta``, as evaluation's)."""

    dataset: Any
    plans: dict
    predict_fn: Any


class CaseDice:
    """``val_case_dice`` and ``val_case_dice_per_class``: each validation case (or
    ``train.val_max_cases`` evenly spaced ones) predicted whole as ``--mode=eval`` predicts
    it (``inference.network_probs``: ``eval.sw_window``, ``eval.sw_overlap``,
    ``eval.tta``), on the grid training sees (no resampling back, no post-processing).
    The Dice of each case and class (undefined where both masks are empty; a class not
    annotated in a case is left out); per class their mean over the cases, and
    ``val_case_dice`` the mean over the classes that have one. With ``train.ema_decay``,
    of the averaged weights."""

    def __init__(self, config, cases: Cases, mesh):
        self.config, self.cases, self.mesh = config, cases, mesh
        keys = list(cases.dataset.splits["val"])
        chosen = loader.evenly_spaced(len(keys), int(config.train.val_max_cases))
        self.keys = keys if chosen is None else [keys[i] for i in chosen]

    def run(self, state) -> tuple[dict, dict]:
        dataset, plans = self.cases.dataset, self.cases.plans
        averaged = state_lib.for_eval(state)  # the weights' average with train.ema_decay
        labels = sorted(v for v in dataset.labels if v != 0)
        values: dict[int, list[float]] = {v: [] for v in labels}
        for key in self.keys:
            ref, info = dataset.refs[key]
            preprocess.check_case_memory(ref, info, self.config, plans.get("target_spacing"),
                                         dataset.num_classes)
            probs, label, _ = inference.network_probs(dataset.load(key), plans, self.config,
                                                      averaged, self.cases.predict_fn,
                                                      self.mesh)
            pred = np.argmax(probs, axis=-1)
            for v in labels:
                if ref.annotated is None or v in ref.annotated:
                    values[v].append(metrics.dice(pred == v, label == v))
        per_class = []
        for v in labels:
            finite = [d for d in values[v] if np.isfinite(d)]
            per_class.append(float(np.mean(finite)) if finite else float("nan"))
        present = [d for d in per_class if np.isfinite(d)]
        return {"val_case_dice": float(np.mean(present)) if present else 0.0,
                "val_case_dice_per_class": per_class}, {}


def create(config, eval_fn, predict_fn, samples, mesh, overlay_index: int | None,
           cases: Cases | None = None) -> list:
    """The evaluators of ``train.evals``; ``overlay`` only where ``overlay_index`` is set
    (TensorBoard on, a validation sample to draw); ``case_dice`` reads ``cases``."""
    out = []
    for name in config_lib.evaluator_names(config.train.evals):
        if name == "dice":
            out.append(ValDice(config, eval_fn, samples, mesh))
        elif name == "dice_raw":
            out.append(ValDiceRaw(config, eval_fn, samples, mesh))
        elif name == "overlay" and overlay_index is not None:
            out.append(Overlay(config, predict_fn, samples, mesh, overlay_index))
        elif name == "case_dice":
            out.append(CaseDice(config, cases, mesh))
    return out


def update_best(meta: dict, value: float, epoch: int, metric: str, ema: float) -> bool:
    """Updates ``meta`` with this epoch's ``value`` of ``metric``: ``best_metric_ema``
    (the value itself when ``ema`` is 0 or at the first epoch, else the exponential
    moving average ``previous * ema + value * (1 - ema)``), and, when that beats
    ``best_score`` (higher is better: the negated value for a loss), ``best_score``,
    ``best_metric_value`` and ``best_epoch`` (1-based). Returns whether it did.
    A change of ``metric`` on resume starts the average again (the best score so far
    stays that of the previous metric, as in the checkpoints' metrics)."""
    previous = meta.get("best_metric_ema")
    if ema and previous is not None and meta.get("best_metric") == metric:
        smoothed = float(previous) * ema + float(value) * (1.0 - ema)
    else:
        smoothed = float(value)
    meta["best_metric"], meta["best_metric_ema"] = metric, smoothed
    score = smoothed if METRICS[metric] == "max" else -smoothed
    if score > meta["best_score"]:
        meta["best_score"], meta["best_metric_value"] = score, smoothed
        meta["best_epoch"] = epoch + 1
        return True
    return False

