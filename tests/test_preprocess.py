import json

import numpy as np
import pytest

from medseg_jax.data import preprocess


def test_zscore_per_case_and_ct_dataset_statistics():
    rng = np.random.default_rng(0)
    mri = rng.normal(100.0, 20.0, (1, 8, 8, 4)).astype(np.float32)
    out = preprocess.normalize(mri, [{"scheme": "zscore"}])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(), 1.0, atol=1e-4)

    ct = rng.uniform(-1000, 1000, (1, 8, 8, 4)).astype(np.float32)
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:5, 2:5, 1:3] = 1
    (plan,) = preprocess.intensity_plan(("CT",), [ct], [label])
    fg = ct[0][label > 0]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert plan["scheme"] == "ct"
    assert plan["lo"] == pytest.approx(lo) and plan["hi"] == pytest.approx(hi)
    out = preprocess.normalize(ct, [plan])
    expected = (np.clip(ct[0], lo, hi) - plan["mean"]) / plan["std"]
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)


def test_normalize_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="2 channels"):
        preprocess.normalize(np.zeros((2, 4, 4), np.float32), [{"scheme": "zscore"}])


def test_resize_shapes_and_nearest_labels():
    label = np.zeros((30, 20), np.uint8)
    label[5:20, 4:12] = 2
    out = preprocess.resize(label, (16, 16), order=0)
    assert out.shape == (16, 16)
    assert set(np.unique(out)) == {0, 2}
    image = np.random.default_rng(0).normal(size=(30, 20, 3)).astype(np.float32)
    assert preprocess.resize(image, (16, 16), order=1).shape == (16, 16, 3)
    assert preprocess.resize(image, (30, 20), order=1) is image


def test_slices_round_trip_to_case_geometry():
    rng = np.random.default_rng(1)
    label = np.zeros((24, 20, 5), np.uint8)
    label[6:18, 5:15, 1:4] = 1
    image = rng.normal(size=(1, 24, 20, 5)).astype(np.float32)
    imgs, labs = preprocess.to_samples(image, label, (16, 16), slice_axis=2)
    assert imgs.shape == (5, 16, 16, 1) and labs.shape == (5, 16, 16)
    probs = np.eye(2, dtype=np.float32)[labs]  # a perfect prediction, at network size
    back_probs = preprocess.from_samples(probs, label.shape, slice_axis=2)
    assert back_probs.shape == label.shape + (2,)
    back = np.argmax(back_probs, axis=-1)
    dice = 2 * np.sum((back > 0) & (label > 0)) / (np.sum(back > 0) + np.sum(label > 0))
    assert dice > 0.95

    # Slicing along another axis gives one sample per index of that axis.
    imgs0, _ = preprocess.to_samples(image, label, (16, 8), slice_axis=0)
    assert imgs0.shape == (24, 16, 8, 1)
    back0 = preprocess.from_samples(np.eye(2, dtype=np.float32)[np.zeros((24, 16, 8), int)],
                                    label.shape, slice_axis=0)
    assert back0.shape == label.shape + (2,)


def test_3d_samples_and_2d_images():
    image = np.zeros((2, 12, 10, 6), np.float32)
    imgs, labs = preprocess.to_samples(image, np.zeros((12, 10, 6), np.uint8), (8, 8, 8), 2)
    assert imgs.shape == (1, 8, 8, 8, 2) and labs.shape == (1, 8, 8, 8)
    imgs, _ = preprocess.to_samples(np.zeros((1, 20, 30), np.float32), None, (16, 16), 2)
    assert imgs.shape == (1, 16, 16, 1)
    with pytest.raises(ValueError, match="cannot make 3D samples"):
        preprocess.to_samples(np.zeros((1, 20, 30), np.float32), None, (8, 8, 8), 2)


