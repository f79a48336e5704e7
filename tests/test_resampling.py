"""nnU-Net's resampling (one-hot labels, cubic images, separate coarse axis) and the crop
to the non-zero region, against hand-made cases."""

import dataclasses

import numpy as np
import pytest
from conftest import tiny_config

from medseg_jax.data import cache, nifti, preprocess, resampling
from medseg_jax.data import dataset as dataset_lib


def test_one_hot_labels_keep_a_thin_structure_nearest_neighbour_drops():
    label = np.zeros((8, 8), np.uint8)
    label[2] = 1  # one voxel thick: halved by a 2x shrink
    assert preprocess.resize(label, (4, 4), order=0).sum() == 0  # nearest misses row 2
    out = resampling.resize_label(label, (4, 4))
    np.testing.assert_array_equal(out[1], 1)
    assert out.sum() == 4 and out.dtype == np.uint8


def test_one_hot_labels_take_the_argmax_of_three_classes():
    # A 2x shrink averages each 2x2 block; the class covering most of it wins.
    blocks = [[[1, 1], [2, 0]], [[2, 2], [0, 1]], [[0, 2], [1, 1]], [[2, 0], [0, 0]]]
    label = np.zeros((4, 4), np.uint8)
    for k, block in enumerate(blocks):
        i, j = divmod(k, 2)
        label[2 * i:2 * i + 2, 2 * j:2 * j + 2] = block
    out = resampling.resize_label(label, (2, 2))
    np.testing.assert_array_equal(out, [[1, 2], [1, 0]])
    # Nearest-neighbour takes one corner of each block instead.
    assert not np.array_equal(preprocess.resize(label, (2, 2), order=0), out)


def test_images_are_cubic_and_clipped_to_their_range():
    x = np.linspace(0.0, 1.0, 20, dtype=np.float32)
    image = np.repeat((x ** 3)[:, None], 4, axis=1)[..., None]  # (20, 4, 1)
    cubic = resampling.resize_channels(image, (39, 4), 3)[..., 0]
    linear = resampling.resize_channels(image, (39, 4), 1)[..., 0]
    # Between two samples (away from the ends) a cubic spline follows x**3 more closely.
    exact = (((np.arange(39) + 0.5) * 20 / 39 - 0.5) / 19) ** 3
    inner = slice(8, 31)
    assert (np.abs(cubic[inner, 0] - exact[inner]).max() * 10
            < np.abs(linear[inner, 0] - exact[inner]).max())
    # A step would overshoot: the result stays within the input's range.
    step = np.zeros((8, 2, 1), np.float32)
    step[4:] = 1.0
    out = resampling.resize_channels(step, (21, 2), 3)
    assert out.min() == 0.0 and out.max() == 1.0


def test_separate_axis_is_decided_as_nnunet_decides_it():
    d = resampling.separate_axis((0.8, 0.8, 5.0), (0.8, 0.8, 2.5))
    assert d == {"separate_z": True, "lowres_axis": 2, "reason": "case spacing ratio 6.25 > 3"}
    d = resampling.separate_axis((1.0, 1.0, 2.0), (4.0, 1.0, 1.0))  # the target's ratio
    assert d["separate_z"] and d["lowres_axis"] == 0 and d["reason"].startswith("target")
    assert not resampling.separate_axis((1.0, 1.0, 2.5), (1.0, 1.0, 1.0))["separate_z"]
    d = resampling.separate_axis((4.0, 4.0, 1.0), (4.0, 4.0, 1.0))  # two coarse axes
    assert not d["separate_z"] and "2 axes share" in d["reason"]
    assert not resampling.separate_axis((1.0, 5.0), (1.0, 1.0))["separate_z"]


