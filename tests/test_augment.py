"""Tests for medseg_jax.data.augment (tiny 2D and 3D shapes, CPU)."""

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medseg_jax.data import augment, filters

_ALL_P = ("p_rotate", "p_scale", "p_flip", "p_brightness", "p_contrast", "p_gamma", "p_noise")
_INTENSITY_P = ("p_brightness", "p_contrast", "p_gamma", "p_noise")


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    """Default config with every probability 0, then ``overrides``.

    Built from a dict so fields may change type (e.g. a fixed angle pair).
    """
    d = augment.default_augment_config().to_dict()
    d.update({p: 0.0 for p in _ALL_P})
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def make_batch(spatial: tuple[int, ...], batch: int = 2, channels: int = 2, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(k1, (batch, *spatial, channels), jnp.float32)
    labels = jax.random.choice(k2, jnp.array([0, 2, 5], jnp.int32), (batch, *spatial))
    return images, labels


def run(key: jax.Array, images: jax.Array, labels: jax.Array, cfg):
    """``augment_batch`` under ``jax.jit`` (as in the train step; one compile per test)."""
    return jax.jit(functools.partial(augment.augment_batch, cfg=cfg))(key, images, labels)


def bits(x: jax.Array) -> np.ndarray:
    """Raw bits, for bit-exact comparisons (distinguishes -0.0 from 0.0)."""
    x = np.asarray(x)
    return x.view(np.uint32) if x.dtype == np.float32 else x


SHAPES = [(8, 8), (6, 6, 6)]


def test_default_config_fields():
    cfg = augment.default_augment_config()
    assert cfg.enabled is True
    assert cfg.p_rotate == 0.5 and cfg.rotate_degrees == 15.0 and cfg.rotate_3d_axes == "all"
    assert cfg.p_scale == 0.5 and tuple(cfg.scale_range) == (0.85, 1.15)
    assert cfg.p_flip == 0.5 and tuple(cfg.flip_axes) == ()
    assert cfg.p_brightness == 0.15 and tuple(cfg.brightness_range) == (0.75, 1.25)
    assert cfg.p_contrast == 0.15 and tuple(cfg.contrast_range) == (0.75, 1.25)
    assert cfg.p_gamma == 0.15 and tuple(cfg.gamma_range) == (0.7, 1.5)
    assert cfg.p_noise == 0.1 and cfg.noise_std == 0.1


@pytest.mark.parametrize("spatial", SHAPES)
def test_all_probabilities_zero_is_identity(spatial):
    images, labels = make_batch(spatial)
    images = images.at[0, 0].set(-0.0)
    out_i, out_l = run(jax.random.key(1), images, labels, make_cfg())
    np.testing.assert_array_equal(bits(out_i), bits(images))
    np.testing.assert_array_equal(out_l, labels)


def test_disabled_returns_inputs():
    images, labels = make_batch((8, 8))
    cfg = augment.default_augment_config()
    cfg.enabled = False
    out_i, out_l = augment.augment_batch(jax.random.key(1), images, labels, cfg)
    assert out_i is images and out_l is labels


@pytest.mark.parametrize("spatial", SHAPES)
def test_samples_without_geometric_draw_are_bit_identical(spatial):
    images, labels = make_batch(spatial, batch=16)
    cfg = make_cfg(p_rotate=0.5, p_scale=0.5, rotate_degrees=30.0)
    out_i, out_l = run(jax.random.key(3), images, labels, cfg)
    same = [np.array_equal(bits(out_i[b]), bits(images[b])) for b in range(16)]
    assert 0 < sum(same) < 16  # ~25% draw neither rotation nor scaling
    for b in range(16):
        if same[b]:
            np.testing.assert_array_equal(out_l[b], labels[b])


def test_flip_toy_2x2():
    images = jnp.array([[[1.0], [2.0]], [[3.0], [-0.0]]])[None]
    labels = jnp.array([[0, 1], [2, 3]], jnp.int32)[None]
    out_i, out_l = augment.augment_batch(jax.random.key(0), images, labels, make_cfg(p_flip=1.0))
    np.testing.assert_array_equal(bits(out_i), bits(jnp.flip(images, axis=(1, 2))))
    np.testing.assert_array_equal(out_l, jnp.flip(labels, axis=(1, 2)))


@pytest.mark.parametrize("spatial", SHAPES)
def test_flip_all_axes_exact(spatial):
    images, labels = make_batch(spatial, batch=3)
    axes = tuple(range(1, len(spatial) + 1))
    out_i, out_l = run(jax.random.key(0), images, labels, make_cfg(p_flip=1.0))
    np.testing.assert_array_equal(bits(out_i), bits(jnp.flip(images, axis=axes)))
    np.testing.assert_array_equal(out_l, jnp.flip(labels, axis=axes))


def test_flip_axes_restricts_flips():
    images, labels = make_batch((6, 6, 6))
    cfg = make_cfg(p_flip=1.0, flip_axes=(-1,))
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    np.testing.assert_array_equal(out_i, jnp.flip(images, axis=3))
    np.testing.assert_array_equal(out_l, jnp.flip(labels, axis=3))


def test_rotation_matrix_helper():
    r = augment.rotation_matrix(jnp.deg2rad(jnp.array([90.0])), 2)
    np.testing.assert_allclose(r @ jnp.array([1.0, 0.0]), [0.0, 1.0], atol=1e-6)
    r3 = augment.rotation_matrix(jnp.deg2rad(jnp.array([90.0, 0.0, 0.0])), 3)
    np.testing.assert_allclose(r3 @ jnp.array([0.0, 1.0, 0.0]), [0.0, 0.0, 1.0], atol=1e-6)
    r3 = augment.rotation_matrix(jnp.deg2rad(jnp.array([10.0, 20.0, 30.0])), 3)
    np.testing.assert_allclose(r3 @ r3.T, np.eye(3), atol=1e-6)
    m = augment.affine_matrix(jnp.zeros(1), 2.0, jnp.array([True, False]), 2)
    np.testing.assert_allclose(m, [[-2.0, 0.0], [0.0, 2.0]])
    args = (jnp.array([0.3, -0.2, 0.5]), 1.1, jnp.array([True, False, True]), 3)
    np.testing.assert_allclose(
        augment.affine_matrix(*args) @ augment.inverse_affine_matrix(*args), np.eye(3), atol=1e-6)


def test_rotation_applies_after_flip():
    labels = jnp.arange(64, dtype=jnp.int32).reshape(1, 8, 8)
    images = labels[..., None].astype(jnp.float32)
    cfg = make_cfg(p_rotate=1.0, rotate_degrees=(90.0, 90.0), p_flip=1.0, flip_axes=(0,))
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    expected = jnp.rot90(jnp.flip(labels, axis=1), 1, axes=(1, 2))
    np.testing.assert_array_equal(out_l, expected)
    np.testing.assert_allclose(out_i[..., 0], expected.astype(jnp.float32), atol=1e-4)


def test_rotate_90_2d():
    images = jnp.arange(64.0).reshape(1, 8, 8, 1)
    labels = jnp.arange(64, dtype=jnp.int32).reshape(1, 8, 8)
    cfg = make_cfg(p_rotate=1.0, rotate_degrees=(90.0, 90.0))
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    np.testing.assert_allclose(out_i, jnp.rot90(images, 1, axes=(1, 2)), atol=1e-4)
    np.testing.assert_array_equal(out_l, jnp.rot90(labels, 1, axes=(1, 2)))


@pytest.mark.parametrize("axes_mode", ["all", "inplane"])
def test_rotate_90_3d(axes_mode):
    images, _ = make_batch((6, 6, 6), batch=1)
    labels = jnp.arange(216, dtype=jnp.int32).reshape(1, 6, 6, 6)
    cfg = make_cfg(p_rotate=1.0, rotate_degrees=(90.0, 90.0), rotate_3d_axes=axes_mode)
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)

    def expected(x):  # axis 2 first, then axis 1, then axis 0
        if axes_mode == "all":
            x = jnp.rot90(x, 1, axes=(1, 2))  # about spatial axis 2
            x = jnp.rot90(x, 1, axes=(3, 1))  # about spatial axis 1
        return jnp.rot90(x, 1, axes=(2, 3))  # about spatial axis 0

    np.testing.assert_allclose(out_i, expected(images), atol=1e-5)
    np.testing.assert_array_equal(out_l, expected(labels))


