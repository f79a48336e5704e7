"""Evaluation: restore a checkpoint, predict whole cases, per-case metrics in mm.

Each case of the split is read from its NIfTI files, normalised with the plan
of the training run (``preprocess.json``), cut into network samples (slices or
sliding-window patches), predicted (optionally with flip test-time
augmentation), and the class probabilities are resized back to the case's own
grid before the argmax. Metrics are computed per case on the whole volume with
the case's voxel spacing, so distances are in mm.

Writes to the workdir, for a split ``<split>``:
(``<split>_<checkpoint>_...`` for another checkpoint than the best, e.g.
``test_step1500_metrics.json``, ``..._whole_...`` with ``eval.sw_window="whole"``,
``..._ensemble_<members' folder names>_...`` with ``eval.ensemble`` (no figures), and
``..._largest_...`` / ``..._auto_...`` with ``eval.postprocess``, so the best
checkpoint's plain files stay; ``choose`` writes the validation split's plain,
``_largest`` and ``_auto`` files from one prediction pass and ``postprocessing.json``,
the choice per class, ``postprocessing_whole.json`` when made with whole windows)
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
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import config as config_lib
from medseg_jax import fileio, inference, metrics, models, postprocess, report
from medseg_jax import state as state_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import nifti, preprocess, resampling
from medseg_jax.models import layers
from medseg_jax.state import Run


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str | None = None,
             checkpoint: str | None = None) -> dict:
    """Evaluates a checkpoint of the run in ``workdir`` on a split; returns the results.

    With ``eval.postprocess="choose"`` the post-processing is first chosen per class on
    the validation split (``postprocess.py``), then the split is evaluated with that
    choice (the validation results themselves when the split is "val").
    Holds the workdir's lock: a training run using the workdir makes it refuse.
    """
    config_lib.check_numbers(config)  # before the workdir is touched
    split = split or config.eval.split
    with workdir_lib.run_lock(workdir):
        run = state_lib.restore_run(config, workdir, checkpoint)
        mode = str(run.config.eval.postprocess).strip()
        if state_lib.ensemble_paths(run.config, workdir):
            spec = postprocess.resolve(mode, workdir, run.labels)
            members = state_lib.restore_members(run, checkpoint)
            return _evaluate(run, split, spec, spec, postprocess.suffix(spec), members=members)
        if mode != "choose":
            window = preprocess.sw_window(run.config)
            spec = postprocess.resolve(mode, workdir, run.labels, run.which, run.step, window)
            if mode == "auto":
                used = postprocess.applied_choice_path(workdir, run.which, run.step, window)
                whose = ("" if used == postprocess.choice_path(workdir, run.which, run.step,
                                                               window)
                         else "the patch windows' choice: ")
                return _evaluate(run, split, spec, f"auto ({whose}{spec or 'none'})", "_auto")
            return _evaluate(run, split, spec, spec, postprocess.suffix(spec))
        results = _evaluate(run, "val", "", "", "", choose=True)
        if split == "val":
            return results
        spec = results["postprocess_choice"]["spec"]  # in memory: no process re-reads it
        return _evaluate(run, split, spec, f"auto ({spec or 'none'})", "_auto")


def _evaluate(run: Run, split: str, spec: str, label: str, suffix: str,
              choose: bool = False, members: list[Run] = ()) -> dict:
    """One split with the resolved post-processing ``spec`` (``label`` for the titles,
    ``suffix`` for the file names); ``choose`` also scores every class's largest
    component and writes the choice; ``members``: other runs whose probabilities are
    averaged with ``run``'s (``eval.ensemble``)."""
    workdir = run.workdir
    config = ml_collections.ConfigDict(run.config.to_dict())  # with the run's plan applied
    config.eval.postprocess = spec
    run = dataclasses.replace(run, config=config)
    keys = run.dataset.splits[split]
    if not keys:
        raise ValueError(f"{workdir}/splits.json: split {split!r} has no cases"
                         + (" (config.eval.postprocess=choose chooses on it)" if choose else ""))
    for member in members:
        if sorted(member.dataset.splits.get(split, [])) != sorted(keys):
            raise ValueError(f"config.eval.ensemble: {member.workdir}/splits.json: its {split} "
                             f"split is not the evaluated run's ({workdir}/splits.json)")
    logging.info("Evaluating the %s checkpoint (step %d, epoch %d) on %d %s cases%s%s",
                 run.which, run.step, run.epoch, len(keys), split,
                 " with flip TTA" if config.eval.tta else "",
                 "".join(f", averaged with {m.workdir} (step {m.step})" for m in members))

    per_case, largest, n_samples, t_predict, t_metrics = [], [], 0, 0.0, 0.0
    for key in keys:
        preprocess.check_case_memory(*run.dataset.refs[key], config,  # before it is read
                                     run.plans.get("target_spacing"), run.dataset.num_classes)
        case = run.dataset.load(key)
        t0 = time.time()
        probs, n = inference.ensemble_probs(case, [run, *members])
        pred = inference.label_map(probs, config)
        t1 = time.time()
        ref, _ = run.dataset.refs[key]
        case_metrics = metrics.evaluate_case(pred, case.label, case.spacing, run.labels,
                                             config.eval.nsd_tolerance_mm, ref.annotated)
        entry = {"case": key, "task": case.task, "spacing": [float(s) for s in case.spacing]}
        per_case.append(dict(entry, metrics=case_metrics))
        if choose:  # a class's metrics depend on its own mask only: unchanged ones are reused
            kept = postprocess.largest_components(pred)
            changed = {v: name for v, name in run.labels.items()
                       if v and name in case_metrics and np.any((pred == v) != (kept == v))}
            largest.append(dict(entry, metrics=dict(case_metrics, **metrics.evaluate_case(
                kept, case.label, case.spacing, changed, config.eval.nsd_tolerance_mm,
                ref.annotated))))
        t_predict, t_metrics, n_samples = t_predict + t1 - t0, t_metrics + time.time() - t1, \
            n_samples + n

    timing = {"seconds": t_predict + t_metrics, "predict_seconds": t_predict,
              "metrics_seconds": t_metrics,
              "cases_per_second": len(keys) / max(t_predict, 1e-9),
              "network_inputs": n_samples}
    prefix = split if run.which == "best" else (
        f"{split}_step{run.step}" if run.which.isdigit() else f"{split}_{run.which}")
    if preprocess.sw_window(config) == "whole":  # beside the files of the patch windows
        prefix += "_whole"
    if members:
        prefix += "_ensemble_" + "+".join(_file_name(m.workdir) for m in members)
        timing["ensemble"] = [{"workdir": m.workdir, "model": m.config.model.name,
                               "spatial_dims": m.config.model.spatial_dims, "step": m.step}
                              for m in members]
    logging.info("Predicted %d cases in %.1f s (%.2f cases/s, %d network inputs), metrics in "
                 "%.1f s", len(keys), t_predict, timing["cases_per_second"], n_samples,
                 t_metrics)
    if not choose:
        return _report(run, split, prefix + suffix, per_case, timing, label, spec,
                       figures=not members)
    results = _report(run, split, prefix, per_case, timing, "", "")
    every = _report(run, split, prefix + "_largest", largest, timing, "largest", "largest",
                    figures=False)
    choice = postprocess.choose(results["aggregate"]["all"], every["aggregate"]["all"],
                                run.labels)
    chosen = [dict(c, metrics={name: (largest[i] if name in _names(choice) else c)
                               ["metrics"][name] for name in c["metrics"]})
              for i, c in enumerate(per_case)]
    auto = _report(run, split, prefix + "_auto", chosen, timing,
                   f"auto ({choice['spec'] or 'none'})", choice["spec"], figures=False)
    choice.update(split=split, checkpoint=run.which, step=run.step, epoch=run.epoch,
                  tta=bool(config.eval.tta), sw_window=preprocess.sw_window(config))
    if jax.process_index() == 0:
        path = postprocess.write_choice(workdir, choice)
        print(postprocess.choice_table(choice), flush=True)
        logging.info("Post-processing chosen on the %s split: %s; wrote %s", split,
                     choice["spec"] or "none", path)
    return dict(auto, postprocess_choice=choice, figures=results.get("figures"))


