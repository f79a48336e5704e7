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

Order of operations (nnU-Net's ``get_training_transforms``): spatial
(rotation, scaling), Gaussian noise, Gaussian blur, brightness, contrast,
low-resolution simulation, gamma on the inverted image, gamma, mirroring.
Mirroring is folded into the affine here (first, not last): a flip commutes in
distribution with every later step (they are per-channel global, i.i.d. or
mirror-symmetric), so only the geometry of the draw differs, not its law.
Intensity steps use per-channel statistics and leave labels untouched. By
default each draws one value per sample for all channels; with
``intensity_per_channel`` brightness, contrast and gamma draw one per channel
(nnU-Net). Blur and low resolution pick channels with ``p_blur_channel`` /
``p_lowres_channel`` and draw sigma / zoom per channel.

* Blur: separable Gaussian, taps ``|k| <= 3 sigma + 1/4`` (nnU-Net's kernel:
  the odd size nearest ``6 sigma + 1/2``), one sigma per channel and axis,
  ``"reflect"`` boundary (as nnU-Net).
* Low resolution: per axis, nearest ("nearest-exact") downsampling to
  ``round(n * zoom)`` voxels and linear (half-pixel, edge-clamped) upsampling
  back, composed into one matrix on the static grid (equal to
  ``jax.image.resize`` nearest then linear). nnU-Net v2 also upsamples
  linearly (``torch.nn.functional.interpolate``); nnU-Net v1 used cubic.
* Both are (n, n) matrices per axis and channel applied by matmuls: stencils
  or gathers would let XLA fuse the resampling before them into every tap.

New transforms are off by default (probability 0); with them off, the random
draw and every output are bit-identical to the earlier version of this module.
The fields and their defaults are the config's (``medseg_jax/config_augment.py``:
``default_augment_config``; ``nnunet_augment_config``: nnU-Net's settings).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from medseg_jax.config_augment import (  # noqa: F401 (the fields, with the transforms)
    default_augment_config, nnunet_augment_config)
from medseg_jax.data import laterality
from medseg_jax.data.filters import gaussian_blur, simulate_low_resolution

_GAMMA_EPS = 1e-7
_HIGHEST = jax.lax.Precision.HIGHEST  # small matrices: no TF32 on GPUs

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

    ``flips`` is a boolean (ndim,) vector, ``scale`` a zoom factor: a scalar
    (isotropic) or an (ndim,) vector (one factor per axis).
    """
    f = jnp.where(flips, -1.0, 1.0).astype(jnp.float32)
    return rotation_matrix(angles, ndim, inplane) * scale * f[None, :]


def inverse_affine_matrix(
    angles: jax.Array, scale: jax.Array, flips: jax.Array, ndim: int, inplane: bool = False
) -> jax.Array:
    """Exact closed-form inverse of ``affine_matrix``: ``flip · scale⁻¹ · rotation.T``."""
    f = jnp.where(flips, -1.0, 1.0).astype(jnp.float32)
    scale = jnp.asarray(scale)
    scale = scale[:, None] if scale.ndim == 1 else scale
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
# Extra block, drawn (after the _NUM_U columns, before the noise) only when a
# transform added later is on, so that the default draw keeps its shape: _NUM_X
# per-sample values, then _NUM_XC rows of one value per channel.
_X_BLUR, _X_LOWRES, _X_GAMMA_INV, _X_GAMMA_INV_V = 0, 1, 2, 3
_NUM_X = 4
_XC_BLUR, _XC_SIGMA, _XC_LOWRES, _XC_ZOOM = 0, slice(1, 4), 4, 5
_XC_BRIGHT_V, _XC_CONTRAST_V, _XC_GAMMA_V, _XC_GAMMA_INV_V = 6, 7, 8, 9
_NUM_XC = 10


def _uses_extra(cfg: Any) -> bool:
    """Whether the extra block of draws is needed (any later transform on)."""
    return (any(float(_get(cfg, n)) > 0 for n in ("p_blur", "p_lowres", "p_gamma_invert"))
            or bool(_get(cfg, "intensity_per_channel")))


def _axes(cfg: Any, name: str, ndim: int) -> tuple[int, ...]:
    """A config field of spatial axes (negative allowed; empty = all), sorted."""
    axes = tuple(_get(cfg, name)) or tuple(range(ndim))
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: axis {a} out of range for {ndim} spatial dims")
    return tuple(sorted({a % ndim for a in axes}))


def mirror_axes(cfg: Any, ndim: int) -> tuple[int, ...]:
    """The spatial axes training mirrors (``flip_axes``; empty: all), 0-based, sorted;
    none when augmentation or mirroring is off. Test-time augmentation flips the same
    ones (as nnU-Net: its no-mirroring trainers predict without mirrors too)."""
    if not _get(cfg, "enabled") or float(_get(cfg, "p_flip")) <= 0:
        return ()
    return _axes(cfg, "flip_axes", ndim)


def _lerp(u: jax.Array, bounds: Sequence[float]) -> jax.Array:
    """Map ``u`` in [0, 1) to [lo, hi) (exactly ``lo`` when lo == hi)."""
    lo, hi = (float(v) for v in bounds)
    return lo + (hi - lo) * u


def _factor(u: jax.Array, bounds: Sequence[float], split: bool) -> jax.Array:
    """``_lerp``, or with ``split`` nnU-Net's BGContrast: half below 1, half above."""
    lo, hi = (float(v) for v in bounds)
    if not (split and lo < 1.0 < hi):
        return _lerp(u, (lo, hi))
    return jnp.where(u < 0.5, lo + (1.0 - lo) * (2.0 * u), 1.0 + (hi - 1.0) * (2.0 * u - 1.0))