def test_zoom_in_enlarges_and_fill_is_minimum():
    labels = jnp.zeros((1, 16, 16), jnp.int32).at[0, 6:10, 6:10].set(1)
    images = labels[..., None].astype(jnp.float32) * 3.0 - 2.0
    cfg = make_cfg(p_scale=1.0, scale_range=(2.0, 2.0))
    _, out_l = run(jax.random.key(0), images, labels, cfg)
    assert int(out_l.sum()) == 64  # 4x4 square zoomed twice -> 8x8
    cfg = make_cfg(p_rotate=1.0, rotate_degrees=(45.0, 45.0))
    out_i, _ = run(jax.random.key(0), images, labels, cfg)
    assert float(out_i[0, 0, 0, 0]) == -2.0  # corner left the field of view


@pytest.mark.parametrize("spatial", SHAPES)
def test_labels_stay_in_input_set(spatial):
    images, labels = make_batch(spatial, batch=4)
    cfg = make_cfg(p_rotate=1.0, rotate_degrees=40.0, p_scale=1.0, scale_range=(0.7, 1.4),
                   p_flip=0.5, **{p: 1.0 for p in _INTENSITY_P})
    for seed in range(3):
        _, out_l = run(jax.random.key(seed), images, labels, cfg)
        assert set(np.unique(out_l)) <= set(np.unique(labels))


