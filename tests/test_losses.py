"""Tests for medseg_jax.losses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import losses

K = 3


def _data(seed: int = 0, shape: tuple[int, ...] = (4, 6, 5)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, size=shape)
    logits = rng.standard_normal(shape + (K,)).astype(np.float32)
    return jnp.asarray(logits), jnp.asarray(labels)


def _perfect_logits(labels: jax.Array) -> jax.Array:
    return 50.0 * jax.nn.one_hot(labels, K) - 25.0


@pytest.mark.parametrize("batch_dice", [True, False])
def test_perfect_prediction(batch_dice):
    _, labels = _data()
    logits = _perfect_logits(labels)
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(0.0, abs=1e-6)
    dl = losses.soft_dice_loss(logits, labels, K, batch_dice=batch_dice)
    assert float(dl) == pytest.approx(0.0, abs=1e-5)
    assert float(losses.dice_ce_loss(logits, labels, K)) == pytest.approx(0.0, abs=1e-5)


def test_uniform_logits_ce_is_log_k():
    _, labels = _data(1)
    logits = jnp.zeros(labels.shape + (K,), jnp.bfloat16)
    ce = losses.cross_entropy(logits, labels)
    assert ce.dtype == jnp.float32
    assert float(ce) == pytest.approx(math.log(K), rel=1e-6)


def test_soft_dice_hand_computed():
    # Uniform probabilities 1/K everywhere, two voxels, one of class 1.
    labels = jnp.array([[0, 1]])
    logits = jnp.zeros((1, 2, K))
    p = 1.0 / K
    # class 1: inter = p, sum p = 2p, sum y = 1; class 2: inter 0, sum p = 2p, sum y = 0.
    d1 = (2 * p + 1e-5) / (2 * p + 1 + 1e-5)
    d2 = 1e-5 / (2 * p + 1e-5)
    expected = 1.0 - (d1 + d2) / 2
    got = losses.soft_dice_loss(logits, labels, K)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    d0 = (2 * p + 1e-5) / (2 * p + 1 + 1e-5)
    got_bg = losses.soft_dice_loss(logits, labels, K, include_background=True)
    assert float(got_bg) == pytest.approx(1.0 - (d0 + d1 + d2) / 3, rel=1e-5)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_mask_excludes_samples(batch_dice):
    logits, labels = _data(2)
    # Sample 3 is garbage padding; masking it must equal the loss on samples 0..2.
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    noise = 100.0 * jax.random.normal(jax.random.PRNGKey(0), logits[3].shape)
    padded_logits = logits.at[3].set(noise)
    for fn in (
        lambda lg, lb, m: losses.cross_entropy(lg, lb, m),
        lambda lg, lb, m: losses.soft_dice_loss(lg, lb, K, batch_dice=batch_dice, mask=m),
        lambda lg, lb, m: losses.dice_ce_loss(lg, lb, K, 0.7, 0.3, m, batch_dice=batch_dice),
    ):
        masked = fn(padded_logits, labels, mask)
        reference = fn(logits[:3], labels[:3], None)
        assert float(masked) == pytest.approx(float(reference), rel=1e-5)


def test_dice_ce_weights_and_jit_gradients():
    logits, labels = _data(3)
    dl = losses.soft_dice_loss(logits, labels, K)
    ce = losses.cross_entropy(logits, labels)
    combo = losses.dice_ce_loss(logits, labels, K, dice_weight=0.25, ce_weight=2.0)
    assert combo.shape == ()
    assert float(combo) == pytest.approx(0.25 * float(dl) + 2.0 * float(ce), rel=1e-6)

    mask = jnp.array([1.0, 1.0, 0.0, 0.0])
    grad_fn = jax.jit(jax.grad(lambda lg: losses.dice_ce_loss(lg, labels, K, mask=mask)))
    for lg in (logits, _perfect_logits(labels), jnp.zeros_like(logits)):
        g = grad_fn(lg)
        assert bool(jnp.all(jnp.isfinite(g)))
    g = grad_fn(logits)
    assert float(jnp.abs(g[2:]).max()) == 0.0  # padded samples get no gradient
    assert float(jnp.abs(g[:2]).max()) > 0.0


def test_trailing_channel_and_shape_error():
    logits, labels = _data(4)
    a = losses.cross_entropy(logits, labels[..., None])
    b = losses.cross_entropy(logits, labels)
    assert float(a) == pytest.approx(float(b))
    with pytest.raises(ValueError, match="labels shape"):
        losses.cross_entropy(logits, labels[:, :-1])
