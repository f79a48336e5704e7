"""Tests for medseg_jax.data.decathlon on tiny NIfTI files and, when present, real data."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data import decathlon
from medseg_jax.data.decathlon import read_dataset
from medseg_jax.data.nifti import load_case, to_original_orientation

SHAPE = (6, 5, 4)
SPACING = (0.8, 0.9, 2.5)


def _affine(spacing=SPACING, signs=(1, 1, 1)) -> np.ndarray:
    aff = np.diag([s * g for s, g in zip(spacing, signs)] + [1.0])
    aff[:3, 3] = [-10.0, 5.0, 2.0]
    return aff


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), str(path))
    return path


def _image(seed: int = 0, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(0, 100, shape)).astype(dtype)


def _label(shape=SHAPE, values=(0, 1, 2)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    flat = lab.reshape(-1)
    for i, v in enumerate(values):
        flat[i * 3 : i * 3 + 3] = v
    return lab


def _entry(name: str) -> dict[str, str]:
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def _dataset_json(root: Path, **fields) -> None:
    meta = {
        "name": "Toy",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
    }
    meta.update(fields)
    meta = {k: v for k, v in meta.items() if v is not None}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))


def _decathlon(root: Path, n: int = 2, image_dtype=np.float32, listed: bool = True) -> Path:
    training = []
    for i in range(n):
        name = f"toy_{i:03d}.nii.gz"
        _write(root / "imagesTr" / name, _image(i, dtype=image_dtype))
        _write(root / "labelsTr" / name, _label())
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    # Hidden AppleDouble files as in the real Decathlon tarballs.
    (root / "imagesTr" / "._toy_000.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    (root / "labelsTr" / "._toy_000.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    _dataset_json(root, numTraining=n, training=training if listed else None)
    return root


# --------------------------------------------------------------------------
# Reading valid data sets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("listed", [True, False], ids=["training-list", "scanned"])
def test_decathlon_layout(tmp_path, listed):
    root = _decathlon(tmp_path / "Task99_Toy", listed=listed)
    info = read_dataset(str(root))
    assert info.name == "Toy"
    assert info.labels == {0: "background", 1: "a", 2: "b"}
    assert info.modalities == ("MRI",)
    assert info.tensor_dims == 3
    assert [c.case_id for c in info.cases] == ["toy_000", "toy_001"]
    ref = info.cases[1]
    assert ref.task == "Toy"
    assert ref.image_paths == (str(root / "imagesTr" / "toy_001.nii.gz"),)
    assert ref.label_path == str(root / "labelsTr" / "toy_001.nii.gz")
    case = load_case(ref, info)
    assert case.image.shape == (1, *SHAPE) and case.image.dtype == np.float32
    np.testing.assert_allclose(case.image[0], _image(1))
    assert case.label.dtype == np.uint8 and case.label.shape == SHAPE
    np.testing.assert_array_equal(case.label, _label())
    np.testing.assert_allclose(case.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(case.affine, _affine(), atol=1e-6)
    assert case.original_shape == SHAPE
    assert case.modalities == ("MRI",)


def test_task_name_defaults_to_folder(tmp_path):
    root = _decathlon(tmp_path / "Task98_Folder")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["name"]
    (root / "dataset.json").write_text(json.dumps(meta))
    info = read_dataset(str(root))
    assert info.name == "Task98_Folder" and info.cases[0].task == "Task98_Folder"


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_image_dtypes_become_float32(tmp_path, dtype):
    root = _decathlon(tmp_path / "T", n=1, image_dtype=dtype)
    info = read_dataset(str(root))
    case = load_case(info.cases[0], info)
    assert case.image.dtype == np.float32
    np.testing.assert_allclose(case.image[0], _image(0, dtype=dtype).astype(np.float32))


def test_nnunet_v2_two_channels(tmp_path):
    root = tmp_path / "Dataset001_Toy"
    for case in ("b_case", "a_case"):
        for ch in range(2):
            data = np.full(SHAPE, 10 * ch + 1, np.int16)
            _write(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", data)
        _write(root / "labelsTr" / f"{case}.nii.gz", _label(values=(0, 1)))
    (root / "imagesTr" / "._a_case_0000.nii.gz").write_bytes(b"junk")
    _dataset_json(
        root, modality=None, tensorImageSize=None, channel_names={"1": "ADC", "0": "T2"},
        labels={"background": 0, "lesion": 1}, numTraining=2, file_ending=".nii.gz",
    )
    info = read_dataset(str(root))
    assert info.modalities == ("T2", "ADC")
    assert info.labels == {0: "background", 1: "lesion"}
    assert info.tensor_dims is None
    assert [c.case_id for c in info.cases] == ["a_case", "b_case"]
    names = [os.path.basename(p) for p in info.cases[0].image_paths]
    assert names == ["a_case_0000.nii.gz", "a_case_0001.nii.gz"]
    case = load_case(info.cases[0], info)
    assert case.image.shape == (2, *SHAPE)
    assert case.image[0].max() == 1 and case.image[1].max() == 11
    assert case.modalities == ("T2", "ADC")


def test_nnunet_v1_training_list_with_channel_files(tmp_path):
    root = tmp_path / "Task01_Toy"
    for ch in range(2):
        _write(root / "imagesTr" / f"la_003_{ch:04d}.nii.gz", _image(ch))
    _write(root / "labelsTr" / "la_003.nii.gz", _label(values=(0, 1)))
    _dataset_json(
        root, modality={"0": "T2", "1": "ADC"}, labels={"0": "background", "1": "x"},
        training=[_entry("la_003")],
    )
    info = read_dataset(str(root))
    assert len(info.cases[0].image_paths) == 2
    assert load_case(info.cases[0], info).image.shape == (2, *SHAPE)


def test_4d_multichannel_image(tmp_path):
    root = tmp_path / "Task01_BrainToy"
    img = np.stack([_image(0), _image(1), _image(2)], axis=-1)
    _write(root / "imagesTr" / "brats_001.nii.gz", img)
    _write(root / "labelsTr" / "brats_001.nii.gz", _label())
    _dataset_json(
        root, tensorImageSize="4D", modality={"0": "FLAIR", "1": "T1w", "2": "T2w"},
        training=[_entry("brats_001")],
    )
    info = read_dataset(str(root))
    assert info.tensor_dims == 4
    case = load_case(info.cases[0], info)
    assert case.image.shape == (3, *SHAPE)
    for c in range(3):
        np.testing.assert_allclose(case.image[c], _image(c))
    assert case.original_shape == SHAPE


@pytest.mark.parametrize("stored", [(7, 9), (7, 9, 1)])
def test_2d_images(tmp_path, stored):
    root = tmp_path / "Task97_US"
    aff = np.diag([0.2, 0.25, 1.0, 1.0])
    _write(root / "imagesTr" / "us_000.nii.gz", _image(0, shape=stored, dtype=np.uint8), aff)
    _write(root / "labelsTr" / "us_000.nii.gz", _label(shape=stored, values=(0, 1)), aff)
    _dataset_json(
        root, tensorImageSize="2D", modality={"0": "US"}, labels={"0": "background", "1": "x"},
        training=[_entry("us_000")],
    )
    info = read_dataset(str(root))
    case = load_case(info.cases[0], info)
    assert case.image.shape == (1, 7, 9) and case.label.shape == (7, 9)
    np.testing.assert_allclose(case.spacing, (0.2, 0.25), rtol=1e-6)
    assert case.original_shape == stored
    expected = _image(0, shape=stored, dtype=np.uint8).reshape(7, 9)
    np.testing.assert_array_equal(case.image[0], expected)
    back = to_original_orientation(case.label, case)
    np.testing.assert_array_equal(back, _label(shape=stored, values=(0, 1)))


def test_singleton_slice_without_2d_flag_stays_3d(tmp_path):
    root = tmp_path / "T"
    _write(root / "imagesTr" / "x.nii.gz", _image(0, shape=(7, 9, 1)))
    _write(root / "labelsTr" / "x.nii.gz", _label(shape=(7, 9, 1), values=(0, 1)))
    _dataset_json(root, tensorImageSize=None)
    info = read_dataset(str(root))
    case = load_case(info.cases[0], info)
    assert case.image.shape == (1, 7, 9, 1) and len(case.spacing) == 3


def test_float_labels_with_integer_values(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    _write(root / "labelsTr" / "toy_000.nii.gz", _label().astype(np.float32))
    info = read_dataset(str(root))
    case = load_case(info.cases[0], info)
    assert case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.label, _label())


# --------------------------------------------------------------------------
# Reorientation
# --------------------------------------------------------------------------


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return nib.affines.apply_affine(affine, ijk)


@pytest.mark.parametrize(
    "affine",
    [
        _affine(signs=(-1, -1, 1)),  # LPS, as ITK writes CT
        # Axes permuted and flipped.
        np.array([[0, 0, -2.5, 30], [-0.8, 0, 0, 10], [0, 0.9, 0, -5], [0, 0, 0, 1]], float),
    ],
    ids=["LPS", "permuted"],
)
def test_reorientation_round_trip(tmp_path, affine):
    root = _decathlon(tmp_path / "T", n=1)
    img = _image(0)
    lab = np.zeros(SHAPE, np.uint8)
    lab[1, 2, 3] = 1
    lab[4, 0, 1] = 2
    _write(root / "imagesTr" / "toy_000.nii.gz", img, affine)
    _write(root / "labelsTr" / "toy_000.nii.gz", lab, affine)
    info = read_dataset(str(root))
    case = load_case(info.cases[0], info)
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(case.original_affine) == nib.aff2axcodes(affine)
    np.testing.assert_allclose(case.original_affine, affine)
    assert case.original_shape == SHAPE
    # The same voxel keeps its world position.
    for label_value, ijk in ((1, (1, 2, 3)), (2, (4, 0, 1))):
        (new_ijk,) = np.argwhere(case.label == label_value)
        np.testing.assert_allclose(_world(case.affine, new_ijk), _world(affine, ijk), atol=1e-5)
        assert case.image[(0, *new_ijk)] == pytest.approx(img[ijk])
    zooms = np.abs(np.asarray(nib.affines.voxel_sizes(affine)))
    np.testing.assert_allclose(sorted(case.spacing), sorted(zooms), rtol=1e-6)
    np.testing.assert_array_equal(to_original_orientation(case.label, case), lab)
    np.testing.assert_allclose(to_original_orientation(case.image[0], case), img)
    # canonical=False keeps the file's grid.
    raw = load_case(info.cases[0], info, canonical=False)
    np.testing.assert_array_equal(raw.label, lab)
    np.testing.assert_array_equal(to_original_orientation(raw.label, raw), lab)


def test_2d_reorientation_round_trip(tmp_path):
    root = tmp_path / "T"
    aff = np.diag([-0.2, -0.3, 1.0, 1.0])
    lab = np.zeros((7, 9), np.uint8)
    lab[0, 1] = 1
    _write(root / "imagesTr" / "x.nii.gz", _image(0, shape=(7, 9)), aff)
    _write(root / "labelsTr" / "x.nii.gz", lab, aff)
    _dataset_json(root, tensorImageSize="2D", labels={"0": "background", "1": "x"})
    info = read_dataset(str(root))
    case = load_case(info.cases[0], info)
    assert case.label[6, 7] == 1 and case.image.shape == (1, 7, 9)
    np.testing.assert_allclose(case.spacing, (0.2, 0.3), rtol=1e-6)
    np.testing.assert_array_equal(to_original_orientation(case.label, case), lab)


# --------------------------------------------------------------------------
# Errors: each message names the file and the fault
# --------------------------------------------------------------------------


def test_missing_dataset_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_dataset(str(tmp_path))


def test_bad_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"name": "x",, }')
    with pytest.raises(ValueError, match=r"dataset\.json.*not valid JSON.*line 1"):
        read_dataset(str(tmp_path))


def test_missing_labels(tmp_path):
    _dataset_json(tmp_path, labels=None)
    with pytest.raises(ValueError, match=r"dataset\.json.*missing field 'labels'"):
        read_dataset(str(tmp_path))


def test_region_labels_rejected(tmp_path):
    _dataset_json(tmp_path, labels={"background": 0, "whole tumor": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"dataset\.json.*'labels'.*whole tumor.*region"):
        read_dataset(str(tmp_path))


def test_missing_modality(tmp_path):
    _dataset_json(tmp_path, modality=None)
    with pytest.raises(ValueError, match=r"dataset\.json.*'modality'.*'channel_names'"):
        read_dataset(str(tmp_path))


def test_listed_image_missing(tmp_path):
    root = _decathlon(tmp_path / "T")
    (root / "imagesTr" / "toy_001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"toy_001\.nii\.gz.*does not exist"):
        read_dataset(str(root))


def test_listed_label_missing(tmp_path):
    root = _decathlon(tmp_path / "T")
    (root / "labelsTr" / "toy_000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelsTr/toy_000\.nii\.gz.*does not exist"):
        read_dataset(str(root))


def test_label_without_image(tmp_path):
    root = _decathlon(tmp_path / "T", listed=False)
    _write(root / "labelsTr" / "orphan.nii.gz", _label())
    with pytest.raises(ValueError, match=r"orphan\.nii\.gz.*label without image"):
        read_dataset(str(root))


def test_image_without_label(tmp_path):
    root = _decathlon(tmp_path / "T", listed=False)
    _write(root / "imagesTr" / "lonely.nii.gz", _image())
    with pytest.raises(FileNotFoundError, match=r"lonely\.nii\.gz.*no label"):
        read_dataset(str(root))


def test_no_cases(tmp_path):
    _dataset_json(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(ValueError, match=r"dataset\.json.*no cases found"):
        read_dataset(str(tmp_path))


def test_channel_files_vs_modalities(tmp_path):
    root = tmp_path / "D"
    for ch in range(3):
        _write(root / "imagesTr" / f"c1_{ch:04d}.nii.gz", _image(ch))
    _write(root / "labelsTr" / "c1.nii.gz", _label())
    _dataset_json(root, modality=None, channel_names={"0": "T2", "1": "ADC"})
    with pytest.raises(ValueError, match=r"c1_0000\.nii\.gz.*channel files.*2 modalities"):
        read_dataset(str(root))


def test_4d_channels_vs_modalities(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    _write(root / "imagesTr" / "toy_000.nii.gz", np.stack([_image(0), _image(1)], axis=-1))
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"toy_000\.nii\.gz.*2 channel.*1 modalities"):
        load_case(info.cases[0], info)


def test_shape_mismatch(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    _write(root / "labelsTr" / "toy_000.nii.gz", _label(shape=(6, 5, 3)))
    info = read_dataset(str(root))
    pattern = (
        r"shapes differ.*imagesTr/toy_000\.nii\.gz has \(6, 5, 4\)"
        r".*labelsTr/toy_000\.nii\.gz has \(6, 5, 3\)"
    )
    with pytest.raises(ValueError, match=pattern):
        load_case(info.cases[0], info)


def test_affine_tolerance(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    info = read_dataset(str(root))
    close = _affine()
    close[0, 3] += 1e-5
    _write(root / "labelsTr" / "toy_000.nii.gz", _label(), close)
    load_case(info.cases[0], info)  # within tolerance
    far = _affine()
    far[1, 3] += 0.5
    _write(root / "labelsTr" / "toy_000.nii.gz", _label(), far)
    pattern = r"affines differ.*imagesTr/toy_000\.nii\.gz.*labelsTr/toy_000\.nii\.gz"
    with pytest.raises(ValueError, match=pattern):
        load_case(info.cases[0], info)


def test_non_finite_image(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    img = _image(0)
    img[0, 0, 0] = np.nan
    img[1, 1, 1] = np.inf
    _write(root / "imagesTr" / "toy_000.nii.gz", img)
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"toy_000\.nii\.gz.*2 non-finite"):
        load_case(info.cases[0], info)


def test_non_integer_label(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    lab = _label().astype(np.float32)
    lab[0, 0, 0] = 0.5
    _write(root / "labelsTr" / "toy_000.nii.gz", lab)
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"labelsTr/toy_000\.nii\.gz.*non-integer.*0\.5"):
        load_case(info.cases[0], info)


def test_undeclared_label(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    _write(root / "labelsTr" / "toy_000.nii.gz", _label(values=(0, 1, 7)))
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"labelsTr/toy_000\.nii\.gz.*\[7\].*not declared"):
        load_case(info.cases[0], info)


@pytest.mark.parametrize("keep", [0.6, 0.01], ids=["data", "header"])
def test_truncated_file(tmp_path, keep):
    root = _decathlon(tmp_path / "T", n=1)
    big = (40, 40, 30)
    path = root / "imagesTr" / "toy_000.nii.gz"
    _write(path, _image(0, shape=big))
    _write(root / "labelsTr" / "toy_000.nii.gz", _label(shape=big))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"imagesTr/toy_000\.nii\.gz: cannot read NIfTI"):
        load_case(info.cases[0], info)


def test_garbage_file(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    (root / "labelsTr" / "toy_000.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 30))
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"labelsTr/toy_000\.nii\.gz.*cannot read"):
        load_case(info.cases[0], info)


def _raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None,
               shape: tuple[int, ...] | None = None) -> Path:
    """A NIfTI file written byte by byte: any sform affine (NaN, singular) and any
    declared ``shape`` (more than ``data`` holds), which nibabel's writer refuses."""
    hdr = nib.Nifti1Image(data, _affine()).header.copy()
    hdr["qform_code"], hdr["sform_code"] = 0, 1
    rows = (_affine() if affine is None else affine)[:3]
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = rows
    if shape is not None:
        hdr["dim"][0] = len(shape)
        hdr["dim"][1:len(shape) + 1] = shape
    hdr["vox_offset"] = 352
    blob = hdr.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def _nan_translation():
    aff = _affine()
    aff[0, 3] = np.nan
    return aff