@pytest.mark.parametrize("spatial", SHAPES)
def test_same_key_same_output_different_key_differs(spatial):
    images, labels = make_batch(spatial, batch=4)
    cfg = augment.default_augment_config()
    cfg.p_rotate = cfg.p_scale = 1.0
    a = run(jax.random.key(7), images, labels, cfg)
    b = run(jax.random.key(7), images, labels, cfg)
    c = run(jax.random.key(8), images, labels, cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("spatial", SHAPES)
def test_jit_vmap_and_sharding(spatial):
    images, labels = make_batch(spatial, batch=8)
    cfg = augment.default_augment_config()
    cfg.update({p: 1.0 for p in _ALL_P})
    fn = functools.partial(augment.augment_batch, cfg=cfg)
    jitted = jax.jit(fn)(jax.random.key(0), images, labels)

    keys = jax.random.split(jax.random.key(1), 2)
    vi, vl = jax.jit(jax.vmap(fn))(keys, images.reshape(2, 4, *images.shape[1:]),
                                    labels.reshape(2, 4, *labels.shape[1:]))
    assert vi.shape == (2, 4, *images.shape[1:]) and vl.shape == (2, 4, *labels.shape[1:])

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    si, sl = jax.jit(fn)(jax.random.key(0), jax.device_put(images, sharding),
                         jax.device_put(labels, sharding))
    np.testing.assert_allclose(si, jitted[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sl, jitted[1])


@pytest.mark.parametrize(
    "spatial,image_dtype,label_dtype",
    [((8, 8), jnp.float32, jnp.int32), ((6, 6, 6), jnp.float32, jnp.uint8),
     ((8, 8), jnp.bfloat16, jnp.uint8)],
)
def test_shapes_dtypes_finite(spatial, label_dtype, image_dtype):
    images, labels = make_batch(spatial, batch=3, channels=3)
    images, labels = images.astype(image_dtype), labels.astype(label_dtype)
    images = images.at[1].set(1.0)  # a constant sample: gamma/contrast must stay finite
    cfg = augment.default_augment_config()
    cfg.update({p: 1.0 for p in _ALL_P})
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    assert out_i.shape == images.shape and out_i.dtype == images.dtype
    assert out_l.shape == labels.shape and out_l.dtype == labels.dtype
    assert bool(jnp.all(jnp.isfinite(out_i)))


@pytest.mark.parametrize("spatial", SHAPES)
def test_intensity_leaves_labels_untouched(spatial):
    images, labels = make_batch(spatial, batch=4)
    cfg = make_cfg(**{p: 1.0 for p in _INTENSITY_P})
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    np.testing.assert_array_equal(out_l, labels)
    assert not np.allclose(out_i, images)


def test_contrast_clipped_to_original_range():
    images, labels = make_batch((8, 8), batch=4, channels=1)
    cfg = make_cfg(p_contrast=1.0, contrast_range=(2.0, 2.0))
    out_i, _ = run(jax.random.key(0), images, labels, cfg)
    axes = (1, 2, 3)
    assert bool(jnp.all(out_i.min(axes) >= images.min(axes)))
    assert bool(jnp.all(out_i.max(axes) <= images.max(axes)))
    assert bool(jnp.all(out_i.std(axes) > images.std(axes)))


def test_gamma_keeps_range():
    images, labels = make_batch((8, 8), batch=2, channels=1)
    cfg = make_cfg(p_gamma=1.0, gamma_range=(1.5, 1.5))
    out_i, _ = run(jax.random.key(0), images, labels, cfg)
    np.testing.assert_allclose(out_i.min((1, 2, 3)), images.min((1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(out_i.max((1, 2, 3)), images.max((1, 2, 3)), atol=1e-5)


def test_partial_config_object_uses_defaults():
    images, labels = make_batch((8, 8))
    cfg = types.SimpleNamespace(p_rotate=0.0, p_scale=0.0, p_flip=0.0, p_brightness=0.0,
                                p_contrast=0.0, p_gamma=0.0, p_noise=0.0)
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    np.testing.assert_array_equal(out_i, images)
    np.testing.assert_array_equal(out_l, labels)


def test_invalid_config_raises():
    images, labels = make_batch((8, 8))
    with pytest.raises(ValueError):
        run(jax.random.key(0), images, labels, make_cfg(p_flip=1.0, flip_axes=(2,)))
    images, labels = make_batch((6, 6, 6))
    with pytest.raises(ValueError):
        run(jax.random.key(0), images, labels,
                              make_cfg(p_rotate=1.0, rotate_3d_axes="sideways"))


# --- nnU-Net's further transforms: blur, low resolution, inverted gamma, ... ---------

_NEW_P = ("p_blur", "p_lowres", "p_gamma_invert")


@pytest.mark.parametrize("spatial", SHAPES)
def test_default_config_bit_identical_to_baseline(spatial):
    """With the transforms added later left off, the default augmentation (and every
    earlier transform at probability 1) is bit for bit what it was before them:
    tests/augment_baseline.py, the module as it was then."""
    import augment_baseline as old

    images, labels = make_batch(spatial, batch=6, channels=2)
    all_on = augment.default_augment_config()
    all_on.update({p: 1.0 for p in _ALL_P})
    for cfg in (augment.default_augment_config(), all_on):
        old_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.items()
                                             if k in old.default_augment_config()})
        for seed in range(3):
            new_i, new_l = run(jax.random.key(seed), images, labels, cfg)
            old_i, old_l = jax.jit(functools.partial(old.augment_batch, cfg=old_cfg))(
                jax.random.key(seed), images, labels)
            np.testing.assert_array_equal(bits(new_i), bits(old_i))
            np.testing.assert_array_equal(new_l, old_l)


def test_new_fields_default_off():
    cfg = augment.default_augment_config()
    assert all(cfg[p] == 0.0 for p in _NEW_P)
    assert tuple(cfg.blur_sigma) == (0.5, 1.0) and cfg.p_blur_channel == 0.5
    assert tuple(cfg.lowres_range) == (0.5, 1.0) and cfg.p_lowres_channel == 0.5
    assert tuple(cfg.lowres_axes) == () and tuple(cfg.scale_axes) == ()
    assert not (cfg.scale_inverse or cfg.intensity_per_channel or cfg.factors_split_at_one
                or cfg.gamma_retain_stats)
    assert not augment._uses_extra(cfg)


@pytest.mark.parametrize("dims,aniso", [(2, False), (2, True), (3, False), (3, True)])
def test_nnunet_augment_config_values(dims, aniso):
    cfg = augment.nnunet_augment_config(dims, anisotropic=aniso)
    assert set(cfg.keys()) == set(augment.default_augment_config().keys())
    assert cfg.enabled
    assert cfg.p_rotate == 0.2 and cfg.p_scale == 0.2 and cfg.p_flip == 0.5
    assert cfg.rotate_degrees == {(2, False): 180.0, (2, True): 15.0,
                                  (3, False): 30.0, (3, True): 180.0}[dims, aniso]
    dummy_2d = dims == 3 and aniso
    assert cfg.rotate_3d_axes == ("inplane" if dummy_2d else "all")
    assert tuple(cfg.scale_range) == (0.7, 1.4) and cfg.scale_inverse
    assert tuple(cfg.scale_axes) == tuple(cfg.lowres_axes) == ((1, 2) if dummy_2d else ())
    assert cfg.p_noise == 0.1 and cfg.noise_std == 0.1
    assert cfg.p_blur == 0.2 and tuple(cfg.blur_sigma) == (0.5, 1.0) and cfg.p_blur_channel == 0.5
    assert cfg.p_brightness == 0.15 and tuple(cfg.brightness_range) == (0.75, 1.25)
    assert cfg.p_contrast == 0.15 and tuple(cfg.contrast_range) == (0.75, 1.25)
    assert cfg.p_lowres == 0.25 and tuple(cfg.lowres_range) == (0.5, 1.0)
    assert cfg.p_lowres_channel == 0.5
    assert cfg.p_gamma_invert == 0.1 and cfg.p_gamma == 0.3
    assert tuple(cfg.gamma_range) == (0.7, 1.5) and cfg.gamma_retain_stats
    assert cfg.intensity_per_channel and cfg.factors_split_at_one
    base = augment.default_augment_config()
    base.update(cfg.to_dict())  # same field types: usable as an override of config.augment
    with pytest.raises(ValueError):
        augment.nnunet_augment_config(1)


@pytest.mark.parametrize("dims,aniso", [(2, False), (3, False), (3, True)])
def test_nnunet_config_runs_deterministic(dims, aniso):
    images, labels = make_batch((8, 8) if dims == 2 else (6, 6, 6), batch=4, channels=2)
    images = images.at[1].set(1.0)  # a constant sample stays finite
    cfg = augment.nnunet_augment_config(dims, anisotropic=aniso)
    cfg.update({p: 1.0 for p in ("p_rotate", "p_scale", "p_blur", "p_lowres", "p_gamma_invert",
                                 "p_gamma", "p_brightness", "p_contrast", "p_noise")})
    a = run(jax.random.key(5), images, labels, cfg)
    b = run(jax.random.key(5), images, labels, cfg)
    c = run(jax.random.key(6), images, labels, cfg)
    np.testing.assert_array_equal(bits(a[0]), bits(b[0]))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert bool(jnp.all(jnp.isfinite(a[0])))
    assert set(np.unique(a[1])) <= set(np.unique(labels))


@pytest.mark.parametrize("spatial", SHAPES)
def test_new_intensity_transforms_leave_labels_untouched(spatial):
    images, labels = make_batch(spatial, batch=4)
    cfg = make_cfg(p_blur=1.0, p_blur_channel=1.0, p_lowres=1.0, p_lowres_channel=1.0,
                   p_gamma_invert=1.0, gamma_retain_stats=True, intensity_per_channel=True,
                   factors_split_at_one=True, **{p: 1.0 for p in _INTENSITY_P})
    out_i, out_l = run(jax.random.key(0), images, labels, cfg)
    np.testing.assert_array_equal(out_l, labels)
    assert not np.allclose(out_i, images)


@pytest.mark.parametrize("spatial", [(12, 12), (8, 10, 12)])
def test_blur_keeps_constant_and_smooths_noise(spatial):
    images, labels = make_batch(spatial, batch=3, channels=2)
    cfg = make_cfg(p_blur=1.0, p_blur_channel=1.0, blur_sigma=(0.5, 1.0))
    out_i, _ = run(jax.random.key(0), images, labels, cfg)
    axes = tuple(range(1, len(spatial) + 1))
    assert bool(jnp.all(out_i.var(axes) < 0.8 * images.var(axes)))
    np.testing.assert_allclose(out_i.mean(axes), images.mean(axes), atol=0.1)
    const = jnp.full_like(images, 2.5)
    out_c, _ = run(jax.random.key(0), const, labels, cfg)
    np.testing.assert_allclose(out_c, const, rtol=1e-6)


def test_blur_matches_scipy_gaussian_filter():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    x = np.asarray(jax.random.normal(jax.random.key(0), (9, 11, 7, 2)))
    sigmas = np.array([[1.0, 0.5], [0.7, 1.0], [0.5, 0.8]], np.float32)  # (axis, channel)
    out = np.asarray(filters.gaussian_blur(jnp.asarray(x), jnp.asarray(sigmas), radius=3))
    for c in range(2):  # scipy "mirror" is numpy's "reflect"; radius floor(3 sigma + 1/4)
        ref = x[..., c]
        for a in range(3):
            s = float(sigmas[a, c])
            ref = scipy_ndimage.gaussian_filter1d(ref, s, axis=a, mode="mirror",
                                                  truncate=np.floor(3 * s + 0.25) / s)
        np.testing.assert_allclose(out[..., c], ref, atol=1e-5)


def test_blur_kernel_size_as_nnunet():
    """nnU-Net: size = the odd number nearest 6 sigma + 0.5 (ties as its rounding)."""
    def nnunet_size(sigma):
        v = sigma * 6 + 0.5
        r = round(v)
        return r if r % 2 == 1 else (r + 1 if v - r >= 0 else r - 1)

    for sigma in np.linspace(0.5, 1.0, 26):
        impulse = jnp.zeros((15, 1)).at[7, 0].set(1.0)
        out = filters.gaussian_blur(impulse, jnp.full((1, 1), sigma, jnp.float32), radius=3)
        assert int(jnp.sum(out > 0)) == nnunet_size(float(sigma)), sigma


def test_blur_channel_probability_zero_skips():
    images, labels = make_batch((8, 8), batch=2)
    out_i, _ = run(jax.random.key(0), images, labels,
                   make_cfg(p_blur=1.0, p_blur_channel=0.0, p_lowres=1.0, p_lowres_channel=0.0))
    np.testing.assert_array_equal(bits(out_i), bits(images))


@pytest.mark.parametrize("zoom", [0.5, 0.75, 0.6])
def test_low_resolution_equals_nearest_down_linear_up(zoom):
    x = jax.random.normal(jax.random.key(1), (8, 10, 12))
    low = functools.partial(filters.simulate_low_resolution, zooms=jnp.array([zoom]))
    out = low(x[..., None], axes=(0, 1, 2))[..., 0]
    coarse = tuple(max(1, round(n * zoom)) for n in x.shape)
    ref = jax.image.resize(jax.image.resize(x, coarse, "nearest"), x.shape, "linear")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    if zoom == 0.5:  # nearest keeps one voxel of each 2x2x2 block: blocks are what counts
        blocks = x[1::2, 1::2, 1::2]
        for a in range(3):
            blocks = jnp.repeat(blocks, 2, axis=a)
        np.testing.assert_array_equal(
            low(blocks[..., None], axes=(0, 1, 2))[..., 0], out)
    only_last = low(x[..., None], axes=(2,))[..., 0]
    ref = jax.image.resize(jax.image.resize(x, (8, 10, coarse[2]), "nearest"), x.shape, "linear")
    np.testing.assert_allclose(only_last, ref, atol=1e-5)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 12, 12)])
