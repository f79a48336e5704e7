"""Whole-case inference: class probabilities and a label map on the case's own grid.

2D models with ``data.in_plane='resize'`` predict every slice resized to
``data.image_size``. 3D models, and 2D models with ``data.in_plane='spacing'``,
run a sliding window of ``data.image_size`` patches (one slice thick for 2D
models; ``eval.sw_window="whole"``: one window over the whole case or slice), with
overlap and Gaussian weighting, over the case resampled to the
run's target spacing. Either way the class probabilities are resampled back to
the case grid (as the case was resampled, ``data.resampling``; background outside a
``data.crop_nonzero`` box) before the argmax.
The network runs through a jitted ``predict_fn`` (``state.make_predict_fn``: with
``eval.tta`` the softmax is averaged over every flip of the spatial axes).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils

from medseg_jax import config as config_lib
from medseg_jax import postprocess, sharding
from medseg_jax.data import loader, nifti, preprocess


def predict_batches(predict_fn, state, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Softmax probabilities of all ``images`` (N, *size, C), in padded batches."""
    out = []
    for batch in loader.padded_batches(images, None, batch_size, jax.process_index(),
                                         jax.process_count()):
        probs = predict_fn(state, sharding.to_global({"image": batch["image"]}, mesh)["image"])
        if jax.process_count() > 1:
            probs = multihost_utils.process_allgather(probs, tiled=True)
        out.append(np.asarray(probs))
    return np.concatenate(out)[: len(images)]


def sliding_window(predict_fn, state, volume: np.ndarray, patch: tuple[int, ...],
                   overlap: float, batch_size: int, mesh,
                   input_size: tuple[int, ...] | None = None,
                   fit_batch: bool = False) -> tuple[np.ndarray, int]:
    """(probabilities (*spatial, K), number of windows) of a volume (*spatial, C).

    ``patch`` is the window in volume coordinates; windows are reshaped to the
    network's ``input_size`` (default: ``patch``), e.g. a (64, 64, 1) window of a
    volume to a (64, 64) input of a 2D model. ``fit_batch``: batches of at most the
    windows there are (rounded up to the mesh's devices), not ``batch_size`` padded
    copies of one window (whole-case windows: a compilation per case size anyway).
    """
    input_size = tuple(patch) if input_size is None else tuple(input_size)
    spatial = volume.shape[:-1]
    padded = preprocess.pad_to(volume, patch, float(volume.min()))
    full = padded.shape[:-1]
    starts = list(itertools.product(
        *(preprocess.window_starts(n, p, overlap) for n, p in zip(full, patch))))
    if fit_batch:
        devices = mesh.devices.size
        batch_size = min(batch_size, -(-len(starts) // devices) * devices)
    weight = preprocess.gaussian_importance(patch)
    acc, norm = None, np.zeros(full, np.float32)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in chunk]
        windows = np.stack([padded[b] for b in boxes])
        probs = predict_batches(predict_fn, state,
                                windows.reshape(len(boxes), *input_size, windows.shape[-1]),
                                batch_size, mesh)
        probs = probs.reshape(len(boxes), *patch, probs.shape[-1])
        if acc is None:
            acc = np.zeros(full + probs.shape[-1:], np.float32)
        for box, p in zip(boxes, probs):
            acc[box] += p * weight[..., None]
            norm[box] += weight
    probs = acc / norm[..., None]
    return probs[tuple(slice(0, n) for n in spatial)], len(starts)


def window(config, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(network input size, window in volume coordinates) for a resampled case of shape
    ``spatial``: ``data.image_size`` with ``eval.sw_window="patch"``; with "whole", every
    axis the network sees is the case's own, rounded up to the network's total pooling
    (``config.input_divisor``) and never below the patch (a 2D model's window stays one
    slice thick)."""
    size = tuple(int(n) for n in config.data.image_size)
    if config.eval.sw_window == "whole":
        divisor = config_lib.input_divisor(config)
        in_plane = [n for a, n in enumerate(spatial)
                    if len(size) == len(spatial) or a != config.data.slice_axis]
        size = tuple(max(s, -(-n // d) * d) for s, n, d in zip(size, in_plane, divisor))
    return size, preprocess.volume_patch(size, len(spatial), config.data.slice_axis)


def network_probs(case: nifti.Case, plans: dict, config, state, predict_fn,
                  mesh) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(class probabilities on the network's grid, the case's label on that grid (None
    for a case without one), number of network inputs): the case as training preprocesses
    it, resampled ((*spatial, K)) or resized slice by slice ((N, *image_size, K))."""
    if preprocess.uses_patches(config):
        volume, label = preprocess.case_volume(case, plans, config)
        size, patch = window(config, volume.shape[:-1])
        probs, n = sliding_window(predict_fn, state, volume, patch, config.eval.sw_overlap,
                                  config.eval.batch_size, mesh, input_size=size,
                                  fit_batch=config.eval.sw_window == "whole")
        return probs, label, n
    images, labels = preprocess.case_samples(case, plans, config)
    probs = predict_batches(predict_fn, state, images, config.eval.batch_size, mesh)
    return probs, labels, len(images)


def predict_probs(case: nifti.Case, plans: dict, config, state, predict_fn,
                  mesh) -> tuple[np.ndarray, int]:
    """(class probabilities (*spatial, K) on the case grid, number of network inputs)."""
    probs, _, n = network_probs(dataclasses.replace(case, label=None), plans, config, state,
                                predict_fn, mesh)
    return preprocess.to_case_grid(probs, case, plans, config), n


def ensemble_probs(case: nifti.Case, runs) -> tuple[np.ndarray, int]:
    """(the mean of the class probabilities of several restored runs (``state.Run``) on the
    case grid, network inputs in all): each with its own network, plan, window and flips."""
    total, inputs = None, 0
    for run in runs:
        probs, n = predict_probs(case, run.plans, run.config, run.state, run.predict_fn,
                                 run.mesh)
        total, inputs = (probs if total is None else total + probs), inputs + n
    return total / len(runs), inputs


def label_map(probs: np.ndarray, config) -> np.ndarray:
    """The argmax of class probabilities (*spatial, K) as uint8 labels, post-processed as
    ``eval.postprocess`` says (``postprocess.py``: the largest connected component of all
    or some classes; "auto" is resolved against the run's choice file before this)."""
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    return postprocess.apply(labels, config.eval.postprocess)


def predict_case(case: nifti.Case, plans: dict, config, state, predict_fn,
                 mesh) -> tuple[np.ndarray, int]:
    """Returns (label map of the case's spatial shape, number of network inputs)."""
    probs, n = predict_probs(case, plans, config, state, predict_fn, mesh)
    return label_map(probs, config), n


def entropy(probs: np.ndarray) -> np.ndarray:
    """Per-voxel entropy of the softmax (nats), the uncertainty map: 0 = certain."""
    p = np.clip(probs, 1e-12, 1.0)
    return -np.sum(p * np.log(p), axis=-1)