def _nan_rotation():
    aff = _affine()
    aff[0, 1] = np.nan
    return aff


@pytest.mark.parametrize("which", ["imagesTr", "labelsTr"])
@pytest.mark.parametrize("affine, problem", [
    (_nan_translation(), "holds NaN or inf"),
    (_nan_rotation(), "holds NaN or inf"),
    (np.zeros((4, 4)), "is not invertible"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "is not invertible"),
], ids=["nan-translation", "nan-rotation", "zero", "flat-axis"])
def test_affine_must_be_finite_and_invertible(tmp_path, which, affine, problem):
    """NaN in the label's translation once passed the image/label grid check."""
    root = _decathlon(tmp_path / "T", n=1)
    data = _image(0) if which == "imagesTr" else _label()
    path = _raw_nifti(root / which / "toy_000.nii.gz", data, affine)
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=f"^{path}: the header's affine \\(sform/qform\\) "
                       f"{problem}"):
        load_case(info.cases[0], info)


def test_single_slice_with_a_flat_third_axis(tmp_path):
    """A 2D data set may leave the slice axis's column zero; a 3D one (reoriented in 3D,
    which once raised nibabel's HeaderDataError) may not."""
    root = _decathlon(tmp_path / "T", n=1)
    flat = np.diag([1.0, 1.0, 0.0, 1.0])
    image = _raw_nifti(root / "imagesTr" / "toy_000.nii.gz", _image(0, (6, 5, 1)), flat)
    _raw_nifti(root / "labelsTr" / "toy_000.nii.gz", _label((6, 5, 1)), flat)
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=f"^{image}: the header's affine .* is not invertible"):
        load_case(info.cases[0], info)
    info.tensor_dims = 2
    assert load_case(info.cases[0], info).image.shape == (1, 6, 5)