def test_low_resolution_smooths_and_zoom_one_is_identity(spatial):
    images, labels = make_batch(spatial, batch=2, channels=1)
    axes = tuple(range(1, len(spatial) + 1))

    def roughness(x):  # mean squared difference of neighbours
        return sum(float(jnp.mean(jnp.diff(x, axis=a) ** 2)) for a in axes)

    half = make_cfg(p_lowres=1.0, p_lowres_channel=1.0, lowres_range=(0.5, 0.5))
    out_i, _ = run(jax.random.key(0), images, labels, half)
    assert roughness(out_i) < 0.5 * roughness(images)
    one = make_cfg(p_lowres=1.0, p_lowres_channel=1.0, lowres_range=(1.0, 1.0))
    out_i, _ = run(jax.random.key(0), images, labels, one)
    np.testing.assert_array_equal(out_i, images)
    # lowres_axes=(1, 2): the first axis (anisotropic) keeps its resolution
    if len(spatial) == 3:
        cfg = make_cfg(p_lowres=1.0, p_lowres_channel=1.0, lowres_range=(0.5, 0.5),
                       lowres_axes=(1, 2))
        out_i, _ = run(jax.random.key(0), images, labels, cfg)
        half = jnp.array([0.5])
        ref = jax.vmap(lambda x: filters.simulate_low_resolution(x, half, (1, 2)))(images)
        np.testing.assert_allclose(out_i, ref, atol=1e-6)


