# medseg_jax/data/augment.py as of commit 43f50aa, before blur, low resolution and
# inverted gamma were added: the reference that tests/test_augment.py holds the default
# augmentation to, bit for bit. Kept as it was; not imported by the package.
"""On-device data augmentation for 2D and 3D segmentation batches.

Everything here is plain ``jnp`` code, vmapped over the batch, so it runs inside
the jitted train step (also with the batch sharded over devices) and is
deterministic for a given PRNG key.

Geometric augmentation builds one affine per sample, ``rotation ∘ scaling ∘
flip`` about the centre of the array, and resamples image and label once with
``jax.scipy.ndimage.map_coordinates``:

* images: linear interpolation (order 1), mode ``"constant"`` filled with the
  sample's per-channel minimum. In medical volumes the minimum is the background
  (air in CT, no signal in MRI, even after z-scoring), so the area that rotates
  into the field of view looks like background; ``"nearest"`` would smear the
  border rows into streaks instead.
* labels: nearest neighbour (order 0), mode ``"constant"`` with 0 (background),
  so label values are never interpolated: the output holds only input values,
  plus 0 where the field of view was left.

Samples for which no rotation or scaling was drawn skip the resampling result
(a per-sample ``jnp.where``): they come back bit-identical, or exactly flipped
with ``jnp.flip`` when only flips were drawn.

Rotations are in voxel units, so they assume (roughly) isotropic spacing; for
anisotropic 3D data use ``rotate_3d_axes="inplane"``.

Intensity augmentation follows nnU-Net, in its order: Gaussian noise,
multiplicative brightness, contrast, gamma. Each draws one value per sample,
applied to every channel with per-channel statistics. Labels are untouched.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.ndimage import map_coordinates

_GAMMA_EPS = 1e-7
_HIGHEST = jax.lax.Precision.HIGHEST  # small matrices: no TF32 on GPUs


def default_augment_config() -> ml_collections.ConfigDict:
    """Default augmentation settings.

    Fields:
      enabled: master switch; False returns the batch unchanged at no cost.
      p_rotate: probability per sample of a rotation.
      rotate_degrees: angle range in degrees; a number ``d`` means uniform in
        ``[-d, d]``, a pair ``(lo, hi)`` means uniform in ``[lo, hi]``
        (``(90, 90)`` gives a fixed angle; ConfigDict locks a field's type,
        so put a pair in the dict the ConfigDict is built from). 2D: in-plane angle, positive turns
        axis 0 towards axis 1 (90 degrees equals ``jnp.rot90(x, 1, axes=(0, 1))``).
        3D: one angle about each spatial axis.
      rotate_3d_axes: ``"all"``: rotate about all three axes (about axis 2,
        then 1, then 0); ``"inplane"``: about the first spatial axis only
        (rotation within the plane of axes 1 and 2).
      p_scale: probability per sample of an isotropic zoom.
      scale_range: zoom factor range; a factor > 1 enlarges the content.
      p_flip: probability of a flip, per sample and per spatial axis.
      flip_axes: spatial axes (0-based, batch and channel not counted) that may
        be flipped; empty means all spatial axes.
      p_brightness, brightness_range: multiply the intensities by a factor.
      p_contrast, contrast_range: scale around the per-channel mean, then clip
        to the per-channel min/max from before the change (as nnU-Net).
      p_gamma, gamma_range: ``x -> x**gamma`` on the per-channel min-max
        rescaled intensities, mapped back to the original range.
      p_noise, noise_std: additive Gaussian noise, its std uniform in
        ``[0, noise_std]``.
    """
    return ml_collections.ConfigDict(
        dict(
            enabled=True,
            p_rotate=0.5,
            rotate_degrees=15.0,
            rotate_3d_axes="all",
            p_scale=0.5,
            scale_range=(0.85, 1.15),
            p_flip=0.5,
            flip_axes=(),
            p_brightness=0.15,
            brightness_range=(0.75, 1.25),
            p_contrast=0.15,
            contrast_range=(0.75, 1.25),
            p_gamma=0.15,
            gamma_range=(0.7, 1.5),
            p_noise=0.1,
            noise_std=0.1,
        )
    )


_DEFAULTS = default_augment_config().to_dict()


def _get(cfg: Any, name: str) -> Any:
    """Config field, falling back to the default when the object lacks it."""
    return getattr(cfg, name, _DEFAULTS[name])


def _as_range(value: Any) -> tuple[float, float]:
    """A symmetric ``d`` becomes ``(-d, d)``; a pair is returned as floats."""
    if isinstance(value, (int, float)):
        return -float(value), float(value)
    lo, hi = value
    return float(lo), float(hi)


def _plane_rotation(ndim: int, axis_a: int, axis_b: int, angle: jax.Array) -> jax.Array:
    """Rotation by ``angle`` (radians) in the plane of ``axis_a`` towards ``axis_b``."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    m = jnp.eye(ndim, dtype=angle.dtype)
    m = m.at[axis_a, axis_a].set(c).at[axis_b, axis_b].set(c)
    return m.at[axis_b, axis_a].set(s).at[axis_a, axis_b].set(-s)


