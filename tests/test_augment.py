"""Tests for medseg_jax.data.augment (tiny 2D and 3D shapes, CPU)."""

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medseg_jax.data import augment

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
