"""Separable filters on device for augmentation (``augment.py``): a Gaussian blur and a
simulated low resolution of one sample (*spatial, C), each axis one (n, n) matrix per
channel applied by a matmul, so traced sigmas and zoom factors keep shapes static."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST  # small matrices: no TF32 on GPUs


def _reflect_index(j: jax.Array, n: int) -> jax.Array:
    """Index ``j`` (any integer) folded into [0, n) as numpy's ``"reflect"`` pad."""
    if n == 1:
        return jnp.zeros_like(j)
    j = jnp.abs(j) % (2 * (n - 1))
    return jnp.where(j >= n, 2 * (n - 1) - j, j)


def _apply_along(x: jax.Array, op: jax.Array, axis: int) -> jax.Array:
    """``x`` (*spatial, C) times a per-channel (C, n, n) operator along ``axis``."""
    letters = "abcd"[: x.ndim - 1]
    src = letters + "z"
    dst = src.replace(letters[axis], "y")
    return jnp.einsum(f"zy{letters[axis]},{src}->{dst}", op, x, precision=_HIGHEST)


def gaussian_blur(x: jax.Array, sigmas: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of ``x`` (*spatial, C), ``"reflect"`` boundary.

    ``sigmas`` (ndim, C): one sigma per axis and channel (traced values are
    fine); taps ``|k| <= min(3 sigma + 1/4, radius)``, normalised to sum 1, so
    the static ``radius`` should be at least ``3 * max(sigma) + 1/4``. Each
    axis is one banded (n, n) matrix per channel, applied by a matmul.
    """
    k = jnp.arange(-radius, radius + 1)
    for a in range(x.ndim - 1):
        s = sigmas[a][:, None]  # (C, 1)
        kf = k.astype(jnp.float32)[None, :]
        w = jnp.where(jnp.abs(kf) <= 3.0 * s + 0.25, jnp.exp(-0.5 * (kf / s) ** 2), 0.0)
        w = w / jnp.sum(w, axis=1, keepdims=True)  # (C, taps)
        n = x.shape[a]
        src = _reflect_index(jnp.arange(n)[:, None] + k[None, :], n)  # (n, taps)
        hits = (src[:, :, None] == jnp.arange(n)[None, None, :]).astype(jnp.float32)
        x = _apply_along(x, jnp.einsum("ct,itj->cij", w, hits, precision=_HIGHEST), a)
    return x


def simulate_low_resolution(x: jax.Array, zooms: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Nearest downsampling of ``x`` (*spatial, C) to ``round(n * zoom)`` voxels
    along each of ``axes``, then linear upsampling back to ``n``.

    ``zooms`` (C,): one factor per channel (traced values are fine). Shapes stay
    static: per axis both steps form one (n, n) matrix per channel (two
    nonzeros a row), applied by a matmul. Half-pixel centres as ``torch``
    ``"nearest-exact"`` / linear with ``align_corners=False`` (edges clamped),
    i.e. as ``jax.image.resize`` "nearest" then "linear".
    """
    zooms = jnp.asarray(zooms, jnp.float32)[:, None, None]
    for a in axes:
        n = x.shape[a]
        m = jnp.maximum(jnp.round(n * zooms), 1.0)  # coarse size (traced), (C, 1, 1)
        i = jnp.arange(n, dtype=jnp.float32)[None, :, None]
        c = jnp.clip((i + 0.5) * (m / n) - 0.5, 0.0, m - 1.0)
        j0 = jnp.floor(c)
        t = c - j0

        def source(j):  # coarse voxel j -> the input voxel its nearest sample reads
            return jnp.minimum(jnp.floor((j + 0.5) * (n / m)), n - 1).astype(jnp.int32)

        k = jnp.arange(n, dtype=jnp.int32)[None, None, :]
        op = (jnp.where(k == source(j0), 1.0 - t, 0.0)
              + jnp.where(k == source(jnp.minimum(j0 + 1.0, m - 1.0)), t, 0.0))
        x = _apply_along(x, op, a)
    return x
