"""nnU-Net's resampling and crop to the non-zero region (``data.resampling="nnunet"``,
``data.crop_nonzero``).

- Images: cubic splines (order 3, no anti-aliasing, clipped to the input's range).
- Labels: each class's mask interpolated linearly (one-hot, order 1), then the argmax,
  so thin structures that nearest-neighbour drops survive a shrink.
- Class probabilities (predictions back to the case grid): linear, per class.
- Anisotropic cases (largest / smallest spacing > 3, of the case or of the target, with
  one coarsest axis): the in-plane axes first as above, then the coarse axis alone with
  order 0, so slices far apart are never blended (``separate_axis``).
- ``nonzero_box``: the bounding box of the voxels non-zero in any channel (air and
  padding outside it are dropped before resampling; predictions are put back into the
  full grid as background).
The grid convention is pixel centres aligned (``grid_mode``), as skimage's ``resize``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3.0  # nnU-Net's: largest / smallest spacing above it -> separate axis
IMAGE_ORDER = 3
LABEL_ORDER = 1  # per class (one-hot), then the argmax
PROBS_ORDER = 1
AXIS_ORDER = 0  # along the coarse axis of anisotropic cases


def separate_axis(spacing: Sequence[float], target: Sequence[float],
                  threshold: float = ANISO_THRESHOLD) -> dict:
    """Whether a case at ``spacing`` resampled to ``target`` (mm) takes its coarse axis
    separately, as nnU-Net decides it (``determine_do_sep_z_and_axis``): the case's own
    spacing is tested first, then the target's; an axis is "coarse" when it alone has
    the largest spacing. Returns {"separate_z", "lowres_axis", "reason"}."""
    for name, values in (("case", spacing), ("target", target)):
        sp = np.asarray(values, np.float64)
        if len(sp) != 3:
            return {"separate_z": False, "lowres_axis": None,
                    "reason": f"{len(sp)}D: no axis to take separately"}
        ratio = float(sp.max() / sp.min())
        if ratio > threshold:
            axes = np.flatnonzero(sp == sp.max())
            if len(axes) == 1:
                return {"separate_z": True, "lowres_axis": int(axes[0]),
                        "reason": f"{name} spacing ratio {ratio:.2f} > {threshold:g}"}
            return {"separate_z": False, "lowres_axis": None,
                    "reason": f"{name} spacing ratio {ratio:.2f} > {threshold:g}, but "
                              f"{len(axes)} axes share the largest spacing"}
    ratios = [float(np.max(v) / np.min(v)) for v in (spacing, target)]
    return {"separate_z": False, "lowres_axis": None,
            "reason": f"spacing ratio {ratios[0]:.2f} (case), {ratios[1]:.2f} (target) "
                      f"<= {threshold:g}"}


def _zoom(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``array`` (spatial axes only) resized to ``shape``; an axis already of its size is
    left exactly as it is (the spline passes through its samples)."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [o / i for o, i in zip(shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True,
                       prefilter=order > 1)
    if out.shape != tuple(shape):
        raise AssertionError(f"zoom produced {out.shape}, wanted {tuple(shape)}")
    return out


def _along_axis(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Order 0 along ``axis`` (pixel centres aligned): each output slice is a copy of
    the input slice nearest to its centre."""
    n = array.shape[axis]
    if n == size:
        return array
    index = np.minimum(np.floor((np.arange(size) + 0.5) * (n / size)).astype(int), n - 1)
    return np.take(array, index, axis=axis)


def _stages(shape: Sequence[int], new_shape: Sequence[int], axis: int | None):
    """The grid after the first stage: all axes, or (separate axis) all but ``axis``."""
    if axis is None:
        return tuple(new_shape)
    return tuple(n if a == axis else s for a, (n, s) in enumerate(zip(shape, new_shape)))


def resize_channels(array: np.ndarray, new_shape: Sequence[int], order: int,
                    axis: int | None = None) -> np.ndarray:
    """(*spatial, C) float -> (*new_shape, C) float32: each channel interpolated with
    ``order`` (clipped to its input range), the ``axis`` of an anisotropic case then
    with order 0."""
    spatial = array.shape[:-1]
    first = _stages(spatial, new_shape, axis)
    out = np.empty((*new_shape, array.shape[-1]), np.float32)
    for c in range(array.shape[-1]):
        x = np.asarray(array[..., c], np.float32)
        y = _zoom(x, first, order)
        if order > 1 and y.size:
            y = np.clip(y, x.min(), x.max())
        out[..., c] = y if axis is None else _along_axis(y, new_shape[axis], axis)
    return out


def resize_label(label: np.ndarray, new_shape: Sequence[int],
                 axis: int | None = None) -> np.ndarray:
    """(*spatial) class indices -> (*new_shape) uint8: the argmax of each class's mask
    interpolated linearly (ties: the higher class, as nnU-Net's threshold at 0.5 keeps a
    one-voxel structure halved by a shrink), the ``axis`` of an anisotropic case
    then with order 0."""
    if tuple(label.shape) == tuple(new_shape):
        return label.astype(np.uint8)
    first = _stages(label.shape, new_shape, axis)
    best = np.full(first, -1.0, np.float32)
    out = np.zeros(first, np.uint8)
    for c in np.unique(label):
        mask = _zoom((label == c).astype(np.float32), first, LABEL_ORDER)
        wins = mask >= best
        out[wins], best[wins] = c, mask[wins]
    return out if axis is None else _along_axis(out, new_shape[axis], axis)


# --------------------------------------------------------------------------
# Crop to the non-zero region.


def nonzero_box(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """((start, stop) per spatial axis): the bounding box of the voxels of a (C, *spatial)
    image that are non-zero in any channel (nnU-Net's ``crop_to_nonzero``); the whole
    image where every voxel is zero."""
    mask = np.any(image != 0, axis=0)
    box = []
    for a in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, mask.shape[a]))
    return tuple(box)


def crop(array: np.ndarray, box, lead: int = 0) -> np.ndarray:
    """``array`` cut to ``box`` on its spatial axes, which start after ``lead`` axes."""
    return array[(slice(None),) * lead + tuple(slice(lo, hi) for lo, hi in box)]


def uncrop(array: np.ndarray, box, shape: Sequence[int], fill) -> np.ndarray:
    """The inverse of ``crop`` (``lead=0``): ``array`` (*box size, ...) put back into a
    grid of spatial ``shape``, ``fill`` (a value or a per-trailing-entry vector) outside
    the box."""
    out = np.empty((*shape, *array.shape[len(shape):]), array.dtype)
    out[...] = fill
    out[tuple(slice(lo, hi) for lo, hi in box)] = array
    return out
