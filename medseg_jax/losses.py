"""Segmentation losses (JAX, jittable): cross-entropy, soft Dice, Dice + CE, and deep
supervision over a network's coarser outputs.

Shapes: ``logits`` (B, *spatial, K) in any float dtype (math is float32),
``labels`` integer (B, *spatial) (a trailing singleton channel is accepted).
``mask`` is an optional per-sample weight (B,) (1.0 real, 0.0 padding) so padded
samples in the last batch do not count. All losses return a float32 scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _prepare(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cast logits to float32, check shapes, and return (logits, labels, weights (B,))."""
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if labels.ndim == logits.ndim and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits shape {logits.shape} "
            "(expected labels (B, *spatial), logits (B, *spatial, K))"
        )
    batch = logits.shape[0]
    if mask is None:
        weights = jnp.ones((batch,), jnp.float32)
    else:
        weights = jnp.asarray(mask, jnp.float32).reshape((batch,))
    return logits, labels.astype(jnp.int32), weights


def _per_voxel(weights: jax.Array, ndim: int) -> jax.Array:
    """Reshape (B,) weights to broadcast against a (B, *spatial[, K]) array."""
    return weights.reshape((-1,) + (1,) * (ndim - 1))


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy, mean over all voxels of the (unmasked) samples."""
    logits, labels, weights = _prepare(logits, labels, mask)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    voxels_per_sample = nll[0].size
    total = jnp.sum(nll * _per_voxel(weights, nll.ndim))
    return total / jnp.maximum(jnp.sum(weights) * voxels_per_sample, 1e-8)


def soft_dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch_dice: bool = True,
    mask: jax.Array | None = None,
) -> jax.Array:
    """1 - mean over classes of the soft Dice of softmax probabilities vs one-hot labels.

    Per class Dice = (2*sum(p*y) + smooth) / (sum(p) + sum(y) + smooth). With
    ``batch_dice`` (nnU-Net style) sums run over batch and spatial axes
    together; otherwise per sample, and the per-sample losses are averaged
    (weighted by ``mask``). Background (class 0) is left out unless
    ``include_background``.
    """
    logits, labels, weights = _prepare(logits, labels, mask)
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} classes, expected {num_classes}")
    if num_classes < 2 and not include_background:
        raise ValueError("soft_dice_loss needs num_classes >= 2 without the background class")
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if not include_background:
        probs, onehot = probs[..., 1:], onehot[..., 1:]
    spatial = tuple(range(1, probs.ndim - 1))
    inter = jnp.sum(probs * onehot, axis=spatial)  # (B, C)
    p_sum = jnp.sum(probs, axis=spatial)
    y_sum = jnp.sum(onehot, axis=spatial)
    if batch_dice:
        w = weights[:, None]
        inter, p_sum, y_sum = (w * inter).sum(0), (w * p_sum).sum(0), (w * y_sum).sum(0)
        dsc = (2.0 * inter + smooth) / jnp.maximum(p_sum + y_sum + smooth, 1e-8)  # (C,)
        return 1.0 - jnp.mean(dsc)
    dsc = (2.0 * inter + smooth) / jnp.maximum(p_sum + y_sum + smooth, 1e-8)  # (B, C)
    per_sample = 1.0 - jnp.mean(dsc, axis=-1)
    return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def dice_ce_loss(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    mask: jax.Array | None = None,
    *,
    include_background: bool = False,
    batch_dice: bool = True,
    smooth: float = 1e-5,
) -> jax.Array:
    """``dice_weight * soft_dice_loss + ce_weight * cross_entropy`` as a scalar."""
    dl = soft_dice_loss(
        logits,
        labels,
        num_classes,
        include_background=include_background,
        smooth=smooth,
        batch_dice=batch_dice,
        mask=mask,
    )
    return dice_weight * dl + ce_weight * cross_entropy(logits, labels, mask)


# --------------------------------------------------------------------------- #
# Partial labels: a class not annotated in a sample is unknown, not absent
# --------------------------------------------------------------------------- #


def marginal_cross_entropy(logits: jax.Array, labels: jax.Array, annotated: jax.Array,
                           mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy where, per sample, the probabilities of the classes that were not
    annotated are merged with background (``annotated``: (B, K) 1/0; background always
    1): a voxel labelled background may be background or any unannotated class, so
    predicting an unannotated class there costs nothing (the marginal loss of Shi et al.,
    "Marginal loss and exclusion loss for partially supervised multi-organ segmentation",
    2021). With every class annotated it equals ``cross_entropy``."""
    logits, labels, weights = _prepare(logits, labels, mask)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    merged = jnp.asarray(annotated, jnp.float32).at[:, 0].set(0.0) < 0.5  # bg or unknown
    shape = (merged.shape[0],) + (1,) * (log_probs.ndim - 2) + (merged.shape[1],)
    background = jax.nn.logsumexp(
        jnp.where(merged.reshape(shape), log_probs, -jnp.inf), axis=-1)
    own = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    nll = -jnp.where(labels == 0, background, own)
    total = jnp.sum(nll * _per_voxel(weights, nll.ndim))
    return total / jnp.maximum(jnp.sum(weights) * nll[0].size, 1e-8)


