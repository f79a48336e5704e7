"""Intensity normalisation, resampling and the geometry between case and network input.

Two ways from a case to network samples (``data.in_plane``):
- ``resize`` (2D models): each slice of a volume (along ``slice_axis``), or the
  2D image, is resized to ``image_size`` (``to_samples`` / ``from_samples``);
- ``spacing`` (2D models, as nnU-Net's 2D configuration) and every 3D model:
  the case is resampled to a target voxel size in mm (in plane only for 2D
  models: the slice axis keeps its own spacing), trained on random patches of
  ``image_size`` and predicted with a sliding window (``volume_patch`` gives the
  window in volume coordinates, a 1 on the slice axis for 2D models).
Predicted class probabilities are resampled back to the case's own grid before
the argmax, so metrics are computed on whole volumes in the case geometry.

How (``data.resampling``): "simple" resizes images linearly and labels with
nearest-neighbour, the same on every axis; "nnunet" follows nnU-Net (``resampling.py``:
cubic images, one-hot linear labels, the coarse axis of anisotropic cases separately
with order 0). ``data.crop_nonzero`` first cuts each case to the bounding box of its
non-zero voxels; predictions are put back into the full grid as background.

Normalisation follows nnU-Net's conventions, chosen by the channel's modality:
- CT: clip to the 0.5-99.5 percentiles of the foreground intensities of the
  training set, then z-score with the mean / std of those clipped intensities
  (data-set statistics, so Hounsfield units keep their meaning across cases);
- anything else (MRI, ultrasound, ...): z-score per case and channel.
Statistics are computed in float64, so any intensities float32 holds normalise; a
result that is not finite is refused, naming the case's file.

``check_case_memory`` estimates from a case's header alone what preprocessing (and
evaluating) it takes, and refuses a case over ``config.data.max_case_gib`` (0: half of
the machine's memory) before any of it is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from medseg_jax.data import resampling

if TYPE_CHECKING:
    from medseg_jax.data.decathlon import CaseRef, DatasetInfo
    from medseg_jax.data.nifti import Case


_MAX_VOXELS_PER_CASE = 100_000  # foreground samples per case for CT statistics


def is_ct(modality: str) -> bool:
    return modality.strip().upper() == "CT"


def ct_statistics(images: list[np.ndarray], labels: list[np.ndarray], channel: int) -> dict:
    """Data-set statistics of one CT channel over the foreground of training cases."""
    values = []
    for image, label in zip(images, labels):
        fg = image[channel][label > 0]
        if fg.size > _MAX_VOXELS_PER_CASE:  # deterministic thinning
            fg = fg[:: fg.size // _MAX_VOXELS_PER_CASE + 1]
        values.append(fg)
    values = np.concatenate(values) if values else np.zeros(0, np.float32)
    if values.size == 0:  # no foreground anywhere: fall back to all voxels
        values = np.concatenate([im[channel].ravel() for im in images])
    lo, hi = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, lo, hi).astype(np.float64)  # float32 squares overflow
    return {"scheme": "ct", "lo": float(lo), "hi": float(hi),
            "mean": float(clipped.mean()), "std": float(max(clipped.std(), 1e-8))}


_CHUNK = 1 << 20  # voxels per float64 block of the statistics


def _moments(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of ``x``. The mean is summed in float64; the std in
    float32 (fast) unless its sum of squares overflows (intensities from about 1e19 on),
    then in float64 a block at a time."""
    flat = x.reshape(-1)
    if not flat.size:
        return 0.0, 0.0
    mean = float(flat.mean(dtype=np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        std = float(flat.std())
    if np.isfinite(std):
        return mean, std
    squares = 0.0
    for start in range(0, flat.size, _CHUNK):
        d = flat[start:start + _CHUNK].astype(np.float64) - mean
        squares += float(np.dot(d, d))
    return mean, float(np.sqrt(squares / flat.size))


def intensity_plan(modalities: tuple[str, ...], images: list[np.ndarray],
                   labels: list[np.ndarray]) -> list[dict]:
    """One normalisation entry per channel, from the training cases of one task."""
    return [ct_statistics(images, labels, c) if is_ct(m) else {"scheme": "zscore"}
            for c, m in enumerate(modalities)]


def normalize(image: np.ndarray, plan: list[dict], where: str = "image") -> np.ndarray:
    """(C, *spatial) raw intensities -> float32 normalised, per the channel plan.

    In float32, as earlier versions computed it (the same bits, so runs and caches made
    with them are reproduced), wherever that gives a finite result; where float32
    statistics overflow (intensities near 1e19 and above), the statistics are computed in
    float64 instead, so any float32 intensities work. A result that float32 cannot hold
    (non-finite), or a non-constant channel flattened to one value, is a ValueError naming
    ``where`` (the case's file)."""
    if len(plan) != image.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channels, the plan {len(plan)}")
    out = np.empty(image.shape, np.float32)
    for c, entry in enumerate(plan):
        if _normalize_float32(image[c], entry, out[c]):
            continue
        x = out[c]
        raw_lo, raw_hi = (float(image[c].min()), float(image[c].max())) if x.size else (0, 0)
        if entry["scheme"] == "ct":
            np.clip(image[c], entry["lo"], entry["hi"], out=x, casting="unsafe")
            mean, std = float(entry["mean"]), float(entry["std"])
        else:
            x[...] = image[c]
            mean, std = _moments(x)
        scale = 1.0 / max(std, 1e-8)
        with np.errstate(over="ignore", invalid="ignore"):
            if raw_hi - raw_lo < np.finfo(np.float32).max:  # x - mean fits float32
                x -= np.float32(mean)
                x *= np.float32(scale)
            else:  # a range wider than float32 holds: the std is as wide, scale first
                x *= np.float32(scale)
                x -= np.float32(mean * scale)
        _check_normalised(x, (raw_lo, raw_hi), (mean, std), f"{where}: channel {c}",
                          zscore=entry["scheme"] != "ct")
    return out


def _normalize_float32(channel: np.ndarray, entry: dict, out: np.ndarray) -> bool:
    """The channel normalised with float32 statistics into ``out``; False (``out`` to be
    overwritten) where they overflow: a non-finite result, or a non-constant channel
    flattened to one value by an infinite std."""
    x = channel.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if entry["scheme"] == "ct":
            y = (np.clip(x, entry["lo"], entry["hi"]) - entry["mean"]) / entry["std"]
        else:
            y = (x - x.mean()) / max(float(x.std()), 1e-8)
    if not y.size:
        return True
    lo, hi = float(y.min()), float(y.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return False
    if entry["scheme"] != "ct" and lo == hi and float(x.min()) < float(x.max()):
        return False
    out[...] = y
    return True


def _check_normalised(x: np.ndarray, raw: tuple[float, float], stats: tuple[float, float],
                      where: str, zscore: bool) -> None:
    if not x.size:
        return
    lo, hi = float(x.min()), float(x.max())
    what = (f"intensities {raw[0]:.3g} .. {raw[1]:.3g}, mean {stats[0]:.3g}, "
            f"std {stats[1]:.3g}")
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{where}: normalisation gives non-finite values ({what}); rescale "
                         "the image")
    if zscore and lo == hi and raw[0] < raw[1]:
        raise ValueError(f"{where}: normalisation flattens a non-constant image to one "
                         f"value ({what}); rescale the image")


def rescale_01(image: np.ndarray) -> np.ndarray:
    """Min-max rescales each channel of a (C, *spatial) image to [0, 1]."""
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        lo, hi = float(image[c].min()), float(image[c].max())
        out[c] = (image[c] - lo) / (hi - lo) if hi > lo else 0.0
    return out


def resize(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resizes the leading ``len(shape)`` axes of ``array``; trailing axes kept.

    Pixel edges are aligned (``grid_mode=True``), as ``jax.image.resize`` does.
    For order > 0 an axis shrunk by more than 1.5x is Gaussian-smoothed first
    (anti-aliasing); order 0 (labels) is plain nearest-neighbour.
    """
    in_shape = array.shape[: len(shape)]
    if tuple(in_shape) == tuple(shape):
        return array
    factors = [o / i for o, i in zip(shape, in_shape)] + [1.0] * (array.ndim - len(shape))
    if order > 0:
        sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) if f < 1 / 1.5 else 0.0 for f in factors]
        if any(sigma):
            array = ndimage.gaussian_filter(array.astype(np.float32), sigma, mode="nearest")
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True,
                       prefilter=False)
    # zoom rounds the output shape; make it exact.
    if out.shape[: len(shape)] != tuple(shape):
        raise AssertionError(f"resize produced {out.shape}, wanted {shape}")
    return out


def _resize_image(array: np.ndarray, shape: tuple[int, ...], method: str,
                  axis: int | None = None) -> np.ndarray:
    """Channels-last ``array`` onto ``shape``: linear ("simple") or as nnU-Net."""
    if method == "nnunet":
        return resampling.resize_channels(array, shape, resampling.IMAGE_ORDER, axis)
    return resize(array, shape, order=1)


def _resize_label(label: np.ndarray, shape: tuple[int, ...], method: str,
                  axis: int | None = None) -> np.ndarray:
    if method == "nnunet":
        return resampling.resize_label(label, shape, axis)
    return resize(label, shape, order=0)


def _resize_probs(probs: np.ndarray, shape: tuple[int, ...], method: str,
                  axis: int | None = None) -> np.ndarray:
    if method == "nnunet":
        return resampling.resize_channels(probs, shape, resampling.PROBS_ORDER, axis)
    return resize(probs, shape, order=1)


def to_samples(image: np.ndarray, label: np.ndarray | None, image_size: tuple[int, ...],
               slice_axis: int, method: str = "simple") -> tuple[np.ndarray, np.ndarray | None]:
    """Case arrays -> network samples.

    image (C, *spatial), label (*spatial) -> images (N, *image_size, C) float32,
    labels (N, *image_size) uint8. With a 2D ``image_size`` a 3D case gives one
    sample per slice along ``slice_axis`` and a 2D case one sample; with a 3D
    ``image_size`` a 3D case gives one sample.
    """
    spatial = image.shape[1:]
    chan_last = np.moveaxis(image, 0, -1)
    if len(image_size) == len(spatial):
        imgs = _resize_image(chan_last, image_size, method)[None]
        labs = None if label is None else _resize_label(label, image_size, method)[None]
        return imgs.astype(np.float32), None if labs is None else labs.astype(np.uint8)
    if len(image_size) != 2 or len(spatial) != 3:
        raise ValueError(
            f"cannot make {len(image_size)}D samples of size {tuple(image_size)} from a "
            f"{len(spatial)}D image of shape {spatial}")
    slices = np.moveaxis(chan_last, slice_axis, 0)
    imgs = np.stack([_resize_image(s, image_size, method) for s in slices]).astype(np.float32)
    labs = None
    if label is not None:
        lab_slices = np.moveaxis(label, slice_axis, 0)
        labs = np.stack([_resize_label(s, image_size, method)
                         for s in lab_slices]).astype(np.uint8)
    return imgs, labs


def from_samples(probs: np.ndarray, spatial_shape: tuple[int, ...], slice_axis: int,
                 method: str = "simple") -> np.ndarray:
    """Predicted probabilities (N, *image_size, K) -> probabilities (*spatial_shape, K).

    Each sample's probabilities are resized (linearly) back to the case grid;
    take the argmax afterwards for the label map.
    """
    n_img = probs.ndim - 2
    if n_img == len(spatial_shape):
        return _resize_probs(probs[0], spatial_shape, method)
    in_plane = tuple(s for a, s in enumerate(spatial_shape) if a != slice_axis)
    return np.stack([_resize_probs(p, in_plane, method) for p in probs], axis=slice_axis)


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...],
                    target_spacing: tuple[float, ...]) -> tuple[int, ...]:
    """Grid size after resampling ``shape`` from ``spacing`` to ``target_spacing`` (mm)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample(image: np.ndarray, label: np.ndarray | None, spacing: tuple[float, ...],
             target_spacing: tuple[float, ...], method: str = "simple"
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """(C, *spatial) image and label onto a grid of ``target_spacing``: "simple" linear
    and nearest-neighbour; "nnunet" as ``resampling.py`` (separate coarse axis where
    ``resampling.separate_axis`` says).

    Returns the image channels-last, (*new_spatial, C), as the network takes it.
    """
    shape = resampled_shape(image.shape[1:], spacing, target_spacing)
    axis = (resampling.separate_axis(spacing, target_spacing)["lowres_axis"]
            if method == "nnunet" else None)
    out = _resize_image(np.moveaxis(image, 0, -1), shape, method, axis).astype(np.float32)
    lab = (None if label is None else
           _resize_label(label, shape, method, axis).astype(np.uint8))
    return out, lab


def volume_patch(image_size: tuple[int, ...], ndim: int, slice_axis: int) -> tuple[int, ...]:
    """The network input ``image_size`` as a box in an ``ndim``-D volume.

    A 2D input in a 3D volume is one slice thick along ``slice_axis``; otherwise the
    box is ``image_size`` itself. Reshaping such a box to ``image_size`` (plus
    channels) drops the unit axis and keeps the order of the others.
    """
    image_size = tuple(int(n) for n in image_size)
    if len(image_size) == ndim:
        return image_size
    if len(image_size) == 2 and ndim == 3:
        return image_size[:slice_axis] + (1,) + image_size[slice_axis:]
    raise ValueError(
        f"cannot take {len(image_size)}D inputs of size {image_size} from a {ndim}D volume")


def case_target_spacing(spacing: tuple[float, ...], target: tuple[float, ...],
                        slice_axis: int) -> tuple[float, ...]:
    """The voxel size (mm) one case is resampled to.

    ``target`` has one entry per axis of the case, or (2D models on volumes) one per
    in-plane axis, in which case the slice axis keeps the case's own ``spacing``.
    """
    target = tuple(float(t) for t in target)
    if len(target) == len(spacing):
        return target
    if len(target) == 2 and len(spacing) == 3:
        return target[:slice_axis] + (float(spacing[slice_axis]),) + target[slice_axis:]
    raise ValueError(f"target spacing {target} does not fit a case with spacing {spacing}")


def pad_to(array: np.ndarray, shape: tuple[int, ...], value: float = 0.0) -> np.ndarray:
    """Pads the leading axes of ``array`` at the end up to ``shape`` (never crops)."""
    pads = [(0, max(0, s - n)) for n, s in zip(array.shape, shape)]
    pads += [(0, 0)] * (array.ndim - len(shape))
    if not any(p for _, p in pads):
        return array
    return np.pad(array, pads, constant_values=value)


def tiles(image: np.ndarray, label: np.ndarray, patch: tuple[int, ...]):
    """Non-overlapping patches covering a channels-last volume (padded at the end).

    Every voxel lies in exactly one tile, so Dice counts summed over the tiles are
    the counts of the whole (resampled) volume; padding is background. Returns
    (tiles (N, *patch, C), labels (N, *patch)).
    """
    full = tuple(-(-n // p) * p for n, p in zip(label.shape, patch))
    image = pad_to(image, full, float(image.min()))
    label = pad_to(label, full, 0)
    grid = [range(0, n, p) for n, p in zip(full, patch)]
    starts = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(patch))
    boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in starts]
    return (np.stack([image[b] for b in boxes]).astype(np.float32),
            np.stack([label[b] for b in boxes]).astype(np.uint8))


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights over a patch (centre 1, sigma = patch/8), as nnU-Net uses."""
    axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / max(p * sigma_scale, 1e-3)) ** 2)
            for p in patch]
    weight = axes[0]
    for a in axes[1:]:
        weight = np.multiply.outer(weight, a)
    weight = weight / weight.max()
    return np.maximum(weight, 1e-3).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of sliding windows along one axis (first at 0, last at the end)."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = -(-(size - patch) // step) + 1
    return sorted({int(round(x)) for x in np.linspace(0, size - patch, n)})


# --------------------------------------------------------------------------
# A case as the network sees it (training cache, evaluation and prediction alike).


def with_context(image: np.ndarray, context: int, slice_axis: int) -> np.ndarray:
    """(C, *spatial) -> (C * (2 context + 1), *spatial): channel ``o * C + c`` holds
    channel c of the slice ``o - context`` slices away along ``slice_axis`` (the first
    and last slices repeated beyond the volume's ends); the centre block is the image."""
    if not context:
        return image
    axis, n = 1 + slice_axis, image.shape[1 + slice_axis]
    index = np.arange(n)
    return np.concatenate([np.take(image, np.clip(index + o, 0, n - 1), axis=axis)
                           for o in range(-context, context + 1)], axis=0)


def centre_channel(num_channels: int, config) -> int:
    """The input channel of the first modality of the slice itself (not a neighbour's)."""
    context = int(config.data.context_slices)
    return num_channels // (2 * context + 1) * context


def normalized(case: Case, plans, config) -> np.ndarray:
    """The case's image normalised as its task's plan says (+ optional [0, 1] rescale),
    with ``data.context_slices`` neighbouring slices as extra channels."""
    image = normalize(case.image, plans["intensity"][case.task],
                      case.image_path or f"case {case.task}/{case.case_id}")
    image = rescale_01(image) if config.data.rescale_01 else image
    context = int(config.data.context_slices)
    if context and image.ndim != 4:
        raise ValueError(f"config.data.context_slices={context}: case {case.task}/"
                         f"{case.case_id} is a 2D image: it has no neighbouring slices")
    return with_context(image, context, config.data.slice_axis)


def uses_patches(config) -> bool:
    """Whether cases are resampled to a target spacing and cut into ``image_size``
    patches (3D models, and 2D models with ``data.in_plane='spacing'``) rather than
    resized slice by slice."""
    return config.model.spatial_dims == 3 or config.data.in_plane == "spacing"


def sw_window(config) -> str:
    """The evaluation window in effect: ``eval.sw_window`` ("patch" or "whole") where cases
    are cut into patches, "patch" where slices are resized to the network (one window
    either way). Names the files an evaluation writes and the post-processing choice."""
    if config.eval.sw_window == "whole" and uses_patches(config):
        return "whole"
    return "patch"


def resampling_method(config) -> str:
    """``data.resampling`` (a run's config.json read back holds it: the defaults are
    merged under what it recorded)."""
    return str(config.data.resampling)


def case_geometry(case: Case, plans, config) -> dict:
    """How a case becomes the network's grid: {"box": the non-zero crop ((start, stop)
    per axis; the whole case without ``data.crop_nonzero``), and for patch-based runs
    "target" (mm) with nnU-Net's "separate_z", "lowres_axis" and "reason"}."""
    box = (resampling.nonzero_box(case.image) if config.data.crop_nonzero
           else tuple((0, n) for n in case.image.shape[1:]))
    out: dict = {"box": [list(b) for b in box]}
    if uses_patches(config):
        target = case_target_spacing(case.spacing, plans["target_spacing"],
                                     config.data.slice_axis)
        out["target"] = list(target)
        if resampling_method(config) == "nnunet":
            out.update(resampling.separate_axis(case.spacing, target))
    return out


def crop_case(case: Case, box) -> Case:
    """The case cut to ``box`` ((start, stop) per spatial axis; itself when it is whole)."""
    if all(lo == 0 and hi == n for (lo, hi), n in zip(box, case.image.shape[1:])):
        return case
    return dataclasses.replace(
        case, image=resampling.crop(case.image, box, lead=1),
        label=None if case.label is None else resampling.crop(case.label, box))


def case_samples(case: Case, plans, config):
    """2D models with ``data.in_plane='resize'``: the case's slices (or 2D image),
    cropped (``data.crop_nonzero``) and resized to network size."""
    case = crop_case(case, case_geometry(case, plans, config)["box"])
    image = normalized(case, plans, config)
    return to_samples(image, case.label, tuple(config.data.image_size),
                      config.data.slice_axis, resampling_method(config))


def case_volume(case: Case, plans, config):
    """Patch-based runs: the normalised case, cropped (``data.crop_nonzero``) and
    resampled to the target spacing (in plane only for 2D models), channels-last:
    (image (*spatial, C), label (*spatial))."""
    case = crop_case(case, case_geometry(case, plans, config)["box"])
    image = normalized(case, plans, config)
    target = case_target_spacing(case.spacing, plans["target_spacing"],
                                 config.data.slice_axis)
    return resample(image, case.label, case.spacing, target, resampling_method(config))


def to_case_grid(probs: np.ndarray, case: Case, plans, config) -> np.ndarray:
    """Class probabilities on the network's grid -> (*case spatial, K): resized back
    as the case was resampled (``case_volume``, per class; (N, *image_size, K) samples
    of ``case_samples``), then put back into the full grid, background outside the
    crop box."""
    geometry = case_geometry(case, plans, config)
    box = geometry["box"]
    shape = tuple(hi - lo for lo, hi in box)
    method = resampling_method(config)
    if uses_patches(config):
        out = _resize_probs(probs, shape, method, geometry.get("lowres_axis"))
    else:
        out = from_samples(probs, shape, config.data.slice_axis, method)
    if shape == tuple(case.image.shape[1:]):
        return out
    background = np.eye(out.shape[-1], dtype=out.dtype)[0]
    return resampling.uncrop(out, box, case.image.shape[1:], background)


def network_tiles(volume: np.ndarray, label: np.ndarray, config):
    """Non-overlapping ``image_size`` inputs covering a resampled case (validation):
    (images (N, *image_size, C), labels (N, *image_size))."""
    size = tuple(config.data.image_size)
    patch = volume_patch(size, label.ndim, config.data.slice_axis)
    imgs, labs = tiles(volume, label, patch)
    return (imgs.reshape(len(imgs), *size, imgs.shape[-1]), labs.reshape(len(labs), *size))


# --------------------------------------------------------------------------
# Memory: known from the headers before a case is read.


def physical_memory() -> int:
    """This machine's physical memory in bytes (16 GiB where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 16 << 30


def case_limit_bytes(config) -> int:
    """The most memory one case may take while it is preprocessed (and evaluated):
    ``config.data.max_case_gib``, or (0) half of this machine's physical memory, the
    other half left to the rest of the run (the model, the split's samples, workers)."""
    gib = config.data.max_case_gib
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib >= 0:
        raise ValueError(f"config.data.max_case_gib: {gib!r} must be a number of GiB >= 0 "
                         "(0: half of this machine's memory)")
    return int(gib * 2**30) if gib else physical_memory() // 2


def case_bytes(ref: CaseRef, info: DatasetInfo, config, target_spacing,
               num_classes: int = 0) -> tuple[int, dict]:
    """(bytes, what they come from) that preprocessing one case takes at its peak,
    estimated from its image header alone: the float32 image as read and normalised
    (with its context-slice channels), twice its resampled (or resized) copy (the
    resampled image and one smoothing / zoom intermediate), the label maps (and with
    ``data.resampling="nnunet"`` two float masks of the new grid), and with
    ``num_classes`` (evaluation, prediction) the class probabilities on both grids."""
    from medseg_jax.data import nifti  # noqa: PLC0415 (nibabel, only where cases are read)

    shape, spacing = nifti.header_geometry(ref.image_paths[0], info)
    channels = len(info.modalities)
    wide = channels * (2 * int(config.data.context_slices) + 1)
    voxels = float(np.prod(shape, dtype=np.float64))
    facts = {"shape": shape, "spacing": spacing, "target": None}
    if uses_patches(config) and target_spacing is not None:
        target = case_target_spacing(spacing, tuple(target_spacing), config.data.slice_axis)
        resampled = resampled_shape(shape, spacing, target)
        facts.update(target=target, resampled=resampled)
        network = float(np.prod(resampled, dtype=np.float64))
    else:  # slices resized to image_size
        size = tuple(config.data.image_size)
        slices = shape[config.data.slice_axis] if len(shape) > len(size) else 1
        facts.update(resized=(slices, *size))
        network = slices * float(np.prod(size, dtype=np.float64))
    total = (4 * (channels + wide) * voxels + 4 * 2 * wide * network + voxels + network
             + 4 * num_classes * (voxels + network))
    if resampling_method(config) == "nnunet":  # a class's mask and the best one so far
        total += 4 * 2 * network
    return int(total), facts


def check_case_memory(ref: CaseRef, info: DatasetInfo, config, target_spacing,
                      num_classes: int = 0) -> None:
    """Refuses (ValueError naming the case's file) a case whose preprocessing would
    take more than ``case_limit_bytes``, before any of it is read."""
    limit = case_limit_bytes(config)
    need, facts = case_bytes(ref, info, config, target_spacing, num_classes)
    if need <= limit:
        return
    mm = lambda v: "x".join(f"{x:.4g}" for x in v)  # noqa: E731
    grid = (f"resampled to {mm(facts['target'])} mm gives {mm(facts['resampled'])} voxels"
            if facts["target"] is not None else
            f"resized gives {mm(facts['resized'])} pixels")
    raise ValueError(
        f"{ref.image_paths[0]}: case {ref.task}/{ref.case_id} of shape {mm(facts['shape'])} "
        f"at {mm(facts['spacing'])} mm needs about {need / 2**30:.1f} GiB ({grid}), more "
        f"than the {limit / 2**30:.1f} GiB allowed per case; check the header's voxel size, "
        "or raise config.data.max_case_gib")