def test_grid_check_fails_on_nan():
    """Two affines one of which holds NaN are not the same grid."""
    from medseg_jax.data import nifti

    with pytest.raises(ValueError, match="affines differ"):
        nifti._check_same_grid("a", SHAPE, _affine(), "b", SHAPE, _nan_translation(), "x")


@pytest.mark.parametrize("name", ["toy_000.nii.gz", "toy_000.nii"])
def test_header_declaring_more_than_the_file_holds(tmp_path, name):
    """A 91-byte .nii.gz declaring 1500^3 voxels once allocated 3.6 GB before failing."""
    import tracemalloc

    root = _decathlon(tmp_path / "T", n=1)
    (root / "imagesTr" / "toy_000.nii.gz").unlink()
    path = _raw_nifti(root / "imagesTr" / name, np.zeros(1, np.float32),
                      shape=(1500, 1500, 1500))
    _dataset_json(root, training=[{"image": f"./imagesTr/{name}",
                                   "label": "./labelsTr/toy_000.nii.gz"}])
    info = read_dataset(str(root))
    info.file_ending = name[7:]
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"^{path}: header declares shape "
                           r"\(1500, 1500, 1500\) of float32 \(12.6 GiB\) but "):
            load_case(info.cases[0], info)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


def test_float64_beyond_float32_range(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    img = _image(0, dtype=np.float64)
    img[1, 2, 3] = 1e39  # finite in float64, inf in float32
    _write(root / "imagesTr" / "toy_000.nii.gz", img)
    info = read_dataset(str(root))
    with pytest.raises(ValueError, match=r"toy_000\.nii\.gz: intensities up to 1e\+39 "
                       r"\(float64\) exceed the float32 range"):
        load_case(info.cases[0], info)
    img[1, 2, 3] = 3e38  # the largest float32 values still load
    _write(root / "imagesTr" / "toy_000.nii.gz", img)
    assert np.isfinite(load_case(info.cases[0], info).image).all()


@pytest.mark.parametrize("ending", ["", "nii.gz", "."])
def test_file_ending_must_be_an_ending(tmp_path, ending):
    """An empty file_ending once made every case id "" ("split 'val' has no cases")."""
    root = _decathlon(tmp_path / "T", n=2, listed=False)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ending}))
    with pytest.raises(ValueError, match=r"dataset\.json: field 'file_ending' must be a file "
                       "name ending such as '.nii.gz', got"):
        read_dataset(str(root))