def partial_soft_dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                           annotated: jax.Array, smooth: float = 1e-5,
                           mask: jax.Array | None = None) -> jax.Array:
    """Batch soft Dice over the foreground classes, each summed over the samples in which
    it is annotated only, averaged over the classes annotated in some sample."""
    logits, labels, weights = _prepare(logits, labels, mask)
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[..., 1:]
    spatial = tuple(range(1, probs.ndim - 1))
    w = weights[:, None] * jnp.asarray(annotated, jnp.float32)[:, 1:]  # (B, C)
    inter = (w * jnp.sum(probs * onehot, axis=spatial)).sum(0)
    p_sum = (w * jnp.sum(probs, axis=spatial)).sum(0)
    y_sum = (w * jnp.sum(onehot, axis=spatial)).sum(0)
    dsc = (2.0 * inter + smooth) / jnp.maximum(p_sum + y_sum + smooth, 1e-8)
    scored = (w.sum(0) > 0).astype(jnp.float32)
    return 1.0 - jnp.sum(dsc * scored) / jnp.maximum(scored.sum(), 1.0)


def partial_dice_ce_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                         annotated: jax.Array, dice_weight: float = 1.0,
                         ce_weight: float = 1.0, mask: jax.Array | None = None) -> jax.Array:
    """``dice_ce_loss`` for partial labels: Dice over annotated classes, marginal CE."""
    return (dice_weight * partial_soft_dice_loss(logits, labels, num_classes, annotated,
                                                 mask=mask)
            + ce_weight * marginal_cross_entropy(logits, labels, annotated, mask))


# --------------------------------------------------------------------------- #
# Deep supervision
# --------------------------------------------------------------------------- #


def downsample_labels(labels: jax.Array, shape) -> jax.Array:
    """(B, *spatial) integer labels -> (B, *shape) by taking the first voxel of each pooling
    window: the targets of deep supervision at a coarser level."""
    strides = [n // m for n, m in zip(labels.shape[1:], shape)]
    return labels[(slice(None),) + tuple(slice(None, None, s) for s in strides)]


def deep_supervision_weights(levels) -> dict[int, float]:
    """Weight of each output level (0 = full resolution): 1/2**level, normalised to sum 1
    (nnU-Net's weighting; its lowest-resolution output, the bottleneck, has no head
    here)."""
    raw = {0: 1.0, **{int(level): 0.5 ** int(level) for level in levels}}
    total = sum(raw.values())
    return {level: w / total for level, w in raw.items()}


def supervised_loss(logits: jax.Array, labels: jax.Array, num_classes: int, *,
                    dice_weight: float = 1.0, ce_weight: float = 1.0,
                    mask: jax.Array | None = None,
                    aux: dict[int, jax.Array] | None = None,
                    annotated: jax.Array | None = None) -> jax.Array:
    """Dice + CE of the network output, plus, with ``aux`` ({level: logits at that
    level}, the coarser outputs of deep supervision), the weighted losses of the coarser
    outputs against downsampled labels (``deep_supervision_weights``). With
    ``annotated`` ((B, K), partial labels) the partial-label loss. Without either it is
    exactly ``dice_ce_loss``."""

    def one(lg, lb):
        if annotated is not None:
            return partial_dice_ce_loss(lg, lb, num_classes, annotated, dice_weight,
                                        ce_weight, mask)
        return dice_ce_loss(lg, lb, num_classes, dice_weight, ce_weight, mask)

    if not aux:
        return one(logits, labels)
    weights = deep_supervision_weights(aux)
    total = weights[0] * one(logits, labels)
    for level, out in sorted(aux.items()):
        total = total + weights[level] * one(out, downsample_labels(labels, out.shape[1:-1]))
    return total
