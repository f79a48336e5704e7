"""Plans from the data (``data.plan="auto"``), as nnU-Net's experiment planner makes them.

``fingerprint.py`` describes the training cases, ``rules.py`` turns the description into
a 2D or 3D U-Net plan (target spacing, patch size, per-axis pooling and kernels, depth,
features, batch size, normalisation, estimated cost), each decision with its reason.
This module applies a plan to a run's config:

- a config field left at its "from the plan" value takes the plan's value:
  ``data.image_size = ()``, ``data.target_spacing = ()``, ``train.batch_size = 0``,
  ``model.base_features = 0``, ``model.depth = 0`` (with it ``model.pool_sizes`` and
  ``model.kernel_sizes``), ``model.max_features = 0``;
- any field set to a value is kept: explicit config fields win;
- the resolved values, where each came from and why, are written to the run's
  ``plans.json``; a later run (resume, eval, predict) reads them from there, so the
  run keeps its plan even if the planner changes.

``data.plan_budget`` says how big a step may be: ``"cpu"`` (base 16 features and a
budget that keeps a step to about a second on two CPU cores), ``"gpu"`` (nnU-Net's
reference: base 32, an 8 GB budget) or ``"auto"`` (by the JAX backend).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections
import numpy as np

from medseg_jax import fileio
from medseg_jax.planning import rules
from medseg_jax.planning.fingerprint import case_record, fingerprint
from medseg_jax.planning.rules import (DECISIONS, check_plan, estimate_cost, plan_2d,
                                       plan_3d, plan_summary, unet_topology)

__all__ = ["BUDGETS", "DECISIONS", "PLANS_JSON", "budget_name", "case_record", "check_plan",
           "dataset_fingerprint", "estimate_cost", "fingerprint", "make_plan", "plan_2d",
           "plan_3d", "plan_summary", "resolve", "rules", "unet_topology", "wanted", "write"]

PLANS_JSON = "plans.json"

# Budget presets per dimensionality: (rules budget fields, base features, feature cap).
BUDGETS: dict[str, dict[str, Any]] = {
    "gpu": {"budget_3d": {}, "budget_2d": {}, "base_features": 32, "max_features_3d": 320,
            "max_features_2d": 512},
    # Half nnU-Net's width and a compute budget per training step (analytic GFLOP, about
    # 2-3 s on two cores): 3D at batch 2 (Hippocampus: 40x56x40, ~58 GFLOP), 2D at
    # batch 8 or more. Where even the smallest batch of a patch covering
    # `min_coverage` of the median shape exceeds it, the spacing is coarsened, as
    # nnU-Net's low-resolution configuration does for large images.
    "cpu": {"budget_3d": {"feature_voxels": 2.0e8, "max_batch_size": 2},
            "budget_2d": {"feature_voxels": 2.0e8, "min_batch_size": 8, "max_batch_size": 32},
            "base_features": 16, "max_features_3d": 256, "max_features_2d": 256,
            "max_gflops": 60.0, "min_coverage": 0.4},
}


def wanted(config) -> bool:
    """Whether the run's config asks for a plan."""
    return str(config.data.plan) == "auto"


def budget_name(config) -> str:
    name = str(config.data.plan_budget)
    if name == "auto":
        import jax  # noqa: PLC0415

        return "cpu" if jax.default_backend() == "cpu" else "gpu"
    if name not in BUDGETS:
        raise ValueError(f"config.data.plan_budget: {name!r} is not one of auto, "
                         f"{', '.join(BUDGETS)}")
    return name


def dataset_fingerprint(dataset, keys: list[str], dims: int) -> dict:
    """The fingerprint of the cases ``keys`` from their NIfTI headers (spacing and shape
    in RAS order). 2D images in a data set with volumes count as one-slice volumes (2D
    plans only); a 3D plan of 2D images is refused."""
    import nibabel as nib  # noqa: PLC0415

    from medseg_jax.data import nifti  # noqa: PLC0415

    records, any_3d = [], False
    for key in keys:
        ref, info = dataset.refs[key]
        img = nifti.load_header(ref.image_paths[0])  # a damaged file: one line naming it
        zooms, shape = img.header.get_zooms(), img.shape
        n = 2 if info.is_2d or len(shape) == 2 else 3
        ornt = nib.io_orientation(img.affine)[:n] if n == 3 else np.array([[0, 1], [1, 1]])
        spacing, size = [0.0] * n, [0] * n
        for axis, (target, _) in enumerate(ornt):
            spacing[int(target)], size[int(target)] = float(zooms[axis]), int(shape[axis])
        if n == 2 and dims == 3:
            raise ValueError(f"{ref.image_paths[0]}: a 3D plan needs 3D images")
        any_3d |= n == 3
        records.append((spacing, size, info.modalities))
    if any_3d:  # 2D images beside volumes: one-slice volumes
        records = [(sp + [1.0], sz + [1], m) if len(sp) == 2 else (sp, sz, m)
                   for sp, sz, m in records]
    return fingerprint([case_record(sp, sz, modalities=m) for sp, sz, m in records],
                       name=",".join(info.name for info in dataset.infos))


