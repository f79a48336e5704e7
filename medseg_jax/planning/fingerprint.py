"""The data-set fingerprint a plan is made from: per-case spacing, shape, classes and
foreground intensities of the training cases, and their statistics.

``case_record`` describes one case from its arrays (or, for
``planning.dataset_fingerprint``, from its NIfTI header alone); ``fingerprint``
summarises the records.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

_FOREGROUND_SAMPLES = 10_000  # per case and channel, as nnU-Net


def case_record(spacing: Sequence[float], shape: Sequence[int], label: np.ndarray | None = None,
                modalities: Sequence[str] = ("MRI",), image: np.ndarray | None = None,
                num_samples: int = _FOREGROUND_SAMPLES, seed: int = 0) -> dict:
    """One training case as :func:`fingerprint` takes it.

    ``spacing`` (mm) and ``shape`` (voxels) per spatial axis, RAS order for volumes.
    ``label`` (the spatial shape, integer values) gives ``class_voxels``; ``image``
    ((C, *shape) or, one channel, ``shape``) with ``label`` gives a seeded sample of
    ``num_samples`` foreground intensities per channel (with replacement).
    """
    spacing = tuple(float(s) for s in spacing)
    shape = tuple(int(n) for n in shape)
    if len(spacing) != len(shape) or len(shape) not in (2, 3):
        raise ValueError(f"spacing {spacing} and shape {shape} must both have 2 or 3 entries")
    if min(spacing) <= 0 or not all(map(math.isfinite, spacing)) or min(shape) < 1:
        raise ValueError(f"spacing {spacing} must be positive and finite, shape {shape} >= 1")
    record: dict[str, Any] = {"spacing": spacing, "shape": shape,
                              "modalities": tuple(str(m) for m in modalities)}
    if label is not None:
        label = np.asarray(label)
        if label.shape != shape:
            raise ValueError(f"label shape {label.shape} != case shape {shape}")
        values = np.rint(label).astype(np.int64)
        if not np.array_equal(values, label):
            raise ValueError("label holds non-integer values")
        classes, counts = np.unique(values, return_counts=True)
        record["class_voxels"] = {int(c): int(n) for c, n in zip(classes, counts)}
    if image is not None:
        if label is None:
            raise ValueError("foreground intensities need the label as well as the image")
        image = np.asarray(image)
        if image.shape == shape:
            image = image[None]
        if image.shape[1:] != shape or image.shape[0] != len(record["modalities"]):
            raise ValueError(f"image shape {image.shape} is not (C={len(record['modalities'])}, "
                             f"*{shape})")
        fg = values > 0
        rng = np.random.default_rng(seed)
        samples = []
        for channel in image:
            pixels = channel[fg].astype(np.float64)
            samples.append(rng.choice(pixels, num_samples).tolist() if pixels.size else [])
        record["foreground_intensity"] = samples
    return record


def _percentiles(values: np.ndarray, qs=(10, 50, 90)) -> dict[str, list[float]]:
    return {f"p{q}": [float(v) for v in np.percentile(values, q, axis=0)] for q in qs}


def fingerprint(cases: Sequence[dict], name: str = "") -> dict:
    """The data-set fingerprint of the training cases' records (see :func:`case_record`)."""
    if not cases:
        raise ValueError("fingerprint of no cases")
    dims = len(cases[0]["spacing"])
    modalities = tuple(cases[0]["modalities"])
    for i, c in enumerate(cases):
        if len(c["spacing"]) != dims or len(c["shape"]) != dims:
            raise ValueError(f"case {i}: {len(c['spacing'])}-D spacing / {len(c['shape'])}-D "
                             f"shape in a {dims}-D data set")
        if len(c["modalities"]) != len(modalities):
            raise ValueError(f"case {i}: {len(c['modalities'])} channels, not "
                             f"{len(modalities)}")
    if any(tuple(c["modalities"]) != modalities for c in cases):  # several tasks
        modalities = tuple("/".join(sorted({str(c["modalities"][ch]) for c in cases}))
                           for ch in range(len(modalities)))
    spacings = np.array([c["spacing"] for c in cases], np.float64)
    shapes = np.array([c["shape"] for c in cases], np.int64)
    if (spacings <= 0).any() or not np.isfinite(spacings).all() or (shapes < 1).any():
        raise ValueError("spacings must be positive and finite, shapes >= 1")

    labelled = [c["class_voxels"] for c in cases if c.get("class_voxels")]
    labels, share = None, None
    if labelled:
        totals: dict[int, int] = {}
        for cv in labelled:
            for k, n in cv.items():
                totals[int(k)] = totals.get(int(k), 0) + int(n)
        labels = sorted(totals)
        voxels = sum(totals.values())
        share = {k: totals[k] / voxels for k in labels}

    intensity = None
    sampled = [c["foreground_intensity"] for c in cases if c.get("foreground_intensity")]
    if sampled:
        intensity = []
        for ch in range(len(modalities)):
            v = np.concatenate([np.asarray(s[ch], np.float64) for s in sampled])
            if v.size == 0:
                intensity.append(None)
                continue
            lo, med, hi = np.percentile(v, [0.5, 50, 99.5])
            clipped = np.clip(v, lo, hi)
            intensity.append({
                "num_samples": int(v.size), "min": float(v.min()), "max": float(v.max()),
                "median": float(med), "p00_5": float(lo), "p99_5": float(hi),
                "mean": float(v.mean()), "std": float(v.std()),
                "clipped_mean": float(clipped.mean()), "clipped_std": float(clipped.std())})

    return {
        "name": name,
        "dims": dims,
        "num_cases": len(cases),
        "modalities": list(modalities),
        "spacings": spacings.tolist(),
        "shapes": shapes.tolist(),
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "spacing_percentiles": _percentiles(spacings),
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "shape_percentiles": _percentiles(shapes),
        "num_voxels": int(np.prod(shapes, axis=1, dtype=np.float64).sum()),
        "labels": labels,
        "num_labelled_cases": len(labelled),
        "class_voxel_share": share,
        "foreground_intensity": intensity,
    }


