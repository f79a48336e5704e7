"""data.context_slices: neighbouring slices as extra input channels of a 2D model (2.5D)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.data import augment, nifti, preprocess


def test_neighbours_become_channels_clamped_at_the_ends():
    image = np.arange(2 * 2 * 1 * 3, dtype=np.float32).reshape(2, 2, 1, 3)  # (C, X, Y, Z)
    out = preprocess.with_context(image, 1, slice_axis=2)
    assert out.shape == (6, 2, 1, 3)
    np.testing.assert_array_equal(out[2:4], image)  # the centre block is the image
    # Channel o*C + c: channel c of slice z + o - 1, the first / last slice repeated.
    np.testing.assert_array_equal(out[0, ..., 0], image[0, ..., 0])  # z=-1 -> 0
    np.testing.assert_array_equal(out[0, ..., 2], image[0, ..., 1])
    np.testing.assert_array_equal(out[5, ..., 1], image[1, ..., 2])
    np.testing.assert_array_equal(out[5, ..., 2], image[1, ..., 2])  # z=3 -> 2
    np.testing.assert_array_equal(preprocess.with_context(image, 0, 2), image)
    # Along another slice axis (sagittal): the same along axis 0.
    sag = preprocess.with_context(image, 1, slice_axis=0)
    np.testing.assert_array_equal(sag[4:, 0], image[:, 1])
    np.testing.assert_array_equal(sag[4:, 1], image[:, 1])


def test_a_2d_image_has_no_neighbours(make_tiny_config):
    config = make_tiny_config(**{"data.context_slices": 1})
    case = nifti.Case(case_id="us_001", task="SynthUS", image=np.zeros((1, 4, 4), np.float32),
                      label=None, spacing=(1.0, 1.0), affine=np.eye(4),
                      original_affine=np.eye(4), original_shape=(4, 4, 1), modalities=("US",))
    plans = {"intensity": {"SynthUS": [{"scheme": "zscore"}]}}
    with pytest.raises(ValueError, match="context_slices=1: case SynthUS/us_001 is a 2D "
                                         "image: it has no neighbouring slices"):
        preprocess.normalized(case, plans, config)


def test_context_field_is_checked(make_tiny_config):
    from medseg_jax.config import validate

    with pytest.raises(ValueError, match="config.data.context_slices: must be >= 0, got -1"):
        validate(make_tiny_config(**{"data.context_slices": -1}))
    with pytest.raises(ValueError, match="config.data.context_slices: 1: .* model.spatial_dims=2"):
        validate(make_tiny_config(**{"data.context_slices": 1, "model.spatial_dims": 3,
                                     "data.image_size": (16, 16, 4)}))


def test_per_channel_augmentation_draws_are_shared_by_the_context_slices():
    """nnU-Net's intensity steps draw per channel; the neighbouring slices of one modality
    must take the same draw, as the slices of a 3D patch do."""
    from medseg_jax.data.augment import nnunet_augment_config

    cfg = nnunet_augment_config(2)
    for name in ("p_blur", "p_brightness", "p_contrast", "p_lowres", "p_gamma"):
        cfg[name] = 1.0
    cfg.p_blur_channel, cfg.p_lowres_channel, cfg.p_noise = 0.5, 0.5, 0.0
    base = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
    images = jnp.tile(base, (1, 1, 1, 3))  # one modality, three identical slices
    labels = jnp.zeros((4, 16, 16), jnp.int32)
    shared, _ = augment.augment_batch(jax.random.key(0), images, labels, cfg, context=1)
    np.testing.assert_allclose(shared[..., 0], shared[..., 1], atol=1e-6)
    np.testing.assert_allclose(shared[..., 2], shared[..., 1], atol=1e-6)
    independent, _ = augment.augment_batch(jax.random.key(0), images, labels, cfg)
    assert float(jnp.abs(independent[..., 0] - independent[..., 1]).max()) > 1e-3
    with pytest.raises(ValueError, match="4 channels, not a multiple of the 3 slices"):
        augment.augment_batch(jax.random.key(0), jnp.tile(base, (1, 1, 1, 4)), labels, cfg,
                              context=1)


@pytest.mark.parametrize("in_plane", ["resize", "spacing"])
def test_2d_model_with_context_slices_trains_evaluates_and_predicts(make_tiny_config,
                                                                   tmp_path, in_plane):
    from medseg_jax import evaluate, predict, train
    from medseg_jax.data import cache, synthetic

    roots = synthetic.make_synthetic(str(tmp_path / "data"), num_cases=4, size=16, depth=4)
    volumes = ",".join(r for r in roots if not r.endswith("SynthUS"))  # 3D tasks only
    config = make_tiny_config(**{"data.root": volumes, "data.in_plane": in_plane,
                                 "data.context_slices": 1, "train.num_epochs": 1,
                                 "data.image_size": (16, 16)})
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    assert set(results["aggregate"]) == {"all", "SynthCT", "SynthMRI"}
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["context_slices"] == 1
    again = evaluate.evaluate(config, workdir, split="test")
    assert again["aggregate"]["all"] == results["aggregate"]["all"]
    # The first convolution reads 3 channels: the slice and its two neighbours.
    dataset, _, samples = cache.prepare(config, workdir)
    assert dataset.num_channels == 3
    first = samples["val"].images if not isinstance(samples["val"], cache.Volumes) else None
    if first is not None:
        assert first.shape[-1] == 3
    # Without context the cache is another one (its fingerprint names the field).
    plain = make_tiny_config(**{"data.root": volumes, "data.in_plane": in_plane,
                                "data.image_size": (16, 16)})
    assert cache._fingerprint(plain, dataset) != cache._fingerprint(config, dataset)
    # Prediction of a new file through the run's own config.
    mri = next(r for r in roots if r.endswith("SynthMRI"))
    image = sorted(os.listdir(os.path.join(mri, "imagesTr")))[0]
    out = tmp_path / "pred"
    predict.predict(config, workdir, os.path.join(mri, "imagesTr", image), str(out),
                    task="SynthMRI")
    assert [p.name for p in out.iterdir() if p.name != ".medseg_predict.json"] == [image]