@pytest.mark.parametrize("spatial", [(24, 24), (20, 20, 20)])
@pytest.mark.parametrize("variant", ["default", "nnunet", "aniso"])
def test_label_stays_aligned_with_thresholded_image(spatial, variant):
    """A label equal to ``image >= t`` stays so after rotation, zoom and flips,
    except where the image is within interpolation error of ``t``."""
    ndim = len(spatial)
    if variant == "aniso" and ndim == 2:
        pytest.skip("anisotropic mode is 3D")
    centre = np.array([(n - 1) / 2 - 1.5 for n in spatial])  # off-centre: flips matter
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in spatial],
                                indexing="ij"), -1)
    cone = 10.0 - np.sqrt(((grid - centre) ** 2).sum(-1))  # Lipschitz 1, peak 10
    images = jnp.asarray(np.stack([cone, -cone + 3.0])[..., None], jnp.float32)
    t = 6.0  # a ball of radius 4
    labels = (images[..., 0] >= t).astype(jnp.int32)
    if variant == "default":
        cfg = make_cfg(p_rotate=1.0, rotate_degrees=40.0, p_scale=1.0, p_flip=0.5)
    else:
        cfg = augment.nnunet_augment_config(ndim, anisotropic=variant == "aniso")
        cfg.update({p: 0.0 for p in ("p_noise", "p_blur", "p_brightness", "p_contrast",
                                     "p_lowres", "p_gamma_invert", "p_gamma")})
        cfg.update(p_rotate=1.0, p_scale=1.0)
    for seed in range(3):
        out_i, out_l = run(jax.random.key(seed), images, labels, cfg)
        wrong = np.asarray((out_i[..., 0] >= t) != (out_l == 1))
        # sample 0: a ball inside the field of view; only boundary voxels may differ
        assert np.all(np.abs(np.asarray(out_i[0, ..., 0])[wrong[0]] - t) <= 1.0)
        # sample 1: foreground in the corners; where the view is left, the image
        # blends into its fill value (the minimum) over one voxel
        assert wrong.mean() < 0.05
        assert 0 < int(out_l[0].sum()) and not np.array_equal(out_l, labels)