def test_the_coarse_axis_of_an_anisotropic_case_is_never_interpolated():
    """Slices 5 mm apart resampled to 2.5 mm: every new slice is a copy of one old slice
    (order 0), while in plane the image is interpolated."""
    image = np.broadcast_to(10.0 * np.arange(4, dtype=np.float32), (1, 6, 6, 4)).copy()
    image[0, :3] += 1.0  # an in-plane edge
    label = np.zeros((6, 6, 4), np.uint8)
    label[:, :, 1] = 1
    label[:, :, 2] = 2
    out, lab = preprocess.resample(image, label, (1.0, 1.0, 5.0), (0.5, 0.5, 2.5), "nnunet")
    assert out.shape == (12, 12, 8, 1) and lab.shape == (12, 12, 8)
    source = [0, 0, 1, 1, 2, 2, 3, 3]  # the old slice nearest to each new one
    for k, s in enumerate(source):  # only that slice's values, never a blend
        assert 10 * s - 0.5 <= out[..., k, 0].min() <= out[..., k, 0].max() <= 10 * s + 1.5
    np.testing.assert_array_equal(out[:, :, ::2], out[:, :, 1::2])  # copies
    np.testing.assert_array_equal(lab[0, 0], [0, 0, 1, 1, 2, 2, 0, 0])
    # In plane the edge is interpolated: values between the two sides appear.
    assert np.any((out[..., 0, 0] > 0.05) & (out[..., 0, 0] < 0.95))
    # "simple" blends neighbouring slices.
    simple, _ = preprocess.resample(image, label, (1.0, 1.0, 5.0), (0.5, 0.5, 2.5))
    assert simple[..., 1, 0].max() > 1.5


def _case(image, label, spacing):
    return nifti.Case(case_id="c", task="T", image=image, label=label, spacing=spacing,
                      affine=np.diag([*spacing, 1.0]), original_affine=np.diag([*spacing, 1.0]),
                      original_shape=label.shape, modalities=("MRI",))


def test_crop_to_the_non_zero_region_and_back():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 10, 12, 8), np.float32)
    image[0, 2:7, 3:9, 1:6] = rng.normal(5.0, 1.0, (5, 6, 5))
    image[1, 7, 4, 6] = 3.0  # the second channel widens the box
    box = resampling.nonzero_box(image)
    assert box == ((2, 8), (3, 9), (1, 7))
    assert resampling.nonzero_box(np.zeros((1, 3, 4))) == ((0, 3), (0, 4))
    cut = resampling.crop(image, box, lead=1)
    assert cut.shape == (2, 6, 6, 6)
    back = resampling.uncrop(np.moveaxis(cut, 0, -1), box, image.shape[1:], 0.0)
    np.testing.assert_array_equal(np.moveaxis(back, -1, 0), image)

    # A case through preprocessing and back: the network sees the box only, predictions
    # come back on the whole grid, background outside the box.
    label = np.zeros((10, 12, 8), np.uint8)
    label[3:6, 4:8, 2:5] = 1
    case = _case(image, label, (1.0, 1.0, 1.0))
    plans = {"intensity": {"T": [{"scheme": "zscore"}] * 2}, "target_spacing": [1.0] * 3}
    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (8, 8, 8),
                            "data.crop_nonzero": True, "data.resampling": "nnunet"})
    geometry = preprocess.case_geometry(case, plans, config)
    assert geometry["box"] == [[2, 8], [3, 9], [1, 7]] and not geometry["separate_z"]
    volume, lab = preprocess.case_volume(case, plans, config)
    assert volume.shape == (6, 6, 6, 2)
    np.testing.assert_array_equal(lab, label[2:8, 3:9, 1:7])
    probs = np.eye(3, dtype=np.float32)[lab]
    full = preprocess.to_case_grid(probs, case, plans, config)
    assert full.shape == (10, 12, 8, 3)
    np.testing.assert_array_equal(full.argmax(-1), label)
    outside = np.ones(label.shape, bool)
    outside[2:8, 3:9, 1:7] = False
    np.testing.assert_array_equal(full[outside], [[1.0, 0.0, 0.0]] * int(outside.sum()))
    # Off: the whole case.
    config.data.crop_nonzero = False
    assert preprocess.case_volume(case, plans, config)[0].shape == (10, 12, 8, 2)


def test_anisotropic_probabilities_go_back_per_slice():
    """Predictions of an anisotropic case go back with order 1 in plane and order 0 along
    the coarse axis, as the case came in."""
    image = np.ones((1, 8, 8, 4), np.float32)
    label = np.zeros((8, 8, 4), np.uint8)
    case = _case(image, label, (1.0, 1.0, 6.0))
    plans = {"intensity": {"T": [{"scheme": "zscore"}]}, "target_spacing": [2.0, 2.0, 3.0]}
    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (4, 4, 8),
                            "data.resampling": "nnunet"})
    assert preprocess.case_geometry(case, plans, config)["lowres_axis"] == 2
    probs = np.zeros((4, 4, 8, 2), np.float32)
    probs[..., 1] = np.arange(8, dtype=np.float32) / 8  # a ramp along the coarse axis
    probs[..., 0] = 1 - probs[..., 1]
    back = preprocess.to_case_grid(probs, case, plans, config)
    assert back.shape == (8, 8, 4, 2)
    np.testing.assert_allclose(back[0, 0, :, 1], [1 / 8, 3 / 8, 5 / 8, 7 / 8])