def _coarsened(fp: dict, factor: float) -> dict:
    """The fingerprint of the same cases seen at ``factor`` x their voxel size."""
    if factor == 1.0:
        return fp
    records = [case_record([x * factor for x in sp], [max(1, round(n / factor)) for n in sh],
                           modalities=fp["modalities"])
               for sp, sh in zip(fp["spacings"], fp["shapes"])]
    return fingerprint(records, name=fp.get("name", ""))


def _gflops_per_sample(plan: dict) -> float:
    return plan["estimated_gflops_per_step"] / plan["batch_size"]


def _within_compute(fp: dict, dims: int, budget: dict, kwargs: dict, preset: dict,
                    slice_axis: int) -> dict:
    """The plan whose training step fits ``max_gflops``: the patch shrinks down to
    ``min_coverage`` of the median shape, then the spacing coarsens (x1.25 at a time);
    the batch is the largest that fits, within the budget's bounds."""
    max_gflops, min_coverage = preset["max_gflops"], preset["min_coverage"]
    make = ((lambda f, b: plan_3d(f, b, **kwargs)) if dims == 3 else
            (lambda f, b: plan_2d(f, b, slice_axis=slice_axis, **kwargs)))
    min_batch = int(budget.get("min_batch_size", rules.DEFAULT_BUDGET["min_batch_size"]))
    factor, shrunk = 1.0, 0
    while True:
        coarse = _coarsened(fp, factor)
        voxels = float(budget.get("feature_voxels", rules.DEFAULT_BUDGET["feature_voxels"]))
        for _ in range(40):
            plan = make(coarse, {**budget, "feature_voxels": voxels})
            need = _gflops_per_sample(plan) * min_batch
            coverage = float(np.prod(np.asarray(plan["patch_size"], float)
                                     / np.asarray(plan["median_shape"], float)))
            if need <= max_gflops or coverage <= min_coverage:
                break
            voxels *= max(0.5, min(0.95, max_gflops / need))
            shrunk += 1
        if need <= max_gflops or factor > 64:
            break
        factor *= 1.25
    per = _gflops_per_sample(plan)
    by_data = plan["reasons"]["batch_size"]["inputs"]["by_dataset_fraction"]
    cap = budget.get("max_batch_size") or 1 << 30
    batch = max(min_batch, min(int(max_gflops // per), int(cap), max(by_data, min_batch)))
    plan["batch_size"] = batch
    cost = estimate_cost(plan)
    plan.update(cost=cost, estimated_gflops_per_step=cost["estimated_gflops_per_step"],
                estimated_activation_mib=cost["estimated_activation_mib"])
    plan["reasons"]["compute_budget"] = {
        "why": (f"Training step within {max_gflops:g} GFLOP (the {preset['name']} budget): "
                + (f"spacing coarsened {factor:.2f}x to {rules._fmt(plan['target_spacing'])} "
                   "mm (the patch could not cover enough of the median shape at the full "
                   "resolution), " if factor > 1 else "")
                + (f"patch shrunk in {shrunk} steps, " if shrunk else "")
                + f"batch {batch} ({per:.1f} GFLOP per sample; at least {min_batch}, at most "
                f"{cap if cap < 1 << 30 else 'unbounded'}, and at most 5% of the data set): "
                f"~{cost['estimated_gflops_per_step']:.1f} GFLOP per step."),
        "inputs": {"max_gflops": max_gflops, "min_coverage": min_coverage,
                   "coarsening": factor, "patch_shrinks": shrunk,
                   "gflops_per_sample": per}}
    plan["reasons"]["batch_size"]["why"] += f" Compute budget: batch {batch}."
    plan["reasons"]["cost"]["why"] = (
        f"Analytic U-Net cost at batch {batch}: ~{cost['estimated_gflops_per_step']:.1f} "
        f"GFLOP per training step, ~{cost['estimated_activation_mib']:.0f} MiB of float32 "
        f"activations, {cost['parameters'] / 1e6:.1f} M parameters.")
    return plan


def make_plan(dataset, keys: list[str], config, num_classes: int) -> dict:
    """The plan of ``config``'s dimensionality for the training cases ``keys``."""
    dims = int(config.model.spatial_dims)
    name = budget_name(config)
    preset = dict(BUDGETS[name], name=name)
    fp = dataset_fingerprint(dataset, keys, dims)
    base = int(config.model.base_features) or preset["base_features"]
    kwargs = dict(base_features=base, num_classes=num_classes,
                  max_features=preset[f"max_features_{dims}d"])
    budget = preset[f"budget_{dims}d"]
    slice_axis = int(config.data.slice_axis)
    if preset.get("max_gflops"):
        plan = _within_compute(fp, dims, budget, kwargs, preset, slice_axis)
    elif dims == 3:
        plan = plan_3d(fp, budget, **kwargs)
    else:
        plan = plan_2d(fp, budget, slice_axis=slice_axis, **kwargs)
    plan["budget_preset"] = name
    return plan


def _plan_values(plan: dict) -> dict[str, Any]:
    """The config fields a plan sets, with its values (dotted names)."""
    return {
        "data.image_size": tuple(int(n) for n in plan["patch_size"]),
        "data.target_spacing": tuple(float(s) for s in plan["target_spacing"]),
        "train.batch_size": int(plan["batch_size"]),
        "model.base_features": int(plan["settings"]["base_features"]),
        "model.depth": int(plan["depth"]),
        "model.pool_sizes": tuple(tuple(int(f) for f in p) for p in plan["pool_sizes"]),
        "model.kernel_sizes": tuple(tuple(int(k) for k in ks) for ks in plan["kernel_sizes"]),
        "model.max_features": int(plan["settings"]["max_features"]),
    }


_FROM_PLAN = {  # the value of each field that means "take it from the plan"
    "data.image_size": (), "data.target_spacing": (), "train.batch_size": 0,
    "model.base_features": 0, "model.depth": 0, "model.max_features": 0,
}


def _get(config, dotted: str):
    section, field = dotted.split(".")
    return config[section][field]


def _apply(config, plan: dict) -> tuple[ml_collections.ConfigDict, dict]:
    """(config with every from-the-plan field set, {field: {value, source}})."""
    out = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    values = _plan_values(plan)
    record = {}
    for dotted, value in values.items():
        section, field = dotted.split(".")
        current = out[section][field]
        if dotted in ("model.pool_sizes", "model.kernel_sizes"):
            from_plan = _get(config, "model.depth") == 0 and not len(current)
        else:
            current_value = tuple(current) if isinstance(current, (list, tuple)) else current
            from_plan = current_value == _FROM_PLAN[dotted]
        if from_plan:
            out[section][field] = value
        record[dotted] = {"value": list(value) if isinstance(value, tuple) else value,
                          "source": "plan" if from_plan else "config"}
    if out.model.spatial_dims == 2:
        out.data.in_plane = "spacing"  # a 2D plan resamples in plane to its spacing
    return out, record


def resolve(config, workdir: str) -> tuple[ml_collections.ConfigDict, dict | None]:
    """``(config, plans.json content)``: with ``data.plan="auto"``, the config with the
    plan's values in the fields left to it (from ``<workdir>/plans.json`` when the run
    has one, else planned from the training cases); otherwise ``(config, None)``."""
    if not wanted(config):
        return config, None
    path = os.path.join(workdir, PLANS_JSON)
    if os.path.exists(path):
        saved = fileio.read_json(path, "the run's plan", "delete it to plan again from the "
                                 "data (the run's settings may then change)")
        try:
            plan = saved["plan"]
            return _apply(config, plan)[0], saved
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a plan written by this package ({e}); delete it "
                             "to plan again from the data") from None
    from medseg_jax.data import dataset as dataset_lib  # noqa: PLC0415

    dataset = dataset_lib.open_dataset(config, workdir)
    plan = make_plan(dataset, dataset.splits["train"], config, dataset.num_classes)
    resolved, fields = _apply(config, plan)
    warnings = check_plan(plan)
    return resolved, {"plan": plan, "fields": fields, "warnings": warnings,
                      "summary": plan_summary(plan)}


def write(record: dict | None, workdir: str) -> None:
    """Writes ``plans.json`` (process 0); nothing without a plan."""
    import jax  # noqa: PLC0415

    if record is not None and jax.process_index() == 0:
        fileio.write_json_atomic(os.path.join(workdir, PLANS_JSON), record)

