"""Left / right label pairs: found from names, swapped by mirrors in augmentation and TTA."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medseg_jax import sharding
from medseg_jax import state as state_lib
from medseg_jax.config import default_config
from medseg_jax.data import augment, laterality

OPENKBP = {0: "background", 1: "Brainstem", 2: "SpinalCord", 3: "RightParotid",
           4: "LeftParotid", 5: "Esophagus", 6: "Larynx", 7: "Mandible"}


@pytest.mark.parametrize("labels, pairs", [
    (OPENKBP, [(4, 3)]),
    ({1: "Kidney_L", 2: "Kidney_R", 3: "Liver"}, [(1, 2)]),
    ({1: "right kidney", 2: "left kidney", 3: "left lung", 4: "right lung"}, [(2, 1), (3, 4)]),
    ({1: "Optic Nerve L", 2: "Optic Nerve R", 3: "Lens (left)", 4: "Lens (right)"},
     [(1, 2), (3, 4)]),
    ({1: "L_Hippocampus", 2: "R_Hippocampus"}, [(1, 2)]),
    # no pairs: a side without its counterpart, no side at all, "l" inside a name
    ({1: "LeftParotid", 2: "Parotid"}, []),
    ({1: "Anterior", 2: "Posterior"}, []),
    ({1: "Left", 2: "Right"}, []),
    ({1: "L1 vertebra", 2: "L2 vertebra", 3: "lesion l r"}, []),
    ({1: "CTV l boost", 2: "CTV r boost"}, []),
])
def test_find_pairs(labels, pairs):
    assert laterality.find_pairs(labels) == pairs


def test_parse_pairs_and_errors():
    assert laterality.parse_pairs("auto", OPENKBP) == [(4, 3)]
    assert laterality.parse_pairs("none", OPENKBP) == []
    assert laterality.parse_pairs("", OPENKBP) == []
    assert laterality.parse_pairs("3:4, 5:6", OPENKBP) == [(3, 4), (5, 6)]
    for spec, match in (("3-4", "'3-4' is not a pair"), ("3:9", "9 is not a foreground label"),
                        ("0:1", "0 is not a foreground label"), ("3:3", "one pair only"),
                        ("3:4,4:5", "one pair only")):
        with pytest.raises(ValueError, match=r"config\.data\.lateral_pairs: .*" + match):
            laterality.parse_pairs(spec, OPENKBP)


def test_permutation():
    assert laterality.permutation([], 8) is None
    assert laterality.permutation([(4, 3)], 8) == (0, 1, 2, 4, 3, 5, 6, 7)
    cfg = default_config()
    assert laterality.label_permutation(cfg, OPENKBP, 8) == (0, 1, 2, 4, 3, 5, 6, 7)
    cfg.data.lateral_pairs = "none"
    assert laterality.label_permutation(cfg, OPENKBP, 8) is None


def _cfg(**overrides):
    d = augment.default_augment_config().to_dict()
    d.update({p: 0.0 for p in ("p_rotate", "p_scale", "p_flip", "p_brightness", "p_contrast",
                               "p_gamma", "p_noise")})
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def _sided_batch(batch=4):
    """Label 1 on the low half of axis 0, label 2 on the high half; organ 2 not annotated."""
    labels = np.zeros((batch, 8, 6), np.int32)
    labels[:, 1:3, 1:4], labels[:, 5:7, 2:5] = 1, 2
    images = np.random.default_rng(0).normal(size=(batch, 8, 6, 1)).astype(np.float32)
    annotated = np.tile(np.array([[1, 1, 0]], np.float32), (batch, 1))
    return jnp.asarray(images), jnp.asarray(labels), jnp.asarray(annotated)


SWAP = (0, 2, 1)


def _augment(cfg, images, labels, annotated, swap=SWAP, seed=0):
    fn = jax.jit(functools.partial(augment.augment_batch, cfg=cfg, swap=swap))
    return fn(jax.random.key(seed), images, labels, annotated=annotated)


def test_mirror_swaps_the_pair_and_its_annotation_flags():
    images, labels, annotated = _sided_batch()
    out_i, out_l, out_a = _augment(_cfg(p_flip=1.0, flip_axes=(0,)), images, labels, annotated)
    np.testing.assert_array_equal(out_i, jnp.flip(images, 1))
    # A mirrored left organ is labelled as the right one: label 1 stays on the low half.
    np.testing.assert_array_equal(out_l, jnp.asarray(SWAP)[jnp.flip(labels, 1)])
    np.testing.assert_array_equal(out_l[:, :4] > 0, out_l[:, :4] == 1)
    np.testing.assert_array_equal(out_a, annotated[:, jnp.asarray(SWAP)])
    # Without a permutation the labels are only flipped (the behaviour of "none").
    _, plain = _augment(_cfg(p_flip=1.0, flip_axes=(0,)), images, labels, None, swap=None)
    np.testing.assert_array_equal(plain, jnp.flip(labels, 1))


def test_two_flips_are_a_rotation_and_swap_nothing():
    images, labels, annotated = _sided_batch()
    out_i, out_l, out_a = _augment(_cfg(p_flip=1.0), images, labels, annotated)
    np.testing.assert_array_equal(out_l, jnp.flip(labels, (1, 2)))
    np.testing.assert_array_equal(out_a, annotated)


def test_swap_follows_each_sample_with_rotation():
    labels = np.zeros((16, 8, 8), np.int32)
    labels[:, 1:3, 1:4], labels[:, 5:7, 2:6] = 1, 2
    images = jnp.asarray(labels[..., None].astype(np.float32) + 10.0 * np.arange(8)[:, None, None])
    annotated = jnp.tile(jnp.array([[1.0, 1.0, 0.0]]), (16, 1))
    cfg = _cfg(p_flip=0.5, flip_axes=(0,), p_rotate=1.0, rotate_degrees=(90.0, 90.0))
    out_i, out_l, out_a = _augment(cfg, images, jnp.asarray(labels), annotated)
    mirrored = np.asarray(out_a[:, 1] == 0)  # the annotation flags moved with the labels
    assert 0 < mirrored.sum() < 16
    rot = functools.partial(jnp.rot90, k=1, axes=(0, 1))
    for b in range(16):
        if mirrored[b]:
            expected = rot(jnp.asarray(SWAP)[jnp.flip(labels[b], 0)])
            np.testing.assert_allclose(out_i[b], rot(jnp.flip(images[b], 0)), atol=1e-4)
        else:
            expected = rot(labels[b])
            np.testing.assert_allclose(out_i[b], rot(images[b]), atol=1e-4)
        np.testing.assert_array_equal(out_l[b], expected)


def _sided_state(dims=2):
    """A 'network' that knows sides: class 1 on the low half of axis 0, class 2 above."""
    def apply_fn(variables, images, train=False):
        n = images.shape[1]
        low = (jnp.arange(n) < n // 2).reshape((1, n) + (1,) * (images.ndim - 3))
        low = jnp.broadcast_to(low, images.shape[:-1])
        logits = jnp.stack([jnp.zeros(low.shape), 5.0 * low, 5.0 * ~low], -1)
        return logits + 0.0 * variables["params"]["w"]
    return state_lib.TrainState.create(apply_fn=apply_fn, params={"w": jnp.zeros(())},
                                       tx=optax.sgd(0.1), batch_stats={})


def test_tta_swaps_the_channels_of_mirrored_predictions():
    config = default_config()
    config.eval.tta = True
    # The stand-in network finds sides by position along axis 0: equivariant under a
    # mirror of axis 0 with the swap (as a network trained with it), so TTA over that
    # axis must give its own prediction back.
    config.augment.flip_axes = (0,)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, x = _sided_state(), jnp.zeros((2, 8, 6, 1))
    plain = np.asarray(state_lib.make_predict_fn(config, mesh, tta=False)(state, x))
    swapped = np.asarray(state_lib.make_predict_fn(config, mesh, swap=SWAP)(state, x))
    mixed = np.asarray(state_lib.make_predict_fn(config, mesh)(state, x))
    np.testing.assert_allclose(swapped, plain, atol=1e-6)  # sides kept
    assert np.abs(mixed - plain).max() > 0.3  # without the swap, left and right blur
    # TTA flips only the axes training mirrors (axis 1 changes nothing here).
    config.augment.flip_axes = (1,)
    only_1 = np.asarray(state_lib.make_predict_fn(config, mesh)(state, x))
    np.testing.assert_allclose(only_1, plain, atol=1e-6)
    assert state_lib.flip_axes(2, (1,)) == [(), (2,)]
    # Training without mirrors: nothing to average (nnU-Net's no-mirroring trainers).
    assert augment.mirror_axes(config.augment, 2) == (1,)
    config.augment.p_flip = 0.0
    assert augment.mirror_axes(config.augment, 2) == ()
    config.augment.p_flip, config.augment.enabled = 0.5, False
    assert augment.mirror_axes(config.augment, 2) == ()


def test_train_step_swaps_labels_and_annotation_flags_of_mirrored_samples(make_tiny_config):
    """A step on a batch mirrored with the swap costs what the step on the swapped labels
    costs without it (flip and permutation commute): the annotation flags travel too."""
    config = make_tiny_config(**{"augment.enabled": True})
    for p in ("p_rotate", "p_scale", "p_brightness", "p_contrast", "p_gamma", "p_noise"):
        config.augment[p] = 0.0
    config.augment.p_flip, config.augment.flip_axes = 1.0, (0,)
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = state_lib.build_model(config, 3)
    state = state_lib.init_state(config, model, (8, 16, 16, 1), 10, mesh)
    rng = np.random.default_rng(0)
    labels = np.zeros((8, 16, 16), np.int32)
    labels[:, 2:6, 3:9], labels[:, 10:14, 5:12] = 1, 2
    images = rng.normal(size=(8, 16, 16, 1)).astype(np.float32) + labels[..., None]
    annotated = np.tile(np.array([[1, 1, 0]], np.float32), (8, 1))  # organ 2 not contoured
    batch = {"image": images, "label": labels, "annotated": annotated}
    swapped = {"image": images, "label": np.asarray(SWAP)[labels],
               "annotated": annotated[:, list(SWAP)]}
    step = functools.partial(state_lib.train_step, config=config, num_classes=3)
    _, with_swap = jax.jit(functools.partial(step, swap=SWAP))(state, batch)
    _, reference = jax.jit(step)(state, swapped)
    _, plain = jax.jit(step)(state, batch)
    np.testing.assert_allclose(float(with_swap["loss"]), float(reference["loss"]), rtol=1e-6)
    assert abs(float(with_swap["loss"]) - float(plain["loss"])) > 1e-3