def test_tiles_cover_the_volume_once():
    rng = np.random.default_rng(2)
    label = (rng.random((10, 7, 5)) > 0.7).astype(np.uint8)
    image = rng.normal(size=(10, 7, 5, 2)).astype(np.float32)
    imgs, labs = preprocess.tiles(image, label, (4, 4, 4))
    assert imgs.shape == (3 * 2 * 2, 4, 4, 4, 2)
    assert labs.sum() == label.sum()  # padding is background, nothing counted twice


def test_window_starts_and_gaussian():
    assert preprocess.window_starts(8, 8, 0.5) == [0]
    assert preprocess.window_starts(5, 8, 0.5) == [0]
    starts = preprocess.window_starts(20, 8, 0.5)
    assert starts[0] == 0 and starts[-1] == 12 and all(b - a <= 4 for a, b in zip(starts, starts[1:]))
    g = preprocess.gaussian_importance((9, 9))
    assert g.max() == 1.0 and g[4, 4] == 1.0 and g.min() > 0


def test_resample_to_target_spacing():
    image = np.zeros((1, 10, 10, 4), np.float32)
    label = np.zeros((10, 10, 4), np.uint8)
    label[2:8, 2:8, 1:3] = 1
    out, lab = preprocess.resample(image, label, (1.0, 1.0, 3.0), (2.0, 2.0, 1.5))
    assert out.shape == (5, 5, 8, 1) and lab.shape == (5, 5, 8)
    assert set(np.unique(lab)) == {0, 1}


def test_rescale_01_per_channel():
    image = np.stack([np.linspace(-3, 5, 24), np.full(24, 2.0)]).reshape(2, 4, 6).astype(np.float32)
    out = preprocess.rescale_01(image)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert (out[1] == 0.0).all()  # a constant channel maps to 0, not NaN


def test_volume_patch_and_case_target_spacing():
    assert preprocess.volume_patch((8, 16), 2, slice_axis=2) == (8, 16)
    assert preprocess.volume_patch((8, 16), 3, slice_axis=2) == (8, 16, 1)
    assert preprocess.volume_patch((8, 16), 3, slice_axis=0) == (1, 8, 16)
    assert preprocess.volume_patch((8, 8, 8), 3, slice_axis=1) == (8, 8, 8)
    with pytest.raises(ValueError, match="cannot take 3D inputs"):
        preprocess.volume_patch((8, 8, 8), 2, slice_axis=2)
    # In-plane targets: the slice axis keeps the case's own spacing.
    assert preprocess.case_target_spacing((0.5, 0.7, 3.0), (1.0, 2.0), 2) == (1.0, 2.0, 3.0)
    assert preprocess.case_target_spacing((3.0, 0.5, 0.7), (1.0, 2.0), 0) == (3.0, 1.0, 2.0)
    assert preprocess.case_target_spacing((0.1, 0.1), (0.2, 0.3), 2) == (0.2, 0.3)
    assert preprocess.case_target_spacing((1, 1, 1), (2, 2, 2), 2) == (2.0, 2.0, 2.0)


def test_in_plane_resampling_gives_one_pixel_size_in_mm():
    """A 12 mm disk imaged at 0.1 mm (16 mm field of view) and at 0.4 mm (48 mm field
    of view): resized to one grid the disks differ 9x in pixels; resampled to 0.2 mm
    both cover the disk's area in mm^2."""
    def disk(pixel_mm, n):
        yy, xx = np.mgrid[:n, :n]
        c = (n - 1) / 2
        return ((yy - c) ** 2 + (xx - c) ** 2 <= (6.0 / pixel_mm) ** 2).astype(np.uint8)

    fine, coarse = disk(0.1, 160), disk(0.4, 40)  # both 16 mm wide
    r_fine = int(preprocess.resize(fine, (32, 32), order=0).sum())
    r_coarse = int(preprocess.resize(coarse, (32, 32), order=0).sum())
    assert abs(r_fine - r_coarse) / r_coarse < 0.1  # same field of view: resize agrees here
    wide = np.pad(coarse, 40)  # 48 mm field of view at 0.4 mm: resize shrinks the disk
    assert int(preprocess.resize(wide, (32, 32), order=0).sum()) < r_fine / 5
    areas = []
    for label, mm in ((fine, 0.1), (wide, 0.4)):
        image = label[None].astype(np.float32)
        target = preprocess.case_target_spacing((mm, mm), (0.2, 0.2), 2)
        _, lab = preprocess.resample(image, label, (mm, mm), target)
        areas.append(lab.sum() * 0.2 * 0.2)
    expected = np.pi * 6.0 ** 2
    np.testing.assert_allclose(areas, expected, rtol=0.05)