def _file_name(workdir: str) -> str:
    """A member's folder name as it goes into file names."""
    name = os.path.basename(os.path.normpath(workdir))
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "run"


def _names(choice: dict) -> set[str]:
    return {name for name, row in choice["classes"].items() if row["largest"]}


def _summarise(per_case: list[dict], config) -> dict:
    """Aggregates over all cases, and per task when there are several."""
    def summarise(cases):
        return metrics.aggregate([c["metrics"] for c in cases], config.eval.bootstrap_samples,
                                 config.seed)

    groups = {"all": summarise(per_case)}
    tasks = sorted({c["task"] for c in per_case})
    if len(tasks) > 1:
        for task in tasks:
            groups[task] = summarise([c for c in per_case if c["task"] == task])
    return groups


def _report(run: Run, split: str, prefix: str, per_case: list[dict], timing: dict,
            postprocessing: str, applied: str, figures: bool = True) -> dict:
    """Aggregates, prints and writes one set of ``<prefix>_*`` files; returns the results."""
    config, workdir = run.config, run.workdir
    groups = _summarise(per_case, config)
    title = (f"{config.model.name}: {split} split, {run.which} checkpoint (step {run.step}, "
             f"epoch {run.epoch}){', flip TTA' if config.eval.tta else ''}"
             + (", whole-case windows" if preprocess.sw_window(config) == "whole" else "")
             + "".join(f", averaged with {m['model']} {m['spatial_dims']}D ({m['workdir']})"
                       for m in timing.get("ensemble", []))
             + (f", post-processing: {postprocessing}" if postprocessing else ""))
    table = report.metrics_table(groups, title, config.eval.nsd_tolerance_mm)
    results = {"model": config.model.name, "split": split, "checkpoint": run.which,
               "step": run.step, "epoch": run.epoch, "tta": bool(config.eval.tta),
               "sw_window": preprocess.sw_window(config),
               "postprocess": postprocessing, "applied": applied,
               "nsd_tolerance_mm": float(config.eval.nsd_tolerance_mm),
               "params": models.count_params(run.state.params),
               "aggregate": groups, "per_case": per_case, **timing}
    if jax.process_index() == 0:
        fileio.write_json_atomic(os.path.join(workdir, f"{prefix}_metrics.json"), results)
        fileio.write_text_atomic(os.path.join(workdir, f"{prefix}_metrics.md"), table)
        fileio.write_text_atomic(os.path.join(workdir, f"{prefix}_per_case.csv"),
                                 report.per_case_csv(per_case))
        fileio.write_text_atomic(os.path.join(workdir, f"{prefix}_summary.csv"),
                                 report.summary_csv(groups))
    print(table, flush=True)
    logging.info("Wrote %s", os.path.join(workdir, f"{prefix}_metrics.json"))
    if figures and config.eval.figures and jax.process_index() == 0:
        results["figures"] = write_figures(run, per_case, prefix)
    return results


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def class_mean(case_metrics: dict[str, dict[str, float]], metric: str = "dice") -> float:
    """Mean of ``metric`` over the classes of one case (undefined ones skipped; nan if
    none is defined)."""
    values = [m[metric] for m in case_metrics.values() if math.isfinite(m[metric])]
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


