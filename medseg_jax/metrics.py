"""Segmentation metrics: overlap, surface distances and volumes, in physical units.

The host-side metrics use numpy + ``scipy.ndimage`` and work on 2D or 3D binary
masks (any bool/int array; nonzero = foreground). ``dice_counts`` /
``dice_from_counts`` are the JAX counterpart used for validation inside training.

Conventions
-----------
* Surface: the boundary voxels of a mask are ``mask XOR binary_erosion(mask)``
  with the face-connected (cross) structuring element and the image border
  treated as background, so a mask touching the border has a surface there
  (MONAI's ``get_mask_edges`` convention).
* Distances are in physical units: ``spacing`` gives the voxel size per axis
  (default 1 per axis).
* Hausdorff at ``percentile=p`` is ``max(P_p(d(A->B)), P_p(d(B->A)))`` with
  numpy's linear-interpolated percentile (MONAI's definition). ASSD is the mean
  over the union of both directed distance sets.
* Normalised surface Dice (NSD) at tolerance ``tau`` mm is the share of surface
  voxels of both masks lying within ``tau`` of the other surface:
  ``(#{d(A->B) <= tau} + #{d(B->A) <= tau}) / (|S_A| + |S_B|)`` (MONAI's
  ``compute_surface_dice``; DeepMind weights surfels by area instead).
* Precision ``|A&B| / |A|``, recall ``|A&B| / |B|``, volume difference
  ``(|A| - |B|) * voxel volume`` in ml (3D only; nan for 2D images).
* Empty masks (A = prediction, B = reference):
  both empty -> every metric is nan: the class is absent, there is nothing to
  score (MONAI, DeepMind's surface-distance and nnU-Net all agree), except the
  volume difference, 0.
  Exactly one empty -> dice = iou = nsd = 0, hd = hd95 = assd = nan
  (undefined; MONAI and DeepMind return inf, which would make any mean inf),
  precision = 0 and recall = nan when only the reference is empty, and the
  reverse when only the prediction is empty.
  ``aggregate`` skips non-finite values and counts them in ``n_nan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medseg_jax import stats

DEFAULT_NSD_TOLERANCE_MM = 1.0


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binarise and check that both masks have the same shape."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: pred {pred.shape} vs gt {gt.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Return spacing as a tuple of ``ndim`` positive floats (default all ones)."""
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.ravel(spacing))
    if len(spacing) != ndim:
        raise ValueError(
            f"spacing has {len(spacing)} entries {spacing} but the masks have {ndim} dimensions"
        )
    if any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


# --------------------------------------------------------------------------- #
# Overlap metrics
# --------------------------------------------------------------------------- #


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|A&B| / (|A| + |B|); nan when both masks are empty."""
    pred, gt = _check_pair(pred, gt)
    return _ratio(2 * int(np.logical_and(pred, gt).sum()), int(pred.sum()) + int(gt.sum()))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |A&B| / |A|B|; nan when both masks are empty."""
    pred, gt = _check_pair(pred, gt)
    return _ratio(int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum()))


# --------------------------------------------------------------------------- #
# Surface distances
# --------------------------------------------------------------------------- #


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask: ``mask XOR erosion(mask)``.

    Erosion uses the face-connected (cross) structuring element with the image
    border treated as background, so foreground touching the border is surface
    (MONAI ``get_mask_edges`` convention).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask ^ eroded


def _bbox_slices(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by ``margin`` and clipped to the array."""
    slices = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=others))
        lo = max(int(idx[0]) - margin, 0)
        hi = min(int(idx[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def surface_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    crop: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(d(pred->gt), d(gt->pred))`` in physical units.

    Each array holds, for every surface voxel of the source mask (C order), the
    distance to the nearest surface voxel of the other mask. Both masks must be
    non-empty. With ``crop`` (the default) surfaces and distance transforms are
    computed only on the bounding box of the union of both masks plus a 1-voxel
    margin; the result is identical to the full-volume computation
    (``crop=False``) because every surface voxel lies inside the box, and the
    margin keeps the erosion at the box edge equal to the full-volume one.
    """
    pred, gt = _check_pair(pred, gt)
    sampling = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks")
    if crop:
        box = _bbox_slices(pred | gt, margin=1)
        pred, gt = pred[box], gt[box]
    surf_pred, surf_gt = surface(pred), surface(gt)
    dist_to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=sampling)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return dist_to_gt[surf_pred], dist_to_pred[surf_gt]


