"""Whole-case inference: a label map on the case's own voxel grid.

2D models predict every slice (resized to ``data.image_size``); 3D models run a
sliding window of ``data.image_size`` patches, with overlap and Gaussian
weighting, over the volume resampled to the run's target spacing. Either way
the class probabilities are resized back to the case grid before the argmax.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils

from medseg_jax import sharding
from medseg_jax.data import decathlon, pipeline, preprocess


def predict_batches(predict_fn, state, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Softmax probabilities of all ``images`` (N, *size, C), in padded batches."""
    out = []
    for batch in pipeline.padded_batches(images, None, batch_size, jax.process_index(),
                                         jax.process_count()):
        probs = predict_fn(state, sharding.to_global({"image": batch["image"]}, mesh)["image"])
        if jax.process_count() > 1:
            probs = multihost_utils.process_allgather(probs, tiled=True)
        out.append(np.asarray(probs))
    return np.concatenate(out)[: len(images)]


def sliding_window(predict_fn, state, volume: np.ndarray, patch: tuple[int, ...],
                   overlap: float, batch_size: int, mesh) -> tuple[np.ndarray, int]:
    """(probabilities (*spatial, K), number of windows) of a volume (*spatial, C)."""
    spatial = volume.shape[:-1]
    padded = preprocess.pad_to(volume, patch, float(volume.min()))
    full = padded.shape[:-1]
    starts = list(itertools.product(
        *(preprocess.window_starts(n, p, overlap) for n, p in zip(full, patch))))
    weight = preprocess.gaussian_importance(patch)
    acc, norm = None, np.zeros(full, np.float32)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in chunk]
        probs = predict_batches(predict_fn, state, np.stack([padded[b] for b in boxes]),
                                batch_size, mesh)
        if acc is None:
            acc = np.zeros(full + probs.shape[-1:], np.float32)
        for box, p in zip(boxes, probs):
            acc[box] += p * weight[..., None]
            norm[box] += weight
    probs = acc / norm[..., None]
    return probs[tuple(slice(0, n) for n in spatial)], len(starts)


def predict_case(case: decathlon.Case, plans: dict, config, state, predict_fn,
                 mesh) -> tuple[np.ndarray, int]:
    """Returns (label map of the case's spatial shape, number of network inputs)."""
    spatial = case.image.shape[1:]
    if config.model.spatial_dims == 3:
        image = pipeline.normalized(case, plans, config)
        volume, _ = preprocess.resample(image, None, case.spacing, plans["target_spacing"])
        probs, n = sliding_window(predict_fn, state, volume, tuple(config.data.image_size),
                               config.eval.sw_overlap, config.eval.batch_size, mesh)
        labels = np.argmax(preprocess.resize(probs, spatial, order=1), axis=-1)
        return labels.astype(np.uint8), n
    images, _ = pipeline.case_samples(case, plans, config)
    probs = predict_batches(predict_fn, state, images, config.eval.batch_size, mesh)
    return preprocess.from_samples(probs, spatial, config.data.slice_axis), len(images)