def _figure_maps(run: Run, case: nifti.Case, index: int | None,
                 in_plane: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The model's own maps (``FIGURE_MAPS``, e.g. attention coefficients) on one slice of
    a 2D model's input, resized to the case grid: {title: 2D array}.

    Resampled runs (``data.in_plane='spacing'``) feed the whole resampled slice, padded
    to a multiple of the network's stride, as the convolutions allow.
    """
    config = run.config
    if not type(run.model).FIGURE_MAPS:
        return {}
    box = preprocess.case_geometry(case, run.plans, config)["box"]  # data.crop_nonzero
    if len(box) == 3:  # a volume's slice: its index in the crop, the box in plane
        lo, hi = box[config.data.slice_axis]
        index = None if index is None else min(max(index - lo, 0), hi - lo - 1)
        box = [b for a, b in enumerate(box) if a != config.data.slice_axis]
    shape = None
    if preprocess.uses_patches(config):
        volume, _ = preprocess.case_volume(dataclasses.replace(case, label=None), run.plans,
                                           config)
        x = volume if index is None else np.take(volume, index, axis=config.data.slice_axis)
        pools, _ = layers.level_geometry("model", config.model.spatial_dims,
                                         config.model.depth, config.model.pool_sizes,
                                         config.model.kernel_sizes)
        stride = layers.total_stride(pools, config.model.spatial_dims)
        shape = x.shape[:-1]
        padded = tuple(-(-n // s) * s for n, s in zip(shape, stride))
        x = preprocess.pad_to(x, padded, float(x.min()))[None]
    else:
        samples, _ = preprocess.case_samples(case, run.plans, config)
        x = samples[0 if index is None else index][None]
    out = {}
    for title, values in models.figure_maps(run.model, state_lib.variables(run.state),
                                            x).items():
        values = values[0]
        if shape is not None:  # back to the padded slice, then cut the padding off
            values = preprocess.resize(values, x.shape[1:-1], order=1)
            values = values[tuple(slice(0, n) for n in shape)]
        values = preprocess.resize(values, tuple(hi - lo for lo, hi in box), order=1)
        out[title] = resampling.uncrop(values, box, in_plane, 0.0)[..., 0]
    return out


def case_view(run: Run, key: str, title: str, index: int | None = None) -> dict:
    """A 2D view of one case for ``report.plot_cases``: image, reference, prediction, maps.

    Volumes are cut at slice ``index`` (default: the slice with the most lesion);
    the view's ``index`` says which slice was taken.
    """
    config = run.config
    case = run.dataset.load(key)
    probs, _ = inference.predict_probs(case, run.plans, config, run.state, run.predict_fn,
                                       run.mesh)
    pred = inference.label_map(probs, config)
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
    if config.model.spatial_dims == 2:  # maps of a 2D input: one slice, like the view
        maps.update(_figure_maps(run, case, index, image.shape))
    return {"title": title, "image": image, "gt": gt, "preds": {config.model.name: pred},
            "maps": maps, "index": index}


def write_figures(run: Run, per_case: list[dict], split: str) -> dict[str, str]:
    """Writes the case overlays and training curves into ``<workdir>/figures``."""
    folder = os.path.join(run.workdir, "figures")
    out = {}
    picks = select_cases({c["case"]: class_mean(c["metrics"]) for c in per_case})
    if picks:
        rows = [case_view(run, key, title) for title, key in picks]
        out["cases"] = os.path.join(folder, f"{split}_cases.png")
        report.plot_cases(rows, out["cases"], f"{run.config.model.name}, {split} split")
    if report.read_metrics_log(run.workdir)[1]:
        out["curves"] = os.path.join(folder, "training_curves.png")
        report.plot_curves({run.config.model.name: run.workdir}, out["curves"])
    logging.info("Wrote figures: %s", ", ".join(out.values()) or "none")
    return out