def _hd_from_distances(d_ab: np.ndarray, d_ba: np.ndarray, percentile: float) -> float:
    if percentile == 100:
        return float(max(d_ab.max(), d_ba.max()))
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def _empty_case(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """Surface-distance value (nan) when a mask is empty, else ``None``."""
    return float("nan") if not pred.any() or not gt.any() else None


def _nsd_from_distances(d_ab: np.ndarray, d_ba: np.ndarray, tolerance: float) -> float:
    close = int((d_ab <= tolerance).sum()) + int((d_ba <= tolerance).sum())
    return close / (d_ab.size + d_ba.size)


def normalized_surface_dice(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
) -> float:
    """Share of both surfaces within ``tolerance`` (mm) of the other surface.

    Both empty -> nan, exactly one empty -> 0.0.
    """
    pred, gt = _check_pair(pred, gt)
    _check_spacing(spacing, pred.ndim)
    if not tolerance >= 0:
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {tolerance}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred and has_gt):
        return 0.0 if has_pred or has_gt else float("nan")
    d_ab, d_ba = surface_distances(pred, gt, spacing)
    return _nsd_from_distances(d_ab, d_ba, tolerance)


def hausdorff(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    percentile: float = 100,
    crop: bool = True,
) -> float:
    """Symmetric (percentile) Hausdorff distance between mask surfaces.

    ``percentile=100`` is the classic Hausdorff distance; ``percentile=95``
    gives HD95 = max(P95(d(A->B)), P95(d(B->A))) as in MONAI. DeepMind's
    surface-distance library instead takes surfel-area-weighted percentiles
    and can differ slightly. Either mask empty -> nan. ``crop``
    only selects the (equivalent, faster) bounding-box computation.
    """
    pred, gt = _check_pair(pred, gt)
    _check_spacing(spacing, pred.ndim)
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    empty = _empty_case(pred, gt)
    if empty is not None:
        return empty
    d_ab, d_ba = surface_distances(pred, gt, spacing, crop=crop)
    return _hd_from_distances(d_ab, d_ba, percentile)


def average_surface_distance(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    crop: bool = True,
) -> float:
    """Average symmetric surface distance: mean over both directed distance sets.

    Either mask empty -> nan.
    """
    pred, gt = _check_pair(pred, gt)
    _check_spacing(spacing, pred.ndim)
    empty = _empty_case(pred, gt)
    if empty is not None:
        return empty
    d_ab, d_ba = surface_distances(pred, gt, spacing, crop=crop)
    return float(np.concatenate([d_ab, d_ba]).mean())


# --------------------------------------------------------------------------- #
# Per-case evaluation and aggregation
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Pair:
    """What every metric of one binary (prediction, reference) pair is computed from:
    voxel counts, the voxel volume, and the directed surface distances (None when a
    mask is empty)."""

    tp: int
    n_pred: int
    n_gt: int
    voxel_ml: float  # nan for 2D images
    d_ab: np.ndarray | None  # d(pred -> gt) per surface voxel of pred, mm
    d_ba: np.ndarray | None  # d(gt -> pred)
    nsd_tolerance: float

    @property
    def has_both(self) -> bool:
        return self.d_ab is not None


def _distance(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[Pair], float]:
    return lambda p: fn(p.d_ab, p.d_ba) if p.has_both else float("nan")


def _nsd(p: Pair) -> float:
    if not p.has_both:
        return 0.0 if p.n_pred or p.n_gt else float("nan")
    return _nsd_from_distances(p.d_ab, p.d_ba, p.nsd_tolerance)


