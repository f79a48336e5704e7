"""Evaluation: restore a checkpoint, predict whole cases, per-case metrics in mm.

Each case of the split is read from its NIfTI files, normalised with the plan
of the training run (``preprocess.json``), cut into network samples (slices or
sliding-window patches), predicted (optionally with flip test-time
augmentation), and the class probabilities are resized back to the case's own
grid before the argmax. Metrics are computed per case on the whole volume with
the case's voxel spacing, so distances are in mm.

Writes to the workdir, for a split ``<split>``:
- ``<split>_metrics.json``   per case and aggregated (overall and per task)
- ``<split>_metrics.md``     the table that is also printed
- ``<split>_per_case.csv``   one row per case and class, every metric
- ``<split>_summary.csv``    mean, std, median, 95% bootstrap interval, n per metric
- ``figures/``               overlays of the best, median and worst case with an
                             uncertainty map (and attention maps for Attention
                             U-Net), and the training curves
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import inference, metrics, report, sharding, train
from medseg_jax.data import decathlon, pipeline, preprocess
from medseg_jax.models import attention_unet


def load_plans(workdir: str) -> dict:
    path = os.path.join(workdir, "preprocess.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} holds no training run")
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class Run:
    """A trained run restored for inference."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    plans: dict
    dataset: pipeline.Dataset
    model: object
    state: train.TrainState
    step: int
    epoch: int
    which: str
    predict_fn: object

    @property
    def labels(self) -> dict[int, str]:
        """Foreground label value -> class name."""
        return {v: n for v, n in self.dataset.labels.items() if v != 0}


def restore_run(config: ml_collections.ConfigDict, workdir: str,
                checkpoint: str | None = None) -> Run:
    """Restores the ``checkpoint`` (best, latest or a step) of the run in ``workdir``."""
    config_lib.validate(config)
    which = str(checkpoint or config.eval.checkpoint)
    train.setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    if not os.path.exists(os.path.join(workdir, "splits.json")):
        raise FileNotFoundError(f"{workdir}/splits.json not found: train in this workdir first")
    train.check_workdir_config(config, workdir, train.EVAL_FIELDS)
    plans = load_plans(workdir)
    dataset = pipeline.open_dataset(config, workdir)
    model = train.build_model(config, dataset.num_classes)
    input_shape = (config.train.batch_size, *config.data.image_size, dataset.num_channels)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = checkpointer.resolve(which)
    # The optimizer state is restored too: the schedule length does not change shapes.
    abstract = train.abstract_state(config, model, input_shape, 1, mesh)
    state, meta = checkpointer.restore(step, abstract)
    checkpointer.close()
    return Run(config, workdir, mesh, plans, dataset, model, state, step,
               meta.get("epoch", -1) + 1, which, inference.make_predict_fn(config, mesh))


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str | None = None,
             checkpoint: str | None = None) -> dict:
    """Evaluates a checkpoint of the run in ``workdir`` on a split; returns the results.

    Holds the workdir's lock: a training run using the workdir makes it refuse.
    """
    with train.workdir_lock(workdir):
        return _evaluate(config, workdir, split or config.eval.split, checkpoint)


def _evaluate(config, workdir: str, split: str, checkpoint: str | None) -> dict:
    run = restore_run(config, workdir, checkpoint)
    keys = run.dataset.splits[split]
    if not keys:
        raise ValueError(f"{workdir}/splits.json: split {split!r} has no cases")
    logging.info("Evaluating the %s checkpoint (step %d, epoch %d) on %d %s cases%s", run.which,
                 run.step, run.epoch, len(keys), split, " with flip TTA" if config.eval.tta else "")

    per_case, n_samples, t_predict, t_metrics = [], 0, 0.0, 0.0
    for key in keys:
        case = run.dataset.load(key)
        t0 = time.time()
        pred, n = inference.predict_case(case, run.plans, config, run.state, run.predict_fn,
                                         run.mesh)
        t1 = time.time()
        case_metrics = metrics.evaluate_case(pred, case.label, case.spacing, run.labels,
                                             config.eval.nsd_tolerance_mm)
        t_predict, t_metrics, n_samples = t_predict + t1 - t0, t_metrics + time.time() - t1, \
            n_samples + n
        per_case.append({"case": key, "task": case.task,
                         "spacing": [float(s) for s in case.spacing],
                         "metrics": case_metrics})

    def summarise(cases):
        return metrics.aggregate([c["metrics"] for c in cases], config.eval.bootstrap_samples,
                                 config.seed)

    groups = {"all": summarise(per_case)}
    tasks = sorted({c["task"] for c in per_case})
    if len(tasks) > 1:
        for task in tasks:
            groups[task] = summarise([c for c in per_case if c["task"] == task])
    title = (f"{config.model.name}: {split} split, {run.which} checkpoint (step {run.step}, "
             f"epoch {run.epoch}){', flip TTA' if config.eval.tta else ''}")
    table = report.metrics_table(groups, title, config.eval.nsd_tolerance_mm)
    results = {"model": config.model.name, "split": split, "checkpoint": run.which,
               "step": run.step, "epoch": run.epoch, "tta": bool(config.eval.tta),
               "nsd_tolerance_mm": float(config.eval.nsd_tolerance_mm),
               "params": train.count_params(run.state.params),
               "aggregate": groups, "per_case": per_case,
               "seconds": t_predict + t_metrics, "predict_seconds": t_predict,
               "metrics_seconds": t_metrics,
               "cases_per_second": len(keys) / max(t_predict, 1e-9),
               "network_inputs": n_samples}
    if jax.process_index() == 0:
        pipeline.write_json_atomic(os.path.join(workdir, f"{split}_metrics.json"), results)
        pipeline.write_text_atomic(os.path.join(workdir, f"{split}_metrics.md"), table)
        pipeline.write_text_atomic(os.path.join(workdir, f"{split}_per_case.csv"),
                                 report.per_case_csv(per_case, metrics.METRIC_NAMES))
        pipeline.write_text_atomic(os.path.join(workdir, f"{split}_summary.csv"),
                                 report.summary_csv(groups))
    print(table, flush=True)
    logging.info("Predicted %d cases in %.1f s (%.2f cases/s, %d network inputs), metrics in "
                 "%.1f s; wrote %s", len(keys), t_predict, results["cases_per_second"],
                 n_samples, t_metrics, os.path.join(workdir, f"{split}_metrics.json"))
    if config.eval.figures and jax.process_index() == 0:
        results["figures"] = write_figures(run, per_case, split)
    return results


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def mean_dice(case_metrics: dict[str, dict[str, float]]) -> float:
    """Mean Dice over the classes of one case (undefined classes skipped)."""
    values = [m["dice"] for m in case_metrics.values() if math.isfinite(m["dice"])]
    return float(np.mean(values)) if values else float("nan")


