"""Planning rules: from a data set's fingerprint to a U-Net training plan.

This module owns the *decisions* nnU-Net's experiment planner makes, written anew
for medseg_jax in plain numpy: the rules that turn a data-set fingerprint
(``fingerprint.py``) into a 3D or a 2D U-Net plan (target spacing, patch size, pooling
and kernel sizes per level, features per level, batch size, per-channel
normalisation), an analytic cost model of that U-Net, and one human-readable reason
per decision. It reads no files and changes nothing in the data pipeline or the
models.

Rules (axes are in the records' order, RAS for volumes; ``d`` = planned axes):

- **Target spacing**: the median spacing per axis. If the data set is
  anisotropic (coarsest axis > ``anisotropy_threshold`` (3) x the next coarsest
  axis, *and* that axis has fewer than 1/3 of the voxels of the smallest other
  axis), the coarse axis takes the 10th percentile of its spacings instead,
  but never finer than the next coarsest axis (fewer interpolation artefacts
  from thick-slice cases, as nnU-Net argues).
- **Median shape**: the median over cases of each case's shape after resampling
  to the target spacing.
- **Topology** (:func:`unet_topology`): level by level, an axis is pooled (x2)
  while its feature map stays >= ``min_feature_map`` (4) voxels after pooling and
  while its current spacing is less than 2x the finest current spacing of the
  axes still poolable; pooling stops when no axis can be pooled or after
  ``max_pools`` levels (5 in 3D, 7 in 2D). A conv kernel is 1 on an axis whose
  current spacing is >= 2x the finest current spacing, else 3; once 3 it stays 3.
  ``depth`` = number of levels = pools + 1.
- **Patch size**: start from the median shape; compute the topology; round each
  axis up to a multiple of its total pooling factor; while the cost at the
  minimum batch size exceeds the budget, shrink the axis whose patch is largest
  relative to the median shape to its next smaller valid size, recomputing the
  topology each time. The budget is thus checked on the rounded patch.
- **Budget** (:data:`DEFAULT_BUDGET`): ``feature_voxels`` caps
  batch x sum over all convolutions of (output voxels x output features), the
  quantity nnU-Net's VRAM estimate counts. The default, 1.12e9, is nnU-Net's
  reference for an 8 GB GPU (5.6e8 per sample at batch 2); at float32 with three
  stored tensors per convolution (conv output, normalised, activated) it is about
  12.5 GiB of activations. Halve it for a smaller device; it gives a 3D patch of
  the whole median crop on Hippocampus (40x56x40; batch 7 with the 200 cases
  here, 9 with nnU-Net's 260) and of the whole 128^3 grid on OpenKBP.
- **Batch size**: as many patches as the budget allows, capped so that one batch
  covers at most ``max_dataset_fraction`` (5%) of the data set's voxels (nnU-Net's
  overfitting precaution; it limits large 2D batches), never below
  ``min_batch_size`` (2); optionally capped by ``max_batch_size``.
- **Features**: ``base_features * 2**level`` capped at ``max_features``
  (320 in 3D, 512 in 2D, as nnU-Net).
- **Normalisation** per channel, in :mod:`medseg_jax.data.preprocess`'s format:
  CT: clip to the data-set 0.5/99.5 percentiles of foreground intensities, then
  z-score with the mean/std of the clipped foreground; anything else: z-score per
  case.

A plan is a JSON-serialisable dict; :func:`check_plan` validates one and
:func:`plan_summary` prints one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from medseg_jax.data import resampling
from medseg_jax.data.preprocess import is_ct, resampled_shape

DEFAULT_BUDGET: dict[str, Any] = {
    # batch x sum over convolutions of output voxels x output features (see module doc)
    "feature_voxels": 1.12e9,
    "min_batch_size": 2,
    "max_batch_size": None,  # None: no cap other than the data-set fraction
    "max_dataset_fraction": 0.05,
}

# Plan keys that are decisions; each has an entry in plan["reasons"].
DECISIONS = ("target_spacing", "median_shape", "pool_sizes", "kernel_sizes", "patch_size",
             "features_per_level", "batch_size", "normalization", "cost", "resampling")

BYTES_PER_ACTIVATION = 4  # float32
TENSORS_PER_CONV = 3  # conv output, normalised, activated: kept for the backward pass




def target_spacing(fp: dict, anisotropy_threshold: float = 3.0) -> tuple[list[float], dict]:
    """(target spacing per axis, the inputs and outcome of the anisotropy test)."""
    spacings = np.asarray(fp["spacings"], np.float64)
    target = np.median(spacings, axis=0)
    median_shape = np.asarray(fp["median_shape"], np.float64)
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    next_coarsest = float(max(target[a] for a in others))
    aniso_spacing = bool(target[coarse] > anisotropy_threshold * next_coarsest)
    aniso_voxels = bool(median_shape[coarse] * anisotropy_threshold
                        < min(median_shape[a] for a in others))
    info = {"median_spacing": [float(v) for v in target], "coarse_axis": coarse,
            "threshold": anisotropy_threshold, "anisotropic_spacing": aniso_spacing,
            "few_voxels_on_coarse_axis": aniso_voxels, "adjusted": False}
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, coarse], 10))
        target[coarse] = max(p10, next_coarsest)
        info.update(adjusted=True, coarse_axis_p10=p10)
    return [float(v) for v in target], info


def unet_topology(spacing: Sequence[float], patch: Sequence[float], min_feature_map: int = 4,
                  max_pools: int = 5, spacing_ratio: float = 2.0) -> dict:
    """Pooling and kernel sizes per level for ``patch`` voxels at ``spacing`` mm.

    Returns ``pool_sizes`` (one per pooling, per axis 1 or 2), ``kernel_sizes`` (one
    per level, per axis 1 or 3), ``depth`` and ``divisor`` (total pooling per axis).
    """
    dims = len(spacing)
    current = [float(s) for s in spacing]
    size = [float(n) for n in patch]
    kernel = [1] * dims
    pools: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        finest = min(current)
        kernel = [3 if k == 3 or current[a] / finest < spacing_ratio else 1
                  for a, k in enumerate(kernel)]
        kernels.append(list(kernel))
        if len(pools) >= max_pools:
            break
        room = [a for a in range(dims) if size[a] >= 2 * min_feature_map]
        if not room:
            break
        finest_room = min(current[a] for a in room)
        axes = [a for a in room if current[a] / finest_room < spacing_ratio]
        pool = [2 if a in axes else 1 for a in range(dims)]
        pools.append(pool)
        for a in axes:
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    divisor = [int(np.prod([p[a] for p in pools])) for a in range(dims)]
    return {"pool_sizes": pools, "kernel_sizes": kernels, "depth": len(kernels),
            "divisor": divisor}


def features_per_level(depth: int, base_features: int = 32, max_features: int = 320) -> list[int]:
    return [int(min(base_features * 2**i, max_features)) for i in range(depth)]


def _round_up(n: float, k: int) -> int:
    return int(math.ceil(n / k) * k)


def _unet_cost(patch, pool_sizes, kernel_sizes, features, batch, num_channels, num_classes):
    """Analytic cost of the U-Net (see :func:`estimate_cost`); per-sample numbers x batch."""
    sizes = [np.asarray(patch, np.int64)]
    for p in pool_sizes:
        sizes.append(sizes[-1] // np.asarray(p))
    vox = [float(np.prod(s, dtype=np.float64)) for s in sizes]
    macs = outputs = params = 0.0
    for level, f in enumerate(features):  # encoder: two convs per level
        k = float(np.prod(kernel_sizes[level]))
        cin = num_channels if level == 0 else features[level - 1]
        macs += vox[level] * k * (cin * f + f * f)
        outputs += 2 * vox[level] * f
        params += k * (cin * f + f * f) + 2 * f
    for level in range(len(features) - 1):  # decoder: up-conv, concat, two convs
        f, fup = features[level], features[level + 1]
        k = float(np.prod(kernel_sizes[level]))
        macs += vox[level] * fup * f  # transposed conv, kernel = stride
        macs += vox[level] * k * (2 * f * f + f * f)
        outputs += 3 * vox[level] * f
        params += np.prod(pool_sizes[level]) * fup * f + f + k * (3 * f * f) + 2 * f
    macs += vox[0] * features[0] * num_classes  # 1x1 head
    outputs += vox[0] * num_classes
    params += features[0] * num_classes + num_classes
    return {
        "feature_voxels_per_sample": int(outputs),
        "feature_voxels": int(outputs * batch),
        "gflops_forward_per_sample": 2 * macs / 1e9,
        "estimated_gflops_per_step": 3 * 2 * macs * batch / 1e9,
        "estimated_activation_mib":
            outputs * batch * TENSORS_PER_CONV * BYTES_PER_ACTIVATION / 2**20,
        "parameters": int(params),
    }


def estimate_cost(plan: dict, num_channels: int | None = None,
                  num_classes: int | None = None) -> dict:
    """Analytic training cost of ``plan``'s U-Net at its patch and batch size.

    The U-Net: per level two convs (the level's kernel, ``features_per_level``), pooling
    down, a transposed conv up (kernel = stride), concatenation with the skip, two convs,
    and a 1x1 head. ``feature_voxels`` = batch x sum of conv output elements (the budget
    quantity); ``estimated_gflops_per_step`` = 3 (forward + backward) x 2 x MACs x batch;
    ``estimated_activation_mib`` = feature voxels x 3 stored tensors x 4 bytes. Norms,
    pooling and the loss are not counted. ``num_channels`` / ``num_classes`` default to
    the plan's.
    """
    return _unet_cost(plan["patch_size"], plan["pool_sizes"], plan["kernel_sizes"],
                      plan["features_per_level"], plan["batch_size"],
                      plan["num_channels"] if num_channels is None else num_channels,
                      plan["num_classes"] if num_classes is None else num_classes)


def _normalization(fp: dict) -> tuple[list[dict], str, dict]:
    entries, notes = [], []
    stats = fp.get("foreground_intensity") or [None] * len(fp["modalities"])
    for ch, modality in enumerate(fp["modalities"]):
        if is_ct(modality):
            s = stats[ch]
            if s is None:
                entries.append({"scheme": "ct", "lo": None, "hi": None, "mean": None, "std": None})
                notes.append(f"channel {ch} ({modality}): clip to the foreground 0.5/99.5 "
                             "percentiles, then z-score with the clipped foreground's mean and "
                             "std, computed from the training cases when the run preprocesses "
                             "them (its preprocess.json), so intensities keep their physical "
                             "meaning across cases")
            else:
                entries.append({"scheme": "ct", "lo": s["p00_5"], "hi": s["p99_5"],
                                "mean": s["clipped_mean"], "std": max(s["clipped_std"], 1e-8)})
                notes.append(f"channel {ch} ({modality}): clip to the foreground 0.5/99.5 "
                             f"percentiles [{s['p00_5']:.1f}, {s['p99_5']:.1f}] then z-score "
                             f"with mean {s['clipped_mean']:.1f}, std {s['clipped_std']:.1f} "
                             f"({s['num_samples']} foreground samples), so intensities keep "
                             "their physical meaning across cases")
        else:
            entries.append({"scheme": "zscore"})
            notes.append(f"channel {ch} ({modality}): z-score per case, because intensities of "
                         "non-CT modalities have no fixed scale between cases")
    return entries, "; ".join(notes) + ".", {"modalities": list(fp["modalities"])}


def _fmt(v: Sequence[float], p: int = 2) -> str:
    return "x".join(f"{x:.{p}f}" if isinstance(x, float) and p else str(x) for x in v)


def _plan(fp: dict, axes: list[int], budget: dict | None, configuration: str, slice_axis,
          base_features: int, max_features: int, max_pools: int, min_feature_map: int,
          anisotropy_threshold: float, num_classes: int | None) -> dict:
    budget_used = dict(DEFAULT_BUDGET)
    unknown = set(budget or {}) - set(DEFAULT_BUDGET)
    if unknown:
        raise ValueError(f"unknown budget fields {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_BUDGET)}")
    budget_used.update(budget or {})
    min_batch = int(budget_used["min_batch_size"])
    if min_batch < 1 or budget_used["feature_voxels"] <= 0:
        raise ValueError(f"budget {budget_used}: min_batch_size >= 1 and feature_voxels > 0")
    reasons: dict[str, dict] = {}

    spacing_full, aniso = target_spacing(fp, anisotropy_threshold)
    if aniso["adjusted"]:
        why = (f"Median spacing {_fmt(aniso['median_spacing'])} mm is anisotropic (axis "
               f"{aniso['coarse_axis']} > {anisotropy_threshold:g}x the next axis and has "
               f"< 1/{anisotropy_threshold:g} of its voxels), so that axis takes the 10th "
               f"percentile of its spacings ({aniso['coarse_axis_p10']:.2f} mm, floored at the "
               f"next axis) to limit interpolation of thick-slice cases: "
               f"{_fmt(spacing_full)} mm.")
    else:
        why = (f"Median spacing per axis, {_fmt(spacing_full)} mm: the data set is not "
               f"anisotropic enough for an adjustment (coarse axis {aniso['coarse_axis']}: "
               f"spacing test {aniso['anisotropic_spacing']}, voxel test "
               f"{aniso['few_voxels_on_coarse_axis']}).")
    spacing = [spacing_full[a] for a in axes]
    reasons["target_spacing"] = {"why": why, "inputs": {
        **aniso, "spacing_percentiles": fp["spacing_percentiles"], "planned_axes": axes}}

    # nnU-Net's resampling of a median case (data.resampling="nnunet"): the coarse axis
    # separately (order 0) where the spacing ratio of the case or the target is > 3.
    # Each case is decided by the same rule when it is preprocessed.
    median_spacing = aniso["median_spacing"]
    case_target = [median_spacing[a] if a not in axes else spacing_full[a]
                   for a in range(len(spacing_full))]  # a 2D plan keeps the slice axis
    separate = resampling.separate_axis(median_spacing, case_target)
    resampling_plan = {**separate, "image_order": resampling.IMAGE_ORDER,
                       "label_order": resampling.LABEL_ORDER, "label": "one-hot, argmax",
                       "axis_order": resampling.AXIS_ORDER,
                       "threshold": resampling.ANISO_THRESHOLD}
    reasons["resampling"] = {
        "why": (f"A median case ({_fmt(median_spacing)} mm to {_fmt(case_target)} mm): "
                + (f"axis {separate['lowres_axis']} separately with order "
                   f"{resampling.AXIS_ORDER} after the other axes ({separate['reason']})."
                   if separate["separate_z"] else
                   f"every axis together ({separate['reason']}).")
                + f" Images order {resampling.IMAGE_ORDER}, labels one-hot order "
                f"{resampling.LABEL_ORDER} and argmax (data.resampling=\"nnunet\"; each "
                "case decided by the same rule)."),
        "inputs": {"median_spacing": median_spacing, "target_spacing": case_target,
                   "threshold": resampling.ANISO_THRESHOLD}}

    new_shapes = np.array([resampled_shape(tuple(sh), tuple(sp), tuple(spacing_full))
                           for sh, sp in zip(fp["shapes"], fp["spacings"])], np.float64)
    median_full = [max(1, int(round(v))) for v in np.median(new_shapes, axis=0)]
    median = [median_full[a] for a in axes]
    reasons["median_shape"] = {
        "why": (f"Median over {fp['num_cases']} cases of the shape after resampling to the "
                f"target spacing: {_fmt(median_full, 0)} voxels"
                + (f"; planned axes {axes}: {_fmt(median, 0)}." if len(axes) < fp["dims"]
                   else ".")),
        "inputs": {"median_shape_before": fp["median_shape"], "target_spacing": spacing_full}}

    num_channels = len(fp["modalities"])
    if num_classes is None:
        num_classes = len(fp["labels"]) if fp.get("labels") else 2
    num_classes = max(int(num_classes), 2)

    topo_args = dict(min_feature_map=min_feature_map, max_pools=max_pools)

    def layout(target):
        topo = unet_topology(spacing, target, **topo_args)
        patch = [_round_up(t, d) for t, d in zip(target, topo["divisor"])]
        return topo, patch

    def per_sample(topo, patch):
        feats = features_per_level(topo["depth"], base_features, max_features)
        return _unet_cost(patch, topo["pool_sizes"], topo["kernel_sizes"], feats, 1,
                          num_channels, num_classes)["feature_voxels_per_sample"]

    limit = budget_used["feature_voxels"] / min_batch
    target = [float(v) for v in median]
    topo, patch = layout(target)
    start = list(patch)
    shrinks = 0
    over_budget = False
    while per_sample(topo, patch) > limit:
        ratios = np.asarray(patch, np.float64) / np.asarray(median, np.float64)
        moved = False
        for a in np.argsort(-ratios, kind="stable"):
            floor = min(min_feature_map, median[a])
            t = patch[a] - 1
            while t >= floor:
                cand = list(target)
                cand[a] = float(t)
                c_topo, c_patch = layout(cand)
                if c_patch[a] < patch[a]:
                    target, topo, patch, moved = cand, c_topo, c_patch, True
                    break
                t -= 1
            if moved:
                break
        if not moved:
            over_budget = True
            break
        shrinks += 1

    depth = topo["depth"]
    feats = features_per_level(depth, base_features, max_features)
    per = per_sample(topo, patch)
    coverage = float(np.prod(np.asarray(patch, np.float64) / np.asarray(median, np.float64)))
    reasons["pool_sizes"] = {
        "why": (f"{depth - 1} poolings ({depth} levels): an axis is pooled while its feature "
                f"map stays >= {min_feature_map} and its spacing is < 2x the finest poolable "
                f"axis, at most {max_pools} times; total pooling per axis "
                f"{_fmt(topo['divisor'], 0)}."),
        "inputs": {"spacing": spacing, "patch_size": patch, **topo_args,
                   "pooled_levels_per_axis": [sum(p[a] == 2 for p in topo["pool_sizes"])
                                              for a in range(len(axes))]}}
    ones = [(lvl, a) for lvl, k in enumerate(topo["kernel_sizes"]) for a in range(len(k))
            if k[a] == 1]
    reasons["kernel_sizes"] = {
        "why": ("Kernel 3 on every axis at every level: no axis is >= 2x coarser than the finest."
                if not ones else
                f"Kernel 1 on an axis while its current spacing is >= 2x the finest (no "
                f"convolution across thick slices), else 3: kernel 1 at (level, axis) {ones}."),
        "inputs": {"spacing": spacing, "spacing_ratio": 2.0}}
    reasons["patch_size"] = {
        "why": (f"Patch {_fmt(patch, 0)}: the median shape {_fmt(median, 0)} rounded up to "
                f"multiples of the pooling {_fmt(topo['divisor'], 0)} ({start} before any "
                f"shrinking), shrunk {shrinks} times (largest axis relative to the median "
                f"first) to fit {per:.3g} feature voxels per sample x {min_batch} within the "
                f"budget {budget_used['feature_voxels']:.3g}; covers {coverage:.0%} of the "
                "median shape"
                + (" - OVER BUDGET: no axis can shrink further." if over_budget else ".")),
        "inputs": {"median_shape": median, "budget": budget_used, "shrinks": shrinks,
                   "feature_voxels_per_sample": per, "over_budget": over_budget}}
    reasons["features_per_level"] = {
        "why": (f"{base_features} x 2**level capped at {max_features}: {feats}."),
        "inputs": {"base_features": base_features, "max_features": max_features,
                   "depth": depth}}

    dataset_voxels = float(np.prod(median_full, dtype=np.float64)) * fp["num_cases"]
    patch_voxels = float(np.prod(patch, dtype=np.float64))
    by_budget = int(budget_used["feature_voxels"] // per)
    by_data = int(round(budget_used["max_dataset_fraction"] * dataset_voxels / patch_voxels))
    batch, limiter = min((by_budget, "the budget"), (by_data, "the data-set fraction"))
    cap = budget_used["max_batch_size"]
    if cap is not None and int(cap) < batch:
        batch, limiter = int(cap), "max_batch_size"
    if batch < min_batch:
        batch, limiter = min_batch, "the minimum batch size"
    reasons["batch_size"] = {
        "why": (f"Batch {batch}, set by {limiter}: the budget allows {by_budget}, "
                f"{budget_used['max_dataset_fraction']:.0%} of the data set's ~"
                f"{dataset_voxels:.3g} voxels allows {by_data}, minimum {min_batch}."),
        "inputs": {"by_budget": by_budget, "by_dataset_fraction": by_data,
                   "dataset_voxels": dataset_voxels, "patch_voxels": patch_voxels,
                   "min_batch_size": min_batch, "max_batch_size": budget_used["max_batch_size"]}}

    norm, norm_why, norm_inputs = _normalization(fp)
    reasons["normalization"] = {"why": norm_why, "inputs": {
        **norm_inputs, "foreground_intensity": fp.get("foreground_intensity")}}

    plan = {
        "configuration": configuration,
        "dataset": fp.get("name", ""),
        "dims": len(axes),
        "axes": axes,
        "slice_axis": slice_axis,
        "num_cases": fp["num_cases"],
        "modalities": list(fp["modalities"]),
        "num_channels": num_channels,
        "num_classes": num_classes,
        "target_spacing": spacing,
        "resampling": resampling_plan,
        "median_shape": median,
        "patch_size": patch,
        "batch_size": batch,
        "depth": depth,
        "pool_sizes": topo["pool_sizes"],
        "kernel_sizes": topo["kernel_sizes"],
        "divisor": topo["divisor"],
        "features_per_level": feats,
        "normalization": norm,
        "budget": budget_used,
        "settings": {"base_features": base_features, "max_features": max_features,
                     "max_pools": max_pools, "min_feature_map": min_feature_map,
                     "anisotropy_threshold": anisotropy_threshold},
        "over_budget": over_budget,
    }
    cost = estimate_cost(plan)
    plan["cost"] = cost
    plan["estimated_gflops_per_step"] = cost["estimated_gflops_per_step"]
    plan["estimated_activation_mib"] = cost["estimated_activation_mib"]
    reasons["cost"] = {
        "why": (f"Analytic U-Net cost at batch {batch}: {cost['feature_voxels']:.3g} feature "
                f"voxels ({cost['feature_voxels'] / budget_used['feature_voxels']:.0%} of the "
                f"budget), ~{cost['estimated_gflops_per_step']:.1f} GFLOP per training step, "
                f"~{cost['estimated_activation_mib']:.0f} MiB of float32 activations, "
                f"{cost['parameters'] / 1e6:.1f} M parameters."),
        "inputs": {"num_channels": num_channels, "num_classes": num_classes,
                   "tensors_per_conv": TENSORS_PER_CONV,
                   "bytes_per_activation": BYTES_PER_ACTIVATION}}
    plan["reasons"] = reasons
    return plan


def plan_3d(fp: dict, budget: dict | None = None, *, base_features: int = 32,
            max_features: int = 320, max_pools: int = 5, min_feature_map: int = 4,
            anisotropy_threshold: float = 3.0, num_classes: int | None = None) -> dict:
    """A 3D U-Net plan for a volumetric data set (rules in the module docstring).

    ``budget`` overrides fields of :data:`DEFAULT_BUDGET`; ``num_classes`` defaults to the
    labels found in the fingerprint (background included), else 2.
    """
    if fp["dims"] != 3:
        raise ValueError(f"plan_3d needs a 3D data set; {fp.get('name') or 'this one'} is "
                         f"{fp['dims']}D (use plan_2d)")
    return _plan(fp, [0, 1, 2], budget, "3d", None, base_features, max_features, max_pools,
                 min_feature_map, anisotropy_threshold, num_classes)


def plan_2d(fp: dict, budget: dict | None = None, slice_axis: int = 2, *,
            base_features: int = 32, max_features: int = 512, max_pools: int = 7,
            min_feature_map: int = 4, anisotropy_threshold: float = 3.0,
            num_classes: int | None = None) -> dict:
    """A 2D U-Net plan: the in-plane axes of volumes (``slice_axis`` dropped), or both
    axes of a 2D data set (``slice_axis`` ignored, recorded as None)."""
    if fp["dims"] == 3:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, not {slice_axis}")
        axes = [a for a in range(3) if a != slice_axis]
    elif fp["dims"] == 2:
        axes, slice_axis = [0, 1], None
    else:
        raise ValueError(f"{fp['dims']}D data set")
    return _plan(fp, axes, budget, "2d", slice_axis, base_features, max_features, max_pools,
                 min_feature_map, anisotropy_threshold, num_classes)


# --------------------------------------------------------------------------- checks, report


def check_plan(plan: dict) -> list[str]:
    """Raises ValueError listing every inconsistency of ``plan``; returns warnings
    (budget exceeded, small bottleneck, small batch, patch much smaller than the data)."""
    errors, warnings = [], []
    d, depth = plan["dims"], plan["depth"]
    patch, pools, kernels = plan["patch_size"], plan["pool_sizes"], plan["kernel_sizes"]
    if len(patch) != d or len(plan["target_spacing"]) != d or len(plan["median_shape"]) != d:
        errors.append(f"patch / spacing / median shape must have {d} entries")
    if min(plan["target_spacing"]) <= 0:
        errors.append(f"target spacing {plan['target_spacing']} must be positive")
    if depth != len(pools) + 1 or len(kernels) != depth or len(plan["features_per_level"]) != depth:
        errors.append(f"depth {depth} needs {depth - 1} pool sizes, {depth} kernel sizes and "
                      f"{depth} feature counts; got {len(pools)}, {len(kernels)}, "
                      f"{len(plan['features_per_level'])}")
    if any(len(p) != d or set(p) - {1, 2} for p in pools):
        errors.append(f"pool sizes must be 1 or 2 per axis: {pools}")
    if any(len(k) != d or set(k) - {1, 3} for k in kernels):
        errors.append(f"kernel sizes must be 1 or 3 per axis: {kernels}")
    if pools and any(2 not in p for p in pools):
        errors.append(f"a pooling level pools no axis: {pools}")
    divisor = [int(np.prod([p[a] for p in pools])) if pools else 1 for a in range(d)]
    if any(n % k for n, k in zip(patch, divisor)):
        errors.append(f"patch {patch} is not a multiple of the total pooling {divisor}")
    bottleneck = [n // k for n, k in zip(patch, divisor)]
    if min(bottleneck) < 1:
        errors.append(f"bottleneck feature map {bottleneck} is empty")
    feats = plan["features_per_level"]
    if any(b < a for a, b in zip(feats, feats[1:])) or min(feats) < 1:
        errors.append(f"features per level must be positive and non-decreasing: {feats}")
    if plan["batch_size"] < 1:
        errors.append(f"batch size {plan['batch_size']} < 1")
    if len(plan["normalization"]) != plan["num_channels"]:
        errors.append(f"{len(plan['normalization'])} normalisation entries for "
                      f"{plan['num_channels']} channels")
    missing = [k for k in DECISIONS if not plan.get("reasons", {}).get(k, {}).get("why")]
    if missing:
        errors.append(f"no reason for {missing}")
    if errors:
        raise ValueError("invalid plan: " + "; ".join(errors))

    cost = estimate_cost(plan)
    if cost["feature_voxels"] > plan["budget"]["feature_voxels"]:
        warnings.append(f"over budget: {cost['feature_voxels']:.3g} feature voxels > "
                        f"{plan['budget']['feature_voxels']:.3g}")
    small = [b for b, n in zip(bottleneck, patch) if b < plan["settings"]["min_feature_map"]
             and n >= plan["settings"]["min_feature_map"]]
    if small:
        warnings.append(f"bottleneck feature map {bottleneck} below "
                        f"{plan['settings']['min_feature_map']} on some axis")
    if plan["batch_size"] < 2:
        warnings.append(f"batch size {plan['batch_size']} < 2: batch statistics are noisy")
    cover = np.prod(np.asarray(patch, float) / np.asarray(plan["median_shape"], float))
    if cover < 0.25:
        warnings.append(f"patch covers {cover:.0%} of the median shape: little context "
                        "(nnU-Net would add a low-resolution stage)")
    return warnings


def plan_summary(plan: dict, reasons: bool = True) -> str:
    """A short text for a user: the plan, its cost, and (optionally) why."""
    name = f" for {plan['dataset']}" if plan.get("dataset") else ""
    where = (f", in-plane axes {plan['axes']} (slice axis {plan['slice_axis']})"
             if plan["slice_axis"] is not None else "")
    pools = " ".join("".join(map(str, p)) for p in plan["pool_sizes"]) or "none"
    kernels = " ".join("".join(map(str, k)) for k in plan["kernel_sizes"])
    norm = ", ".join(f"{m}: {n['scheme']}" for m, n in zip(plan["modalities"],
                                                          plan["normalization"]))
    lines = [
        f"{plan['configuration'].upper()} plan{name}{where}: {plan['num_cases']} cases, "
        f"{plan['num_channels']} channel(s), {plan['num_classes']} classes",
        f"  spacing {_fmt(plan['target_spacing'])} mm, median shape "
        f"{_fmt(plan['median_shape'], 0)}",
        f"  patch {_fmt(plan['patch_size'], 0)}, batch {plan['batch_size']}, "
        f"{plan['depth']} levels, features {plan['features_per_level']}",
        f"  pools {pools}; kernels {kernels}",
        f"  cost ~{plan['estimated_gflops_per_step']:.1f} GFLOP/step, "
        f"~{plan['estimated_activation_mib']:.0f} MiB activations, "
        f"{plan['cost']['parameters'] / 1e6:.1f} M params; normalisation {norm}",
    ]
    if reasons:
        lines += [f"  - {key}: {plan['reasons'][key]['why']}" for key in DECISIONS
                  if key in plan["reasons"]]
    return "\n".join(lines)