def test_cache_key_follows_the_resampling_fields(tmp_path):
    config = tiny_config()
    dataset = dataset_lib.open_dataset(config, str(tmp_path))
    key = cache._fingerprint(config, dataset)
    keys = {key}
    for field, value in (("resampling", "nnunet"), ("crop_nonzero", True)):
        changed = tiny_config(**{f"data.{field}": value})
        keys.add(cache._fingerprint(changed, dataset))
    assert len(keys) == 3


@pytest.mark.parametrize("in_plane", ["resize", "spacing"])
def test_the_cache_records_each_cases_geometry(tmp_path, in_plane):
    config = tiny_config(**{"data.resampling": "nnunet", "data.crop_nonzero": True,
                            "data.in_plane": in_plane})
    dataset, plans, samples = cache.prepare(config, str(tmp_path))
    import json
    import os

    with open(os.path.join(samples["val"].directory, "geometry.json")) as f:
        geometry = json.load(f)
    assert set(geometry) == set(dataset.splits["train"]) | set(dataset.splits["val"])
    for key, entry in geometry.items():
        case = dataset.load(key)
        assert entry == json.loads(json.dumps(preprocess.case_geometry(case, plans, config)))
        assert len(entry["box"]) == case.image.ndim - 1
        assert ("separate_z" in entry) == (in_plane == "spacing")
    assert dataclasses.is_dataclass(case)


def test_figure_maps_of_a_cropped_case_sit_in_its_box():
    """A 2D model's own maps (attention gates) of a cropped case are put back where the
    box lies on the slice, zero outside it."""
    from types import SimpleNamespace

    import jax

    from medseg_jax import evaluate
    from medseg_jax.models import create_model, init_model

    model = create_model("attention_unet", num_classes=2, spatial_dims=2, base_features=4,
                         depth=3)
    variables = init_model(model, jax.random.key(0), (1, 16, 16, 1))
    state = SimpleNamespace(params=variables["params"],
                            batch_stats=variables.get("batch_stats", {}))
    image = np.zeros((1, 20, 24, 6), np.float32)
    image[0, 4:14, 6:18, 1:5] = np.random.default_rng(0).normal(5.0, 1.0, (10, 12, 4))
    case = _case(image, np.zeros((20, 24, 6), np.uint8), (1.0, 1.0, 1.0))
    run = SimpleNamespace(config=tiny_config(**{"data.crop_nonzero": True}), model=model,
                          state=state, plans={"intensity": {"T": [{"scheme": "zscore"}]},
                                              "target_spacing": None})
    (values,) = evaluate._figure_maps(run, case, 3, (20, 24)).values()
    assert values.shape == (20, 24)
    inside = np.zeros((20, 24), bool)
    inside[4:14, 6:18] = True
    assert (values[~inside] == 0).all() and (values[inside] > 0).all()


def _benchmark(name: str):
    import importlib.util  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_geometry_round_trip_scores_what_a_perfect_network_could():
    """benchmarks/resampling_compare.py: the ground truth through the grid and back. On
    the case's own grid it is exact; shrunk 2x, a one-voxel sheet survives nnU-Net's one-hot
    labels and is lost to nearest-neighbour."""
    bench = _benchmark("resampling_compare")
    image = np.ones((1, 12, 12, 6), np.float32)
    label = np.zeros((12, 12, 6), np.uint8)
    label[6:10, 3:9, 1:5] = 1
    label[2, 1:11, 1:5] = 2  # one voxel thick along the first axis
    case = _case(image, label, (1.0, 1.0, 1.0))
    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (4, 4, 4)})
    same = {"target_spacing": [1.0, 1.0, 1.0]}
    dice, kept, *_, voxels = bench.round_trip(case, same, config, 3)
    assert dice == {1: 1.0, 2: 1.0} and kept == 1.0 and voxels == label.size
    coarse = {"target_spacing": [2.0, 1.0, 1.0]}
    simple = bench.round_trip(case, coarse, config, 3)[0]
    config.data.resampling = "nnunet"
    nnunet = bench.round_trip(case, coarse, config, 3)[0]
    assert simple[2] == 0.0 < nnunet[2]