@pytest.mark.parametrize("labels, problem", [
    ({"0": "background", "1": "a", "-0": "b"}, "key '-0' is not a non-negative integer"),
    ({"0": "background", "1": "a", "01": "b"},
     "keys '1' and '01' are the same label value 1 \\('a' and 'b'\\)"),
    ({"0": "background", "+1": "a"}, "key '\\+1' is not a non-negative integer"),
])
def test_label_keys_written_distinctly(tmp_path, labels, problem):
    """"0" and "-0" once silently renamed a class."""
    root = _decathlon(tmp_path / "T", n=1)
    _dataset_json(root, labels=labels)
    with pytest.raises(ValueError, match=f"dataset\\.json: field 'labels' {problem}"):
        read_dataset(str(root))


@pytest.mark.parametrize("listed", [True, False], ids=["training-list", "scanned"])
def test_file_name_not_utf8_is_refused(tmp_path, listed):
    """Such a case once trained, then evaluation failed writing its CSV row."""
    root = _decathlon(tmp_path / "T", n=2, listed=False)
    bad = os.fsdecode(b"toy_\xff01.nii.gz")
    for folder in ("imagesTr", "labelsTr"):
        os.rename(root / folder / "toy_001.nii.gz", root / folder / bad)
    if listed:
        meta = json.loads((root / "dataset.json").read_text())
        meta["training"] = [_entry("toy_000"), {"image": f"./imagesTr/{bad}",
                                                "label": f"./labelsTr/{bad}"}]
        (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"^b'.*/(images|labels)Tr/toy_\\xff01\.nii\.gz': file "
                       "name is not valid UTF-8 text; rename it"):
        read_dataset(str(root))