def rotation_matrix(angles: jax.Array, ndim: int, inplane: bool = False) -> jax.Array:
    """Forward rotation matrix acting on (array-axis) coordinates.

    Args:
      angles: radians; shape (1,) for 2D, (3,) for 3D (about axes 0, 1, 2;
        only ``angles[0]`` is used when ``inplane``).
      ndim: 2 or 3 spatial dimensions.
      inplane: 3D only, rotate about the first axis only.

    2D: ``angles[0]`` turns axis 0 towards axis 1. 3D: rotation about axis k
    turns axis k+1 towards axis k+2 (cyclic, right-handed); the composite is
    ``R0 @ R1 @ R2``, i.e. about axis 2 first.
    """
    angles = jnp.asarray(angles, jnp.float32)
    if ndim == 2:
        return _plane_rotation(2, 0, 1, angles[0])
    if ndim != 3:
        raise ValueError(f"rotation_matrix supports 2 or 3 dims, got {ndim}")
    r = _plane_rotation(3, 1, 2, angles[0])
    if not inplane:
        r = jnp.matmul(r, _plane_rotation(3, 2, 0, angles[1]), precision=_HIGHEST)
        r = jnp.matmul(r, _plane_rotation(3, 0, 1, angles[2]), precision=_HIGHEST)
    return r


def affine_matrix(
    angles: jax.Array, scale: jax.Array, flips: jax.Array, ndim: int, inplane: bool = False
) -> jax.Array:
    """Forward affine ``rotation ∘ scaling ∘ flip`` (about the array centre).

    ``flips`` is a boolean (ndim,) vector, ``scale`` an isotropic zoom factor.
    """
    f = jnp.where(flips, -1.0, 1.0).astype(jnp.float32)
    return rotation_matrix(angles, ndim, inplane) * scale * f[None, :]


def inverse_affine_matrix(
    angles: jax.Array, scale: jax.Array, flips: jax.Array, ndim: int, inplane: bool = False
) -> jax.Array:
    """Exact closed-form inverse of ``affine_matrix``: ``flip · rotation.T / scale``."""
    f = jnp.where(flips, -1.0, 1.0).astype(jnp.float32)
    return f[:, None] * rotation_matrix(angles, ndim, inplane).T / scale


def _sampling_coordinates(inverse: jax.Array, shape: Sequence[int]) -> list[jax.Array]:
    """Input coordinates ``inverse @ (x - c) + c`` for every output voxel ``x``.

    Written as explicit multiply-adds (not a matmul) so the precision does not
    depend on the backend's default matmul precision (TF32 on GPUs).
    """
    ndim = len(shape)
    centre = [(n - 1) / 2.0 for n in shape]
    grid = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) - c for n, c in zip(shape, centre)],
                        indexing="ij")
    coords = []
    for i in range(ndim):
        acc = inverse[i, 0] * grid[0]
        for j in range(1, ndim):
            acc = acc + inverse[i, j] * grid[j]
        coords.append(acc + centre[i])
    return coords


