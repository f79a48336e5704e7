"""The augmentation section of the config (``config.augment``): its fields, their
defaults and nnU-Net's settings. Plain values, no JAX: ``medseg_jax.data.augment``
applies them on the device."""

import ml_collections


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
      scale_axes: spatial axes the zoom applies to; empty means all (nnU-Net's
        anisotropic "dummy 2D" mode zooms axes 1 and 2 only).
      scale_inverse: draw ``s`` uniform in ``scale_range`` and zoom by ``1/s``
        (nnU-Net's convention: ``s`` scales the sampling grid, s > 1 shrinks).
      intensity_per_channel: brightness, contrast and gamma (also inverted)
        draw one factor per channel instead of one per sample.
      factors_split_at_one: brightness, contrast and gamma factors: with
        probability 0.5 uniform in ``[lo, 1)``, else in ``[1, hi)`` (nnU-Net's
        ``BGContrast``; only when ``lo < 1 < hi``).
      p_blur, blur_sigma, p_blur_channel: Gaussian blur per sample with
        probability ``p_blur``, then per channel with ``p_blur_channel``; sigma
        (voxels) uniform in ``blur_sigma``, per channel and axis.
      p_lowres, lowres_range, p_lowres_channel, lowres_axes: simulate low
        resolution per sample / channel; zoom uniform in ``lowres_range`` per
        channel (same for all axes); only ``lowres_axes`` (empty: all) are
        resampled (nnU-Net's ``ignore_axes=(0,)`` is ``lowres_axes=(1, 2)``).
      p_gamma_invert: gamma on the negated image (then negated back), before
        the plain gamma, with ``gamma_range``.
      gamma_retain_stats: after gamma, restore each channel's mean and std.
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
            # Off by default; nnU-Net's ranges (see nnunet_augment_config).
            scale_axes=(),
            scale_inverse=False,
            intensity_per_channel=False,
            factors_split_at_one=False,
            p_blur=0.0,
            blur_sigma=(0.5, 1.0),
            p_blur_channel=0.5,
            p_lowres=0.0,
            lowres_range=(0.5, 1.0),
            p_lowres_channel=0.5,
            lowres_axes=(),
            p_gamma_invert=0.0,
            gamma_retain_stats=False,
        )
    )


def nnunet_augment_config(
    spatial_dims: int, anisotropic: bool = False
) -> ml_collections.ConfigDict:
    """nnU-Net v2's default training augmentation (``nnUNetTrainer.get_training_transforms``).

    Args:
      spatial_dims: 2 or 3.
      anisotropic: 3D: nnU-Net's "dummy 2D" mode (largest patch edge over 3x the
        first, low-resolution axis): rotation up to 180 degrees about axis 0
        only, zoom and low-resolution simulation in axes 1 and 2 only. 2D: a
        patch aspect ratio above 1.5, where nnU-Net rotates by at most 15 degrees.

    Spatial: rotation p 0.2 (2D +-180, 3D +-30 degrees about every axis),
    scaling p 0.2 with ``s`` in (0.7, 1.4) on the sampling grid (isotropic),
    mirroring p 0.5 per axis; noise p 0.1 (std in [0, 0.1]); blur p 0.2 (sigma
    0.5..1, per channel p 0.5); brightness and contrast p 0.15 (0.75..1.25);
    low resolution p 0.25 (zoom 0.5..1, per channel p 0.5); gamma on the
    inverted image p 0.1 and gamma p 0.3 (0.7..1.5, stats retained).
    Not reproduced: nnU-Net crops from a larger patch (no padding), fills
    image padding with 0 and interpolates labels linearly (one-hot).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    d = default_augment_config().to_dict()
    dummy_2d = spatial_dims == 3 and anisotropic
    if spatial_dims == 2:
        degrees = 15.0 if anisotropic else 180.0
    else:
        degrees = 180.0 if dummy_2d else 30.0
    d.update(
        p_rotate=0.2, rotate_degrees=degrees, rotate_3d_axes="inplane" if dummy_2d else "all",
        p_scale=0.2, scale_range=(0.7, 1.4), scale_inverse=True,
        scale_axes=(1, 2) if dummy_2d else (), p_flip=0.5, flip_axes=(),
        p_noise=0.1, noise_std=0.1,
        p_blur=0.2, blur_sigma=(0.5, 1.0), p_blur_channel=0.5,
        p_brightness=0.15, brightness_range=(0.75, 1.25),
        p_contrast=0.15, contrast_range=(0.75, 1.25),
        p_lowres=0.25, lowres_range=(0.5, 1.0), p_lowres_channel=0.5,
        lowres_axes=(1, 2) if dummy_2d else (),
        p_gamma_invert=0.1, p_gamma=0.3, gamma_range=(0.7, 1.5), gamma_retain_stats=True,
        intensity_per_channel=True, factors_split_at_one=True,
    )
    return ml_collections.ConfigDict(d)