def test_scale_inverse_and_scale_axes():
    labels = jnp.zeros((1, 16, 16), jnp.int32).at[0, 6:10, 6:10].set(1)
    images = labels[..., None].astype(jnp.float32)
    # nnU-Net convention: s = 0.5 on the sampling grid zooms the content by 2
    cfg = make_cfg(p_scale=1.0, scale_range=(0.5, 0.5), scale_inverse=True)
    assert int(run(jax.random.key(0), images, labels, cfg)[1].sum()) == 64
    cfg = make_cfg(p_scale=1.0, scale_range=(2.0, 2.0), scale_axes=(1,))
    _, out_l = run(jax.random.key(0), images, labels, cfg)
    assert int(out_l.sum()) == 32 and int(out_l.any(axis=2).sum()) == 4  # 4 rows x 8 columns
    args = (jnp.array([0.3, -0.2, 0.5]), jnp.array([1.0, 1.3, 0.8]), jnp.array([True, False, True]))
    np.testing.assert_allclose(augment.affine_matrix(*args, 3)
                               @ augment.inverse_affine_matrix(*args, 3), np.eye(3), atol=1e-6)


def test_split_factor_sampling():
    u = jnp.linspace(0.0, 0.999, 1000)
    f = np.asarray(augment._factor(u, (0.7, 1.5), split=True))
    assert np.all((f >= 0.7) & (f < 1.5)) and abs(np.mean(f < 1.0) - 0.5) < 0.01
    np.testing.assert_array_equal(augment._factor(u, (1.2, 1.5), True),
                                  augment._lerp(u, (1.2, 1.5)))