@dataclasses.dataclass(frozen=True)
class Metric:
    """One entry of the registry: everything tables, CSV files and reports need."""

    name: str  # key in results and CSV column
    title: str  # table heading
    unit: str  # "" (a ratio), "mm" or "ml"
    higher_is_better: bool
    digits: int  # decimals in tables
    table: bool  # a column of the printed tables (every metric is in the CSV and JSON)
    empty: str  # the value when a mask is empty (documentation)
    fn: Callable[[Pair], float]


# The metric registry: to add a metric, add one entry (its function takes a Pair).
METRICS = (
    Metric("dice", "Dice", "", True, 3, True, "both empty nan; one empty 0",
           lambda p: _ratio(2 * p.tp, p.n_pred + p.n_gt)),
    Metric("iou", "IoU", "", True, 3, True, "both empty nan; one empty 0",
           lambda p: _ratio(p.tp, p.n_pred + p.n_gt - p.tp)),
    Metric("hd", "HD (mm)", "mm", False, 2, True, "either empty nan",
           _distance(lambda a, b: _hd_from_distances(a, b, 100))),
    Metric("hd95", "HD95 (mm)", "mm", False, 2, True, "either empty nan",
           _distance(lambda a, b: _hd_from_distances(a, b, 95))),
    Metric("assd", "ASSD (mm)", "mm", False, 2, True, "either empty nan",
           _distance(lambda a, b: float(np.concatenate([a, b]).mean()))),
    Metric("nsd", "NSD", "", True, 3, True, "both empty nan; one empty 0", _nsd),
    Metric("precision", "precision", "", True, 3, False,
           "both empty nan; only the reference empty 0; only the prediction empty nan",
           lambda p: _ratio(p.tp, p.n_pred)),
    Metric("recall", "recall", "", True, 3, False,
           "both empty nan; only the reference empty nan; only the prediction empty 0",
           lambda p: _ratio(p.tp, p.n_gt)),
    Metric("vol_diff_ml", "volume difference (ml)", "ml", False, 2, False,
           "both empty 0; 2D images nan", lambda p: (p.n_pred - p.n_gt) * p.voxel_ml),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
TABLE_METRICS = tuple(m for m in METRICS if m.table)
BY_NAME = {m.name: m for m in METRICS}


def binary_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
    crop: bool = True,
) -> dict[str, float]:
    """Every metric of the registry (``METRICS``) for one binary pair (one distance pass).

    ``crop=False`` runs the distance transforms on the whole volume (same values,
    slower; for comparison).
    """
    pred, gt = _check_pair(pred, gt)  # binarised once for both passes
    sampling = _check_spacing(spacing, pred.ndim)
    tp, n_pred, n_gt = int(np.logical_and(pred, gt).sum()), int(pred.sum()), int(gt.sum())
    voxel_ml = float(np.prod(sampling)) / 1000.0 if pred.ndim == 3 else float("nan")
    d_ab = d_ba = None
    if n_pred and n_gt:
        d_ab, d_ba = surface_distances(pred, gt, spacing, crop=crop)
    pair = Pair(tp, n_pred, n_gt, voxel_ml, d_ab, d_ba, nsd_tolerance)
    return {m.name: m.fn(pair) for m in METRICS}