def select_cases(scores: dict[str, float]) -> list[tuple[str, str]]:
    """[(title, case key)] for the best, median and worst case by Dice (``scores``: case
    key -> Dice; undefined scores are left out)."""
    scored = sorted(((dice, key) for key, dice in scores.items() if math.isfinite(dice)),
                    reverse=True)
    if not scored:
        return []
    picks = [("best", scored[0]), ("median", scored[len(scored) // 2]), ("worst", scored[-1])]
    out, seen = [], set()
    for role, (dice, key) in picks:
        if key not in seen:
            seen.add(key)
            out.append((f"{role}: {key} (Dice {dice:.3f})", key))
    return out


def _lesion_slice(label: np.ndarray, pred: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the most reference (else predicted) foreground."""
    for mask in (label > 0, pred > 0):
        area = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
        if area.any():
            return int(np.argmax(area))
    return label.shape[axis] // 2


def _attention(run: Run, case: decathlon.Case, index: int | None,
               in_plane: tuple[int, ...]) -> np.ndarray:
    """Finest attention-gate coefficients of a 2D Attention U-Net on one slice, case grid.

    Resampled runs (``data.in_plane='spacing'``) feed the whole resampled slice,
    padded to a multiple of the network's stride, as the convolutions allow.
    """
    config = run.config
    shape = None
    if pipeline.uses_patches(config):
        volume, _ = pipeline.case_volume(dataclasses.replace(case, label=None), run.plans,
                                         config)
        x = volume if index is None else np.take(volume, index, axis=config.data.slice_axis)
        stride = 2 ** (config.model.depth - 1)
        shape = x.shape[:-1]
        padded = tuple(-(-n // stride) * stride for n in shape)
        x = preprocess.pad_to(x, padded, float(x.min()))[None]
    else:
        samples, _ = pipeline.case_samples(case, run.plans, config)
        x = samples[0 if index is None else index][None]
    maps = attention_unet.attention_maps(run.model, train._variables(run.state), x)
    finest = max(maps.values(), key=lambda a: int(np.prod(a.shape[1:-1])))
    alpha = np.asarray(finest[0], np.float32)
    if shape is not None:  # back to the padded slice, then cut the padding off
        alpha = preprocess.resize(alpha, x.shape[1:-1], order=1)
        alpha = alpha[tuple(slice(0, n) for n in shape)]
    return preprocess.resize(alpha, in_plane, order=1)[..., 0]


def case_view(run: Run, key: str, title: str, index: int | None = None) -> dict:
    """A 2D view of one case for ``report.plot_cases``: image, reference, prediction, maps.

    Volumes are cut at slice ``index`` (default: the slice with the most lesion);
    the view's ``index`` says which slice was taken.
    """
    config = run.config
    case = run.dataset.load(key)
    probs, _ = inference.predict_probs(case, run.plans, config, run.state, run.predict_fn,
                                       run.mesh)
    pred = np.argmax(probs, axis=-1)
    unc = inference.entropy(probs)
    image = case.image[0]
    if image.ndim == 3:  # a volume: the slice through the most lesion
        axis = config.data.slice_axis if config.model.spatial_dims == 2 else 2
        index = _lesion_slice(case.label, pred, axis) if index is None else index
        take = lambda a: np.take(a, index, axis=axis)  # noqa: E731
        image, gt, pred, unc = take(image), take(case.label), take(pred), take(unc)
        title = f"{title}\nslice {index} of axis {axis}"
    else:
        gt, index = case.label, None
    maps = {"uncertainty: softmax entropy": unc}
    if config.model.name == "attention_unet" and config.model.spatial_dims == 2:
        maps["attention: finest gate"] = _attention(run, case, index, image.shape)
    return {"title": title, "image": image, "gt": gt, "preds": {config.model.name: pred},
            "maps": maps, "index": index}


def write_figures(run: Run, per_case: list[dict], split: str) -> dict[str, str]:
    """Writes the case overlays and training curves into ``<workdir>/figures``."""
    folder = os.path.join(run.workdir, "figures")
    out = {}
    picks = select_cases({c["case"]: mean_dice(c["metrics"]) for c in per_case})
    if picks:
        rows = [case_view(run, key, title) for title, key in picks]
        out["cases"] = os.path.join(folder, f"{split}_cases.png")
        report.plot_cases(rows, out["cases"], f"{run.config.model.name}, {split} split")
    if report.read_metrics_log(run.workdir)[1]:
        out["curves"] = os.path.join(folder, "training_curves.png")
        report.plot_curves({run.config.model.name: run.workdir}, out["curves"])
    logging.info("Wrote figures: %s", ", ".join(out.values()) or "none")
    return out