# --------------------------------------------------------------------------
# Finite values and memory known before a case is read


def test_zscore_of_huge_intensities_is_the_same():
    """Intensities scaled by 1e20 once normalised to all zeros (float32 std overflowed)."""
    rng = np.random.default_rng(0)
    image = rng.normal(5.0, 2.0, (2, 8, 8, 4)).astype(np.float32)
    plan = [{"scheme": "zscore"}] * 2
    reference = preprocess.normalize(image, plan)
    for scale in (1e20, 1e-3):
        np.testing.assert_allclose(preprocess.normalize(image * np.float32(scale), plan),
                                   reference, atol=1e-5)
    # A range wider than float32 holds (-3e38 .. 3e38) still normalises, finite.
    wide = np.array([-3e38, -3e38, -3e38, 3e38], np.float32).reshape(1, 4)
    out = preprocess.normalize(wide, [{"scheme": "zscore"}])
    np.testing.assert_allclose(out[0], [-1 / np.sqrt(3)] * 3 + [np.sqrt(3)], rtol=1e-5)
    # A constant image stays at 0, however large.
    assert not preprocess.normalize(np.full((1, 4), 3e31, np.float32), plan[:1]).any()


def test_ct_statistics_of_huge_intensities():
    rng = np.random.default_rng(1)
    ct = rng.uniform(-1e20, 1e20, (1, 8, 8, 4)).astype(np.float32)
    label = np.ones((8, 8, 4), np.uint8)
    (plan,) = preprocess.intensity_plan(("CT",), [ct], [label])
    assert np.isfinite(plan["std"]) and plan["std"] > 1e19
    out = preprocess.normalize(ct, [plan])
    assert np.isfinite(out).all() and 0.5 < out.std() < 2


def test_non_finite_normalisation_names_the_file():
    """A plan (from a damaged file) that float32 cannot apply: one line, not NaN inputs."""
    plan = [{"scheme": "ct", "lo": -3e38, "hi": 3e38, "mean": -3e38, "std": 1e-8}]
    with pytest.raises(ValueError, match=r"^imagesTr/x\.nii\.gz: channel 0: normalisation "
                       r"gives non-finite values \(intensities 1 \.\. 1, mean -3e\+38"):
        preprocess.normalize(np.ones((1, 4, 4), np.float32), plan, "imagesTr/x.nii.gz")


def _case_on_disk(tmp_path, spacing, shape=(16, 16, 4)):
    import nibabel as nib

    from medseg_jax.data import decathlon

    root = tmp_path / "T"
    (root / "imagesTr").mkdir(parents=True)
    path = root / "imagesTr" / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.diag([*spacing, 1.0])), str(path))
    info = decathlon.DatasetInfo(str(root), "T", {0: "bg", 1: "a"}, ("MRI",), 3, [])
    return decathlon.CaseRef("c", (str(path),), None, "T"), info