def test_dataset_json_fifo_is_refused(tmp_path):
    root = _decathlon(tmp_path / "T", n=1)
    (root / "dataset.json").unlink()
    os.mkfifo(root / "dataset.json")
    with pytest.raises(ValueError, match=r"dataset\.json: cannot read .*not a regular file "
                       r"\(a FIFO\)"):
        read_dataset(str(root))


# --------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------


def test_real_hippocampus(hippocampus_dir):
    info = read_dataset(str(hippocampus_dir))
    assert len(info.cases) == 200
    assert info.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert info.modalities == ("MRI",)
    refs = {c.case_id: c for c in info.cases}
    # hippocampus_003 and _243 store float32 labels; _001 has a float32 image.
    for case_id in ("hippocampus_001", "hippocampus_003", "hippocampus_243"):
        ref = refs[case_id]
        case = load_case(ref, info)
        assert case.image.dtype == np.float32 and case.image.shape[0] == 1
        assert case.image.shape[1:] == case.label.shape
        assert case.label.dtype == np.uint8
        assert set(np.unique(case.label).tolist()) == {0, 1, 2}
        assert case.spacing == pytest.approx((1.0, 1.0, 1.0))
        if case_id != "hippocampus_001":
            assert nib.load(ref.label_path).get_data_dtype() == np.float32
    assert decathlon.DATASET_JSON == "dataset.json"
