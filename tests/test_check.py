"""Tests for medseg_jax.data.check on tiny NIfTI folders and, when present, real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data.check import Report, check

SHAPE = (6, 5, 4)
SPACING = (0.8, 0.9, 1.5)
LABELS = {"0": "background", "1": "a", "2": "b"}


def _affine(spacing=SPACING) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 2.0]
    return aff


def _write(path: Path, data: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, _affine(spacing)), str(path))
    return path


def _image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def _label(shape=SHAPE, values=(0, 1, 2)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    flat = lab.reshape(-1)
    for i, v in enumerate(values):
        flat[i * 3 : i * 3 + 3] = v
    return lab


def _dataset_json(root: Path, names: list[str] | None, **fields) -> None:
    meta = {"name": "Toy", "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": LABELS}
    if names is not None:
        meta["training"] = [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names
        ]
    meta.update(fields)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))


def _clean(root: Path, n: int = 3, listed: bool = True, **fields) -> Path:
    names = [f"toy_{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        _write(root / "imagesTr" / f"{name}.nii.gz", _image(i))
        _write(root / "labelsTr" / f"{name}.nii.gz", _label())
    _dataset_json(root, names if listed else None, **fields)
    return root


def _cli(*roots: Path | str) -> subprocess.CompletedProcess:
    args = [f"--root={r}" for r in roots]
    return subprocess.run(
        [sys.executable, "-m", "medseg_jax.tools.check_data", *args],
        capture_output=True, text=True, timeout=120,
    )


def _wheres(problems) -> set[str]:
    return {p.where for p in problems}


# --------------------------------------------------------------------------


def test_clean_set(tmp_path):
    root = _clean(tmp_path / "Task01_Toy")
    messages: list[str] = []
    report = check([str(root)], progress=messages.append)
    assert isinstance(report, Report)
    assert report.ok and not report.errors and not report.warnings, report.problems
    assert report.cases_listed == report.cases_read == 3
    assert messages and "3/3" in messages[-1]
    result = _cli(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout and "WARNING" not in result.stdout
    assert "OK: 3 of 3 listed cases read, 0 errors, 0 warnings" in result.stdout
    assert "label voxels" in result.stdout and "spacing" in result.stdout


def test_scanned_folders_clean(tmp_path):
    report = check([str(_clean(tmp_path / "T", listed=False))])
    assert report.ok and report.cases_read == 3


def test_many_faults_reported_in_one_run(tmp_path):
    root = tmp_path / "Task02_Bad"
    names = ["good_000", "trunc_001", "shape_002", "undeclared_003", "nan_004", "missing_005"]
    _write(root / "imagesTr" / "good_000.nii.gz", _image(0))
    _write(root / "labelsTr" / "good_000.nii.gz", _label())
    # A truncated .nii.gz: the gzip stream ends in the middle of the data.
    big = (40, 40, 30)
    trunc = _write(root / "imagesTr" / "trunc_001.nii.gz", _image(1, shape=big))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    _write(root / "labelsTr" / "trunc_001.nii.gz", _label(shape=big))
    _write(root / "imagesTr" / "shape_002.nii.gz", _image(2))
    _write(root / "labelsTr" / "shape_002.nii.gz", _label(shape=(6, 5, 3)))
    _write(root / "imagesTr" / "undeclared_003.nii.gz", _image(3))
    _write(root / "labelsTr" / "undeclared_003.nii.gz", _label(values=(0, 1, 7)))
    nan = _image(4)
    nan[1, 2, 3] = np.nan
    _write(root / "imagesTr" / "nan_004.nii.gz", nan)
    _write(root / "labelsTr" / "nan_004.nii.gz", _label())
    _write(root / "imagesTr" / "missing_005.nii.gz", _image(5))  # its label is never written
    _dataset_json(root, names)

    report = check([str(root)])
    assert not report.ok
    assert report.cases_read == 1
    faulty = {f"Toy/{n}" for n in names[1:]}
    assert _wheres(report.errors) == faulty
    assert len(report.errors) == 5

    result = _cli(root)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(lines) == 5, result.stdout

    def line(case: str) -> str:
        (found,) = [x for x in lines if x.startswith(f"ERROR Toy/{case}: ")]
        return found

    assert "imagesTr/trunc_001.nii.gz: cannot read NIfTI" in line("trunc_001")
    assert "shapes differ" in line("shape_002") and "(6, 5, 3)" in line("shape_002")
    assert "labelsTr/undeclared_003.nii.gz: label values [7] are not declared" in line(
        "undeclared_003")
    assert "imagesTr/nan_004.nii.gz: image holds 1 non-finite" in line("nan_004")
    assert "labelsTr/missing_005.nii.gz:" in line("missing_005")
    assert "does not exist" in line("missing_005")
    assert "FAILED: 1 of 5 listed cases read, 5 errors" in result.stdout


def test_warnings_and_info_do_not_fail(tmp_path):
    root = tmp_path / "Task03_Odd"
    labels = {**LABELS, "3": "never"}
    names = [f"c_{i}" for i in range(4)]
    for i, name in enumerate(names):
        spacing = (0.8, 0.8, 2.0 if i < 3 else 4.0)  # c_3 is 5:1 anisotropic
        image = _image(i) * (10_000 if i == 0 else 1)  # c_0: 1e4 times brighter
        _write(root / "imagesTr" / f"{name}.nii.gz", image, spacing)
        lab = _label(values=(0,)) if i == 1 else _label()  # c_1: background only
        _write(root / "labelsTr" / f"{name}.nii.gz", lab, spacing)
    _dataset_json(root, names, labels=labels)
    report = check(str(root))
    assert report.ok, report.errors
    text = [str(p) for p in report.warnings]
    assert any(t.startswith("WARNING Toy/c_1: ") and "empty" in t for t in text), text
    assert any(t.startswith("WARNING Toy/c_3: ") and "anisotropic" in t for t in text), text
    assert any("label 3 ('never')" in t and "dataset.json" in t for t in text), text
    info = " | ".join(str(p) for p in report.info)
    assert "spacing varies" in info and "axis 2 2/2/4" in info
    assert "1 of 4 cases differs" in info and "c_0" in info and "per-case" in info
    result = _cli(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 4 of 4 listed cases read, 0 errors, 3 warnings" in result.stdout


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "missing dataset.json"),
        ('{"name": "x",, }', "not valid JSON"),
        (json.dumps({"name": "x", "modality": {"0": "MRI"}}), "missing field 'labels'"),
        ('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 100"),
        (b'{"name": "\xff"}', "not UTF-8 text"),
        (json.dumps({"name": "x", "modality": {"0": "MRI"}, "labels": {"0": "a", "-0": "b"}}),
         "key '-0' is not a non-negative integer"),
    ],
    ids=["missing", "bad-json", "no-labels", "nested", "not-utf8", "label-keys"],
)
def test_broken_dataset_json_is_one_error(tmp_path, content, expected):
    root = _clean(tmp_path / "T")
    if content is None:
        (root / "dataset.json").unlink()
    elif isinstance(content, bytes):
        (root / "dataset.json").write_bytes(content)
    else:
        (root / "dataset.json").write_text(content)
    report = check([str(root)])
    assert len(report.errors) == 1 and not report.warnings
    (error,) = report.errors
    assert error.file == str(root / "dataset.json") and expected in error.fault
    assert report.cases_read == 0
    result = _cli(root)
    assert result.returncode == 1
    assert f"ERROR T: {root / 'dataset.json'}: " in result.stdout and expected in result.stdout


def test_header_faults_are_errors(tmp_path):
    """NaN in a label's affine once passed the image/label grid check ("OK"); a header
    declaring 1500^3 voxels in a tiny file once allocated them before failing."""
    from test_decathlon import _raw_nifti

    root = _clean(tmp_path / "T", n=3)
    nan = _affine()
    nan[0, 3] = np.nan
    bad_label = _raw_nifti(root / "labelsTr" / "toy_000.nii.gz", _label(), nan)
    huge = _raw_nifti(root / "imagesTr" / "toy_001.nii.gz", np.zeros(1, np.float32),
                      shape=(1500, 1500, 1500))
    report = check([str(root)])
    assert {(e.where, e.file) for e in report.errors} == {
        ("Toy/toy_000", str(bad_label)), ("Toy/toy_001", str(huge))}
    faults = " | ".join(e.fault for e in report.errors)
    assert "the header's affine (sform/qform) holds NaN or inf" in faults
    assert "header declares shape (1500, 1500, 1500) of float32" in faults
    assert not report.ok and report.cases_read == 1


def test_duplicate_case_id_and_multiple_roots(tmp_path):
    one = _clean(tmp_path / "A", n=2)
    meta = json.loads((one / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][0]))
    (one / "dataset.json").write_text(json.dumps(meta))
    # A second task with another label set and two-channel images.
    two = tmp_path / "B"
    for i in range(2):
        _write(two / "imagesTr" / f"x_{i}.nii.gz", np.stack([_image(i), _image(i + 5)], -1))
        _write(two / "labelsTr" / f"x_{i}.nii.gz", _label(values=(0, 1)))
    _dataset_json(two, ["x_0", "x_1"], name="Other", tensorImageSize="4D",
                  modality={"0": "T1", "1": "T2"}, labels={"0": "background", "1": "x"})
    report = check([f"{one},{two}"])
    faults = [str(p) for p in report.errors]
    assert any(f.startswith("ERROR Toy/toy_000: ") and "listed twice" in f for f in faults)
    assert any(f.startswith("ERROR Other: ") and "share one label set" in f for f in faults)
    for case in ("x_0", "x_1"):
        assert any(f.startswith(f"ERROR Other/{case}: ") and "2 channels" in f for f in faults)
    assert report.cases_read == 4 and len(report.errors) == 4


def test_scanned_folder_faults_per_case(tmp_path):
    root = _clean(tmp_path / "T", n=3, listed=False)
    _write(root / "labelsTr" / "orphan.nii.gz", _label())
    (root / "labelsTr" / "toy_002.nii.gz").unlink()
    report = check([str(root)])
    assert _wheres(report.errors) == {"Toy/orphan", "Toy/toy_002"}
    assert report.cases_read == 2


def test_hippocampus_checks_clean(hippocampus_dir):
    report = check([str(hippocampus_dir)])
    assert report.ok, [str(p) for p in report.errors]
    assert report.cases_listed == report.cases_read == 200
    # The intensity maxima span 1e2 .. 1.7e6: reported as information, not as a fault.
    assert any("per-case normalisation" in p.fault for p in report.info)


def test_label_geometry_of_hand_made_masks():
    """A 4x4x4 cube: 56 of 64 voxels on its boundary, a one-voxel shift keeps 3 of 4
    layers (Dice 0.75 on every axis); a 1x2x6 bar at the volume's edge is all boundary, its
    shifts score 0, 1/2 and 5/6; an absent class is not listed."""
    from medseg_jax.data.check import label_geometry

    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    lab[0:1, 0:2, 0:6] = 3
    geometry = label_geometry(lab)
    assert sorted(geometry) == [1, 3]
    boundary, shift = geometry[1]
    assert boundary == pytest.approx(56 / 64) and shift == pytest.approx((0.75, 0.75, 0.75))
    boundary, shift = geometry[3]
    assert boundary == 1.0 and shift == pytest.approx((0.0, 0.5, 5 / 6))
    # 2D: a 3x3 square keeps its centre pixel
    square = np.zeros((5, 5), np.int16)
    square[1:4, 1:4] = 2
    assert label_geometry(square) == {2: (pytest.approx(8 / 9), pytest.approx((2 / 3, 2 / 3)))}
    # a volume of one slice has no shift along that axis
    boundary, shift = label_geometry(square[:, :, None])[2]
    assert boundary == pytest.approx(8 / 9) and shift[:2] == pytest.approx((2 / 3, 2 / 3))
    assert np.isnan(shift[2])


def test_summary_reports_the_label_geometry_per_class(tmp_path):
    root = tmp_path / "T"
    for i in range(2):
        lab = np.zeros(SHAPE, np.uint8)
        lab[1:5, 1:5, 0:4] = 1  # 4x4x4: boundary 56/64, shift Dice 0.75 on each axis
        if i == 0:
            lab[5, 0, 0] = 2  # one voxel: all boundary, shift Dice 0 (in one case only)
        _write(root / "imagesTr" / f"toy_{i:03d}.nii.gz", _image(i))
        _write(root / "labelsTr" / f"toy_{i:03d}.nii.gz", lab)
    _dataset_json(root, ["toy_000", "toy_001"])
    summary = check([str(root)]).summary()
    assert ("1 a: 88% of its voxels on its boundary; shifted by one voxel along axis 0/1/2: "
            "Dice 0.75, 0.75, 0.75 (2 cases)") in summary
    assert ("2 b: 100% of its voxels on its boundary; shifted by one voxel along axis 0/1/2: "
            "Dice 0.00, 0.00, 0.00 (1 case)") in summary