def evaluate_case(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Sequence[float] | None,
    labels: dict[int, str],
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
    annotated: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics for each foreground label of one case: ``{name: {metric: value}}``.

    ``labels`` maps label value -> class name; value 0 (background) is skipped.
    ``annotated`` (partial labels): the label values annotated in this case; the others
    are not scored at all (they are left out of the result, and ``aggregate`` counts
    them as "not annotated").
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(
            f"pred and gt label maps differ in shape: pred {pred_labels.shape} "
            f"vs gt {gt_labels.shape}"
        )
    _check_spacing(spacing, gt_labels.ndim)
    return {
        name: binary_metrics(pred_labels == value, gt_labels == value, spacing, nsd_tolerance)
        for value, name in labels.items()
        if int(value) != 0 and (annotated is None or int(value) in annotated)
    }


def aggregate(
    per_case: list[dict[str, dict[str, float]]],
    bootstrap_samples: int = stats.DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per class, per metric over finite values: mean, std (ddof=0), median,
    95% bootstrap interval of the mean (``ci_low``, ``ci_high``), n, n_nan.

    Non-finite values (nan, inf) are skipped and counted in ``n_nan``; with no
    finite value mean/std/median are nan, and with fewer than two the interval
    is nan. The bootstrap is seeded, so the same cases give the same interval.
    Cases in which a class was not annotated (partial labels: the class is absent from
    the case's metrics) are counted in ``n_not_annotated``, present only when some are.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for case in per_case:
        for cls, metrics in case.items():
            for metric, value in metrics.items():
                values.setdefault(cls, {}).setdefault(metric, []).append(float(value))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for cls, metrics in values.items():
        out[cls] = {}
        missing = sum(cls not in case for case in per_case)
        for metric, vals in metrics.items():
            arr = np.asarray(vals, dtype=np.float64)
            finite = arr[np.isfinite(arr)]
            has = finite.size > 0
            lo, hi = stats.bootstrap_ci(finite, samples=bootstrap_samples, seed=seed)
            out[cls][metric] = {
                "mean": float(finite.mean()) if has else float("nan"),
                "std": float(finite.std()) if has else float("nan"),
                "median": float(np.median(finite)) if has else float("nan"),
                "ci_low": lo,
                "ci_high": hi,
                "n": int(finite.size),
                "n_nan": int(arr.size - finite.size),
            }
            if missing:
                out[cls][metric]["n_not_annotated"] = int(missing)
    return out


# --------------------------------------------------------------------------- #
# JAX: Dice counts for validation inside training
# --------------------------------------------------------------------------- #


def dice_counts(
    pred_labels: jax.Array,
    labels: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
    annotated: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-class (intersection, pred_sum, gt_sum), float32 of shape (num_classes,).

    Summed over the whole batch. ``pred_labels`` and ``labels`` are integer
    (B, *spatial); ``mask`` is an optional (B,) weight (1.0 real sample, 0.0
    padding); ``annotated`` an optional (B, K) weight: a class counts only in the
    samples where it is annotated (partial labels). Label values outside [0,
    num_classes) count for no class. Jittable; sum the counts over the validation
    set, then ``dice_from_counts``.
    """
    if pred_labels.shape != labels.shape:
        raise ValueError(
            f"pred_labels and labels shapes differ: {pred_labels.shape} vs {labels.shape}"
        )
    pred_oh = jax.nn.one_hot(pred_labels, num_classes, dtype=jnp.float32)
    gt_oh = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if mask is not None:
        w = jnp.asarray(mask, jnp.float32).reshape((-1,) + (1,) * (gt_oh.ndim - 1))
        pred_oh, gt_oh = pred_oh * w, gt_oh * w
    if annotated is not None:
        a = jnp.asarray(annotated, jnp.float32)
        a = a.reshape((a.shape[0],) + (1,) * (gt_oh.ndim - 2) + (num_classes,))
        pred_oh, gt_oh = pred_oh * a, gt_oh * a
    axes = tuple(range(gt_oh.ndim - 1))
    inter = jnp.sum(jnp.minimum(pred_oh, gt_oh), axis=axes)  # = w where both hit the class
    return inter, jnp.sum(pred_oh, axis=axes), jnp.sum(gt_oh, axis=axes)


def dice_from_counts(inter: np.ndarray, pred_sum: np.ndarray, gt_sum: np.ndarray) -> np.ndarray:
    """Per-class Dice 2*inter / (pred_sum + gt_sum); nan where both are empty
    (as ``dice``)."""
    inter = np.asarray(inter, dtype=np.float64)
    total = np.asarray(pred_sum, dtype=np.float64) + np.asarray(gt_sum, dtype=np.float64)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2.0 * inter / safe, np.nan)