def _flip_where(x: jax.Array, flips: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Exactly flip ``x`` along each axis in ``axes`` whose flag is set."""
    for a in axes:
        x = jnp.where(flips[a], jnp.flip(x, axis=a), x)
    return x


# Layout of the per-sample uniform draws in [0, 1).
_U_ROT, _U_ANGLES, _U_SCALE, _U_ZOOM, _U_FLIPS = 0, slice(1, 4), 4, 5, slice(6, 9)
_U_NOISE, _U_STD, _U_BRIGHT, _U_BRIGHT_V = 9, 10, 11, 12
_U_CONTRAST, _U_CONTRAST_V, _U_GAMMA, _U_GAMMA_V = 13, 14, 15, 16
_NUM_U = 17


def _lerp(u: jax.Array, bounds: Sequence[float]) -> jax.Array:
    """Map ``u`` in [0, 1) to [lo, hi) (exactly ``lo`` when lo == hi)."""
    lo, hi = (float(v) for v in bounds)
    return lo + (hi - lo) * u


def _augment_geometry(
    u: jax.Array, image: jax.Array, label: jax.Array, cfg: Any
) -> tuple[jax.Array, jax.Array]:
    """Rotation, scaling and flips for one sample: image (*spatial, C), label (*spatial)."""
    shape = label.shape
    ndim = len(shape)
    p_rotate, p_scale, p_flip = (float(_get(cfg, n)) for n in ("p_rotate", "p_scale", "p_flip"))
    flip_axes = tuple(_get(cfg, "flip_axes")) or tuple(range(ndim))
    for a in flip_axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"flip axis {a} out of range for {ndim} spatial dims")
    flip_axes = tuple(sorted({a % ndim for a in flip_axes}))
    mode_3d = _get(cfg, "rotate_3d_axes")
    if mode_3d not in ("all", "inplane"):
        raise ValueError(f"rotate_3d_axes must be 'all' or 'inplane', got {mode_3d!r}")
    inplane = ndim == 3 and mode_3d == "inplane"

    flips = jnp.zeros(ndim, bool)
    flipped_image, flipped_label = image, label
    if p_flip > 0 and flip_axes:
        allowed = jnp.array([a in flip_axes for a in range(ndim)])
        flips = (u[_U_FLIPS][:ndim] < p_flip) & allowed
        flipped_image = _flip_where(image, flips, flip_axes)
        flipped_label = _flip_where(label, flips, flip_axes)
    if p_rotate <= 0 and p_scale <= 0:
        return flipped_image, flipped_label

    do_rot = u[_U_ROT] < p_rotate
    angles = _lerp(u[_U_ANGLES][: 1 if ndim == 2 else 3], _as_range(_get(cfg, "rotate_degrees")))
    angles = jnp.where(do_rot, jnp.deg2rad(angles), 0.0)
    do_scale = u[_U_SCALE] < p_scale
    scale = jnp.where(do_scale, _lerp(u[_U_ZOOM], _get(cfg, "scale_range")), 1.0)

    # One affine (rotation ∘ scaling ∘ flip), one resampling of the input.
    inverse = inverse_affine_matrix(angles, scale, flips, ndim, inplane)
    coords = _sampling_coordinates(inverse, shape)
    lowest = jnp.min(image, axis=tuple(range(ndim)))
    warp = jax.vmap(
        lambda ch: map_coordinates(ch, coords, order=1, mode="constant", cval=0.0),
        in_axes=-1, out_axes=-1,
    )
    warped_image = (warp(image - lowest) + lowest).astype(image.dtype)
    warped_label = map_coordinates(label, coords, order=0, mode="constant", cval=0)
    # Samples without rotation or scaling: the exact flip (or the input itself).
    resample = do_rot | do_scale
    return (jnp.where(resample, warped_image, flipped_image),
            jnp.where(resample, warped_label.astype(label.dtype), flipped_label))


def _augment_intensity(
    u: jax.Array, noise: jax.Array | None, image: jax.Array, cfg: Any
) -> jax.Array:
    """Noise, brightness, contrast and gamma for one sample (*spatial, C)."""
    axes = tuple(range(image.ndim - 1))
    dtype = image.dtype
    x = image.astype(jnp.promote_types(dtype, jnp.float32))

    if noise is not None:
        std = _lerp(u[_U_STD], (0.0, float(_get(cfg, "noise_std"))))
        x = jnp.where(u[_U_NOISE] < float(_get(cfg, "p_noise")), x + std * noise, x)
    p = float(_get(cfg, "p_brightness"))
    if p > 0:
        factor = _lerp(u[_U_BRIGHT_V], _get(cfg, "brightness_range"))
        x = jnp.where(u[_U_BRIGHT] < p, x * factor, x)
    p = float(_get(cfg, "p_contrast"))
    if p > 0:
        factor = _lerp(u[_U_CONTRAST_V], _get(cfg, "contrast_range"))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        lo, hi = jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
        x = jnp.where(u[_U_CONTRAST] < p, jnp.clip((x - mean) * factor + mean, lo, hi), x)
    p = float(_get(cfg, "p_gamma"))
    if p > 0:
        gamma = _lerp(u[_U_GAMMA_V], _get(cfg, "gamma_range"))
        lo, hi = jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
        span = hi - lo + _GAMMA_EPS
        unit = jnp.clip((x - lo) / span, 0.0, 1.0)
        x = jnp.where(u[_U_GAMMA] < p, unit**gamma * span + lo, x)
    # Untouched samples keep their exact values (the up-cast round trip is exact).
    return x.astype(dtype)


def augment_batch(
    rng: jax.Array, images: jax.Array, labels: jax.Array, cfg: Any
) -> tuple[jax.Array, jax.Array]:
    """Randomly augment a batch on device (jittable, vmapped over the batch).

    Args:
      rng: PRNG key; the same key (and config) gives the same output.
      images: (B, *spatial, C) floating point, 2 or 3 spatial dims.
      labels: (B, *spatial) integer class labels.
      cfg: a ``ConfigDict`` (or any object with attributes) with the fields of
        ``default_augment_config``; missing fields take their defaults.

    Returns:
      ``(images, labels)`` with the input shapes and dtypes.
    """
    if not _get(cfg, "enabled"):
        return images, labels
    ndim = labels.ndim - 1
    if ndim not in (2, 3):
        raise ValueError(f"labels must be (B, H, W) or (B, D, H, W), got shape {labels.shape}")
    if images.shape[:-1] != labels.shape:
        raise ValueError(f"images {images.shape} do not match labels {labels.shape} + (C,)")

    # All random numbers in one batched draw (a single threefry to compile and
    # run); the noise comes from its tail via Box-Muller.
    batch = labels.shape[0]
    draw_noise = float(_get(cfg, "p_noise")) > 0
    n_vox = math.prod(images.shape[1:])
    n_pairs = (n_vox + 1) // 2 if draw_noise else 0
    r = jax.random.uniform(rng, (batch, _NUM_U + 2 * n_pairs))
    u, noise = r[:, :_NUM_U], None
    if draw_noise:
        radius = jnp.sqrt(-2.0 * jnp.log1p(-r[:, _NUM_U:_NUM_U + n_pairs]))  # -log(1 - u), u < 1
        angle = (2.0 * math.pi) * r[:, _NUM_U + n_pairs:]
        noise = jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=1)
        noise = noise[:, :n_vox].reshape(images.shape)

    def one(u_i: jax.Array, noise_i: jax.Array | None, image: jax.Array, label: jax.Array):
        image, label = _augment_geometry(u_i, image, label, cfg)
        return _augment_intensity(u_i, noise_i, image, cfg), label

    return jax.vmap(one)(u, noise, images, labels)
