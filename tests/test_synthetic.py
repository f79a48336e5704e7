"""Tests for medseg_jax.data.synthetic, read back through medseg_jax.data.decathlon."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data import synthetic
from medseg_jax.data.decathlon import read_dataset
from medseg_jax.data.nifti import load_case

TINY = dict(num_cases=3, size=32, depth=8)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.make_synthetic(str(root), seed=0, **TINY)
    return root


def _load_all(path: str | Path):
    info = read_dataset(str(path))
    return info, [load_case(ref, info) for ref in info.cases]


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_read_back(tiny_root):
    paths = synthetic.make_synthetic(str(tiny_root), seed=0, **TINY)
    assert paths == [str(tiny_root / t) for t in ("SynthMRI", "SynthCT", "SynthUS")]
    expected = {
        "SynthMRI": ("MRI", 3, (1, 32, 32, 8), "mri"),
        "SynthCT": ("CT", 3, (1, 32, 32, 8), "ct"),
        "SynthUS": ("US", 2, (1, 32, 40), "us"),
    }
    for path in paths:
        name = os.path.basename(path)
        modality, dims, shape, prefix = expected[name]
        meta = json.loads(Path(path, "dataset.json").read_text())
        assert "synthetic" in meta["description"].lower() and "seed 0" in meta["description"]
        assert meta["numTraining"] == 3
        info, cases = _load_all(path)
        assert info.name == name
        assert info.modalities == (modality,)
        assert info.labels == {0: "background", 1: "lesion"}
        assert info.tensor_dims == dims
        assert [c.case_id for c in cases] == [f"{prefix}_{i:03d}" for i in range(3)]
        for case in cases:
            assert case.image.shape == shape and case.image.dtype == np.float32
            assert np.isfinite(case.image).all()
            assert case.label.shape == shape[1:] and case.label.dtype == np.uint8
            assert set(np.unique(case.label).tolist()) == {0, 1}  # every case has a lesion
            assert len(case.spacing) == dims


def test_spacing_and_intensities(tiny_root):
    for task in ("SynthMRI", "SynthCT", "SynthUS"):
        info, cases = _load_all(tiny_root / task)
        for ref, case in zip(info.cases, cases):
            zooms = nib.load(ref.image_paths[0]).header.get_zooms()
            np.testing.assert_allclose(case.spacing, zooms, rtol=1e-5)
            label_zooms = nib.load(ref.label_path).header.get_zooms()
            np.testing.assert_allclose(label_zooms, zooms)
            sp = case.spacing
            if task == "SynthMRI":
                assert sp[0] == pytest.approx(sp[1]) and 0.8 <= sp[0] <= 1.2 and 1.3 <= sp[2] <= 1.7
                assert case.image.min() >= 0
            elif task == "SynthCT":
                assert sp[0] == pytest.approx(sp[1]) and 0.7 <= sp[0] <= 0.9
                assert sp[2] == pytest.approx(2.5)
                # CT is stored with LPS-like axes; the loader turns it to RAS.
                assert nib.aff2axcodes(case.original_affine) == ("L", "P", "S")
                assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
                img = case.image[0]
                assert img.min() < -900 and img.max() > 500  # air and bone, in HU
                assert -600 < img[case.label == 1].mean() < 150  # denser than lung (-850 HU)
            else:
                assert sp[0] == pytest.approx(sp[1]) and 0.1 <= sp[0] <= 0.3
                img = case.image[0]
                assert img.min() == 0 and img.max() <= 255
                assert img[0, 0] == 0 and img[-1, 0] == 0  # outside the fan


def test_deterministic(tiny_root, tmp_path):
    again = synthetic.make_synthetic(str(tmp_path / "a"), seed=0, **TINY)
    other = synthetic.make_synthetic(str(tmp_path / "b"), seed=1, **TINY)
    for task, path, path_other in zip(("SynthMRI", "SynthCT", "SynthUS"), again, other):
        _, first = _load_all(tiny_root / task)
        _, second = _load_all(path)
        _, third = _load_all(path_other)
        for c1, c2, c3 in zip(first, second, third):
            np.testing.assert_array_equal(c1.image, c2.image)
            np.testing.assert_array_equal(c1.label, c2.label)
            np.testing.assert_array_equal(c1.affine, c2.affine)
            assert not np.array_equal(c1.image, c3.image)
        # Byte-identical files (fixed header fields, gzip mtime 0).
        files1, files2 = _files(tiny_root / task), _files(Path(path))
        assert files1.keys() == files2.keys()
        for rel in files1:
            assert files1[rel].read_bytes() == files2[rel].read_bytes(), rel


def test_idempotent(tmp_path):
    root = tmp_path / "r"
    paths = synthetic.make_synthetic(str(root), seed=3, **TINY)
    stamps = {p: p.stat().st_mtime_ns for path in paths for p in _files(Path(path)).values()}
    inodes = [os.stat(p).st_ino for p in paths]
    assert synthetic.make_synthetic(str(root), seed=3, **TINY) == paths
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [os.stat(p).st_ino for p in paths] == inodes
    # Other arguments: rebuilt in place, nothing left behind.
    synthetic.make_synthetic(str(root), seed=3, num_cases=2, size=32, depth=8)
    assert len(read_dataset(paths[0]).cases) == 2
    assert sorted(os.listdir(root)) == ["SynthCT", "SynthMRI", "SynthUS"]


def test_leftovers_from_an_interrupted_run(tmp_path):
    root = tmp_path / "r"
    # A temp folder from a killed run, and a half-written task without marker.
    tmp = root / ".SynthMRI.tmp-killed"
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "imagesTr" / "mri_000.nii.gz").write_bytes(b"\x1f\x8b partial")
    (root / "SynthCT" / "imagesTr").mkdir(parents=True)
    (root / "SynthCT" / "imagesTr" / "ct_000.nii.gz").write_bytes(b"\x1f\x8b partial")
    paths = synthetic.make_synthetic(str(root), seed=0, **TINY)
    for path in paths:
        info, cases = _load_all(path)
        assert len(cases) == 3 and all(c.label.any() for c in cases)
        assert Path(path, synthetic.MARKER).is_file()


def test_failure_leaves_no_partial_task(tmp_path, monkeypatch):
    root = tmp_path / "r"
    calls = {"n": 0}
    real_write = synthetic.write_nifti

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (simulated)")
        real_write(*args)

    monkeypatch.setattr(synthetic, "write_nifti", flaky)
    with pytest.raises(OSError, match="simulated"):
        synthetic.make_synthetic(str(root), seed=0, **TINY)
    assert os.listdir(root) == []  # neither the task nor its temp folder
    monkeypatch.setattr(synthetic, "write_nifti", real_write)
    paths = synthetic.make_synthetic(str(root), seed=0, **TINY)
    assert all(len(read_dataset(p).cases) == 3 for p in paths)


def test_foreign_folder_is_not_replaced(tmp_path):
    root = tmp_path / "r"
    (root / "SynthMRI").mkdir(parents=True)
    (root / "SynthMRI" / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="my_notes.txt"):
        synthetic.make_synthetic(str(root), seed=0, **TINY)
    assert (root / "SynthMRI" / "my_notes.txt").read_text() == "keep me"


def _best_threshold_dice(values: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of ``values > t`` or ``values < t`` over all thresholds ``t``."""
    order = np.argsort(values, kind="stable")
    v, y = values[order], target[order].astype(np.int64)
    total = y.sum()
    # Cut between distinct values only: at index i, "above" holds v[i:].
    cuts = np.concatenate([[0], np.nonzero(np.diff(v))[0] + 1, [v.size]])
    tp_above = total - np.concatenate([[0], np.cumsum(y)])[cuts]
    n_above = v.size - cuts
    dice_above = 2 * tp_above / (n_above + total)
    dice_below = 2 * (total - tp_above) / (cuts + total)
    return float(max(dice_above.max(), dice_below.max()))


def test_best_threshold_dice_helper():
    values = np.array([0.0, 1.0, 2.0, 3.0, 3.0, 5.0])
    assert _best_threshold_dice(values, values >= 3) == pytest.approx(1.0)
    assert _best_threshold_dice(values, values <= 1) == pytest.approx(1.0)
    assert _best_threshold_dice(values, np.array([1, 0, 0, 0, 0, 1])) < 1.0


def test_lesions_visible_but_not_threshold_separable(tiny_root):
    """Intensity alone must not solve the task, yet each lesion must stand out locally."""
    for task in ("SynthCT", "SynthUS"):
        _, cases = _load_all(tiny_root / task)
        values = np.concatenate([c.image[0].ravel() for c in cases])
        target = np.concatenate([c.label.ravel() for c in cases]) == 1
        # The best global threshold (either polarity) on the pooled intensities.
        assert _best_threshold_dice(values, target) < 0.6, task
        for case in cases:
            lesion = case.label == 1
            ring = ndimage.binary_dilation(lesion, iterations=3) & ~lesion
            img = case.image[0]
            cnr = abs(img[lesion].mean() - img[ring].mean()) / img[ring].std()
            assert cnr > 0.3, (task, case.case_id, cnr)
