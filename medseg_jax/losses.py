"""Segmentation losses (JAX, jittable): cross-entropy, soft Dice, and Dice + CE.

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