def _gamma(x: jax.Array, gamma: jax.Array, axes: tuple[int, ...], retain_stats: bool) -> jax.Array:
    """``x -> x**gamma`` on the per-channel min-max rescaled intensities."""
    lo, hi = jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
    span = hi - lo + _GAMMA_EPS
    unit = jnp.clip((x - lo) / span, 0.0, 1.0)
    y = unit**gamma * span + lo
    if retain_stats:
        mean, std = jnp.mean(x, axis=axes, keepdims=True), jnp.std(x, axis=axes, keepdims=True)
        y_mean, y_std = jnp.mean(y, axis=axes, keepdims=True), jnp.std(y, axis=axes, keepdims=True)
        y = (y - y_mean) * (std / jnp.maximum(y_std, _GAMMA_EPS)) + mean
    return y


def _augment_geometry(
    u: jax.Array, image: jax.Array, label: jax.Array, cfg: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotation, scaling and flips for one sample: image (*spatial, C), label (*spatial),
    and whether the sample was mirrored (an odd number of axes flipped)."""
    shape = label.shape
    ndim = len(shape)
    p_rotate, p_scale, p_flip = (float(_get(cfg, n)) for n in ("p_rotate", "p_scale", "p_flip"))
    flip_axes = _axes(cfg, "flip_axes", ndim)
    scale_axes = _axes(cfg, "scale_axes", ndim)
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
    mirrored = jnp.sum(flips) % 2 == 1
    if p_rotate <= 0 and p_scale <= 0:
        return flipped_image, flipped_label, mirrored

    do_rot = u[_U_ROT] < p_rotate
    angles = _lerp(u[_U_ANGLES][: 1 if ndim == 2 else 3], _as_range(_get(cfg, "rotate_degrees")))
    angles = jnp.where(do_rot, jnp.deg2rad(angles), 0.0)
    do_scale = u[_U_SCALE] < p_scale
    if _get(cfg, "scale_inverse"):
        scale = jnp.where(do_scale, 1.0 / _lerp(u[_U_ZOOM], _get(cfg, "scale_range")), 1.0)
    else:
        scale = jnp.where(do_scale, _lerp(u[_U_ZOOM], _get(cfg, "scale_range")), 1.0)
    if len(scale_axes) < ndim:
        scale = jnp.where(jnp.array([a in scale_axes for a in range(ndim)]), scale, 1.0)

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
            jnp.where(resample, warped_label.astype(label.dtype), flipped_label), mirrored)


def _augment_intensity(
    u: jax.Array, extra: jax.Array | None, noise: jax.Array | None, image: jax.Array, cfg: Any,
    groups: int = 1,
) -> jax.Array:
    """Intensity steps for one sample (*spatial, C), in nnU-Net's order.

    ``extra``: the sample's extra block of draws (see ``_NUM_X``), or None. ``groups``:
    the channels are that many blocks of the same modalities (neighbouring slices as
    channels, ``data.context_slices``); a per-channel draw is shared by the blocks.
    """
    axes = tuple(range(image.ndim - 1))
    ndim, channels = image.ndim - 1, image.shape[-1]
    dtype = image.dtype
    x = image.astype(jnp.promote_types(dtype, jnp.float32))
    head = per_ch = None
    if extra is not None:
        head = extra[:_NUM_X]
        per_ch = jnp.tile(extra[_NUM_X:].reshape(_NUM_XC, channels // groups), (1, groups))
    split = bool(_get(cfg, "factors_split_at_one"))
    by_channel = per_ch is not None and bool(_get(cfg, "intensity_per_channel"))

    def factor(shared: jax.Array, row: int, name: str) -> jax.Array:
        """One value per sample (``shared``) or per channel (row ``row``)."""
        return _factor(per_ch[row] if by_channel else shared, _get(cfg, name), split)

    if noise is not None:
        std = _lerp(u[_U_STD], (0.0, float(_get(cfg, "noise_std"))))
        x = jnp.where(u[_U_NOISE] < float(_get(cfg, "p_noise")), x + std * noise, x)
    p = float(_get(cfg, "p_blur"))
    if p > 0:
        lo, hi = (float(v) for v in _get(cfg, "blur_sigma"))
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {(lo, hi)}")
        sigmas = _lerp(per_ch[_XC_SIGMA][:ndim], (lo, hi))
        on = (head[_X_BLUR] < p) & (per_ch[_XC_BLUR] < float(_get(cfg, "p_blur_channel")))
        x = jnp.where(on, gaussian_blur(x, sigmas, max(1, math.floor(3.0 * hi + 0.25))), x)
    p = float(_get(cfg, "p_brightness"))
    if p > 0:
        factor_ = factor(u[_U_BRIGHT_V], _XC_BRIGHT_V, "brightness_range")
        x = jnp.where(u[_U_BRIGHT] < p, x * factor_, x)
    p = float(_get(cfg, "p_contrast"))
    if p > 0:
        factor_ = factor(u[_U_CONTRAST_V], _XC_CONTRAST_V, "contrast_range")
        mean = jnp.mean(x, axis=axes, keepdims=True)
        lo, hi = jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
        x = jnp.where(u[_U_CONTRAST] < p, jnp.clip((x - mean) * factor_ + mean, lo, hi), x)
    p = float(_get(cfg, "p_lowres"))
    if p > 0:
        lo, hi = (float(v) for v in _get(cfg, "lowres_range"))
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"lowres_range must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        zooms = _lerp(per_ch[_XC_ZOOM], (lo, hi))
        lowres_axes = _axes(cfg, "lowres_axes", ndim)
        on = (head[_X_LOWRES] < p) & (per_ch[_XC_LOWRES] < float(_get(cfg, "p_lowres_channel")))
        x = jnp.where(on, simulate_low_resolution(x, zooms, lowres_axes), x)
    retain = bool(_get(cfg, "gamma_retain_stats"))
    p = float(_get(cfg, "p_gamma_invert"))
    if p > 0:
        gamma = factor(head[_X_GAMMA_INV_V], _XC_GAMMA_INV_V, "gamma_range")
        x = jnp.where(head[_X_GAMMA_INV] < p, -_gamma(-x, gamma, axes, retain), x)
    p = float(_get(cfg, "p_gamma"))
    if p > 0:
        gamma = factor(u[_U_GAMMA_V], _XC_GAMMA_V, "gamma_range")
        x = jnp.where(u[_U_GAMMA] < p, _gamma(x, gamma, axes, retain), x)
    # Untouched samples keep their exact values (the up-cast round trip is exact).
    return x.astype(dtype)


def augment_batch(
    rng: jax.Array, images: jax.Array, labels: jax.Array, cfg: Any,
    swap: Sequence[int] | None = None, annotated: jax.Array | None = None,
    context: int = 0,
) -> tuple[jax.Array, ...]:
    """Randomly augment a batch on device (jittable, vmapped over the batch).

    Args:
      rng: PRNG key; the same key (and config) gives the same output.
      images: (B, *spatial, C) floating point, 2 or 3 spatial dims.
      labels: (B, *spatial) integer class labels.
      cfg: a ``ConfigDict`` (or any object with attributes) with the fields of
        ``default_augment_config``; missing fields take their defaults.
      swap: the label permutation of a mirror (``data/laterality.py``: left and right
        organs exchange values in a sample flipped along an odd number of axes), or
        None (labels keep their values).
      annotated: (B, num_classes) per-case flags of the annotated classes (partial
        labels), permuted with the labels; None when the data set has none.
      context: the channels are the modalities of 2 * context + 1 neighbouring slices
        (``data.context_slices``): per-channel draws are made per modality.

    Returns:
      ``(images, labels)`` with the input shapes and dtypes, and ``annotated`` when given.
    """
    if not _get(cfg, "enabled"):
        return (images, labels) if annotated is None else (images, labels, annotated)
    ndim = labels.ndim - 1
    if ndim not in (2, 3):
        raise ValueError(f"labels must be (B, H, W) or (B, D, H, W), got shape {labels.shape}")
    if images.shape[:-1] != labels.shape:
        raise ValueError(f"images {images.shape} do not match labels {labels.shape} + (C,)")

    # All random numbers in one batched draw (a single threefry to compile and
    # run): _NUM_U values, the extra block when needed, then the noise via
    # Box-Muller.
    batch = labels.shape[0]
    draw_noise = float(_get(cfg, "p_noise")) > 0
    n_vox = math.prod(images.shape[1:])
    n_pairs = (n_vox + 1) // 2 if draw_noise else 0
    groups = 2 * int(context) + 1
    if images.shape[-1] % groups:
        raise ValueError(f"images have {images.shape[-1]} channels, not a multiple of the "
                         f"{groups} slices of context={context}")
    n_extra = _NUM_X + _NUM_XC * (images.shape[-1] // groups) if _uses_extra(cfg) else 0
    start = _NUM_U + n_extra
    r = jax.random.uniform(rng, (batch, start + 2 * n_pairs))
    u, extra, noise = r[:, :_NUM_U], (r[:, _NUM_U:start] if n_extra else None), None
    if draw_noise:
        radius = jnp.sqrt(-2.0 * jnp.log1p(-r[:, start:start + n_pairs]))  # -log(1 - u), u < 1
        angle = (2.0 * math.pi) * r[:, start + n_pairs:]
        noise = jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=1)
        noise = noise[:, :n_vox].reshape(images.shape)

    def one(u_i, extra_i, noise_i, image, label):
        image, label, mirrored = _augment_geometry(u_i, image, label, cfg)
        return _augment_intensity(u_i, extra_i, noise_i, image, cfg, groups), label, mirrored

    images, labels, mirrored = jax.vmap(one)(u, extra, noise, images, labels)
    if swap is not None:
        labels, annotated = laterality.swap_mirrored(mirrored, swap, labels, annotated)
    return (images, labels) if annotated is None else (images, labels, annotated)