def test_gamma_retain_stats_and_inverted():
    images, labels = make_batch((12, 12), batch=4, channels=2)
    axes = (1, 2)
    for name in ("p_gamma", "p_gamma_invert"):
        cfg = make_cfg(gamma_range=(1.5, 1.5), gamma_retain_stats=True, **{name: 1.0})
        out_i, out_l = run(jax.random.key(0), images, labels, cfg)
        np.testing.assert_allclose(out_i.mean(axes), images.mean(axes), atol=1e-5)
        np.testing.assert_allclose(out_i.std(axes), images.std(axes), rtol=1e-4)
        assert not np.allclose(out_i, images)
    # inverted gamma without retained stats: gamma applied from the top of the range
    images = jnp.linspace(0.0, 1.0, 16).reshape(1, 4, 4, 1)
    labels = jnp.zeros((1, 4, 4), jnp.int32)
    out_i, _ = run(jax.random.key(0), images, labels,
                   make_cfg(gamma_range=(2.0, 2.0), p_gamma_invert=1.0))
    np.testing.assert_allclose(out_i, 1.0 - (1.0 - images) ** 2, atol=1e-5)


def test_intensity_per_channel_factors_differ():
    images = jnp.ones((8, 4, 4, 3))
    labels = jnp.zeros((8, 4, 4), jnp.int32)
    cfg = make_cfg(p_brightness=1.0, brightness_range=(0.5, 1.5))
    out_i, _ = run(jax.random.key(0), images, labels, cfg)
    assert np.allclose(out_i, out_i[..., :1])  # one factor per sample
    cfg = make_cfg(p_brightness=1.0, brightness_range=(0.5, 1.5), intensity_per_channel=True)
    out_i, _ = run(jax.random.key(0), images, labels, cfg)
    assert not np.allclose(out_i[..., 0], out_i[..., 1])