def test_case_memory_from_the_header(tmp_path, monkeypatch):
    """A header whose voxel size is 50 mm once made the 3D path allocate 29 GiB."""
    from conftest import tiny_config

    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (16, 16, 4)})
    ref, info = _case_on_disk(tmp_path, (50.0, 50.0, 50.0))
    need, facts = preprocess.case_bytes(ref, info, config, (1.0, 1.0, 1.0))
    assert facts["resampled"] == (800, 800, 200)
    voxels, resampled = 16 * 16 * 4, 800 * 800 * 200
    assert need == 4 * 2 * voxels + 4 * 2 * resampled + voxels + resampled
    config.data.max_case_gib = 0.5
    with pytest.raises(ValueError, match=(
            f"^{ref.image_paths[0]}: case T/c of shape 16x16x4 at 50x50x50 mm needs about "
            r"1\.1 GiB \(resampled to 1x1x1 mm gives 800x800x200 voxels\), more than the "
            r"0\.5 GiB allowed per case; check the header's voxel size, or raise "
            r"config\.data\.max_case_gib")):
        preprocess.check_case_memory(ref, info, config, (1.0, 1.0, 1.0))
    config.data.max_case_gib = 1.5
    preprocess.check_case_memory(ref, info, config, (1.0, 1.0, 1.0))
    # Evaluation also holds the class probabilities on both grids.
    with pytest.raises(ValueError, match="needs about 2.0 GiB"):
        preprocess.check_case_memory(ref, info, config, (1.0, 1.0, 1.0), num_classes=2)
    # 0: half of the machine's memory.
    config.data.max_case_gib = 0
    monkeypatch.setattr(preprocess, "physical_memory", lambda: 2 << 30)
    assert preprocess.case_limit_bytes(config) == 1 << 30
    with pytest.raises(ValueError, match=r"more than the 1\.0 GiB allowed"):
        preprocess.check_case_memory(ref, info, config, (1.0, 1.0, 1.0))
    config.data.max_case_gib = -1
    with pytest.raises(ValueError, match=r"^config\.data\.max_case_gib: -1\.0 must be"):
        preprocess.case_limit_bytes(config)


def test_case_memory_of_resized_slices(tmp_path):
    from conftest import tiny_config

    config = tiny_config(**{"data.image_size": (1024, 1024), "data.max_case_gib": 0.01})
    ref, info = _case_on_disk(tmp_path, (1.0, 1.0, 1.0), shape=(16, 16, 4))
    need, facts = preprocess.case_bytes(ref, info, config, None)
    assert facts["resized"] == (4, 1024, 1024)
    with pytest.raises(ValueError, match=r"resized gives 4x1024x1024 pixels"):
        preprocess.check_case_memory(ref, info, config, None)
    assert preprocess.physical_memory() > 1 << 30


def test_max_case_gib_may_change_within_a_run():
    """Raising the limit, as its message says, is no change of the run's data or model."""
    from medseg_jax import config as config_lib
    from medseg_jax import workdir

    before = workdir.config_json(config_lib.default_config())
    after = json.loads(json.dumps(before))
    after["data"]["max_case_gib"] = 40.0
    assert workdir.config_differences(before, after) == []
    after["data"]["slice_axis"] = 1
    assert workdir.config_differences(before, after) == ["data.slice_axis: 2 -> 1"]


def test_normalisation_keeps_the_float32_bits_of_earlier_versions():
    """Ordinary intensities are normalised with float32 statistics, bit for bit as before
    (runs and caches made earlier are reproduced); only overflowing ones take float64."""
    rng = np.random.default_rng(0)
    image = rng.normal(300, 50, (1, 32, 32, 8)).astype(np.float32)
    x = image[0]
    expected = (x - x.mean()) / max(float(x.std()), 1e-8)
    np.testing.assert_array_equal(preprocess.normalize(image, [{"scheme": "zscore"}])[0],
                                  expected)
    ct = rng.integers(-1024, 2000, (1, 16, 16, 4)).astype(np.int16)
    entry = {"scheme": "ct", "lo": -500.0, "hi": 1500.0, "mean": 100.0, "std": 300.0}
    x = ct[0].astype(np.float32)
    np.testing.assert_array_equal(preprocess.normalize(ct, [entry])[0],
                                  (np.clip(x, -500.0, 1500.0) - 100.0) / 300.0)
