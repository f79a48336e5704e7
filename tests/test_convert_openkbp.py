"""Tests for medseg_jax.data.openkbp and its command line on tiny hand-made OpenKBP
folders (a 6x5x4 grid) and, when present, a few real OpenKBP patients."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data import openkbp
from medseg_jax.data.decathlon import read_dataset
from medseg_jax.data.nifti import load_case

SHAPE = (6, 5, 4)
SPACING = (3.9, 3.5, 2.5)


def _write(path: Path, text: str, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _flat(*ijk) -> int:
    return int(np.ravel_multi_index(ijk, SHAPE))  # C order


def _patient(root: Path, case: str, split: str = "train-pats", ct=None, organs=None,
             dims=SPACING, gz: bool = True) -> Path:
    """One OpenKBP patient folder; ``ct`` {flat index: value}, ``organs`` {name: [indices]}."""
    folder = root / split / case
    ct = {_flat(0, 0, 0): 1024.0} if ct is None else ct
    organs = {"SpinalCord": [_flat(1, 1, 1)]} if organs is None else organs
    _write(folder / "ct.csv", ",data\n" + "".join(f"{i},{v}\n" for i, v in ct.items()), gz)
    for name, indices in organs.items():
        _write(folder / f"{name}.csv", ",data\n" + "".join(f"{i},\n" for i in indices), gz)
    if dims is not None:
        _write(folder / "voxel_dimensions.csv", "".join(f"{d:.18e}\n" for d in dims), gz)
    return folder


def _load(dst: Path, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = nib.load(dst / "imagesTr" / f"{case}.nii.gz")
    label = nib.load(dst / "labelsTr" / f"{case}.nii.gz")
    return np.asanyarray(image.dataobj), np.asanyarray(label.dataobj), image.affine


def test_indices_hu_and_affine(tmp_path):
    ct = {_flat(0, 0, 0): 1024.0,  # 0 HU
          _flat(5, 4, 3): 5000.0,  # clipped to 4095: 3071 HU
          _flat(2, 3, 1): 12.6,  # rounded: -1011 HU
          _flat(1, 0, 2): -7.0,  # clipped to 0: -1024 HU
          _flat(0, 1, 0): 1064.0}  # 40 HU; index 4: C order, not Fortran
    src = tmp_path / "src"
    _patient(src, "pt_3", ct=ct)
    summary = openkbp.convert(str(src), str(tmp_path / "dst"), shape=SHAPE)
    image, label, aff = _load(tmp_path / "dst", "pt_3")
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == SHAPE
    expected = np.full(SHAPE, -1024, np.int16)
    expected[0, 0, 0], expected[5, 4, 3], expected[2, 3, 1] = 0, 3071, -1011
    expected[1, 0, 2], expected[0, 1, 0] = -1024, 40
    np.testing.assert_array_equal(image, expected)
    assert label[1, 1, 1] == openkbp.LABELS["SpinalCord"] and label.sum() == 2
    # Axis 0 anterior->posterior, 1 right->left, 2 superior->inferior; sizes in array order.
    assert nib.aff2axcodes(aff) == ("P", "L", "I")
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), SPACING)
    np.testing.assert_allclose(aff[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + aff[:3, 3], 0,
                               atol=1e-4)  # grid centre at the origin (float32 header)
    np.testing.assert_allclose(aff[:3, :3], [[0, -3.5, 0], [-3.9, 0, 0], [0, 0, -2.5]])
    record = summary["cases"][0]
    assert record["ct_clipped_voxels"] == 2 and record["ct_rows"] == 5
    assert (record["hu_min"], record["hu_max"]) == (-1024, 3071)
    assert summary["splits"] == {"train-pats": 1, "validation-pats": 0}


def test_labels_overlaps_and_annotated_labels(tmp_path):
    src = tmp_path / "src"
    a, b, c, d = _flat(1, 1, 1), _flat(2, 2, 2), _flat(3, 3, 3), _flat(4, 4, 0)
    _patient(src, "pt_1", organs={
        "Mandible": [a, b, _flat(0, 0, 1)],
        "LeftParotid": [a, _flat(5, 0, 0)],  # parotid wins over mandible
        "Brainstem": [c, _flat(0, 4, 3)],
        "SpinalCord": [c, d],  # cord wins over brainstem
        "Esophagus": [d],  # esophagus wins over the cord
        "Larynx": [b],  # larynx wins over mandible
    })
    _patient(src, "pt_201", split="validation-pats", gz=False,
             organs={"SpinalCord": [d], "RightParotid": [b]})
    dst = tmp_path / "dst"
    summary = openkbp.convert(str(src), str(dst), shape=SHAPE)
    L = openkbp.LABELS
    _, label, _ = _load(dst, "pt_1")
    assert label[1, 1, 1] == L["LeftParotid"] and label[2, 2, 2] == L["Larynx"]
    assert label[3, 3, 3] == L["SpinalCord"] and label[4, 4, 0] == L["Esophagus"]
    assert label[0, 0, 1] == L["Mandible"] and label[0, 4, 3] == L["Brainstem"]
    assert label[5, 0, 0] == L["LeftParotid"] and np.count_nonzero(label) == 7
    _, label2, _ = _load(dst, "pt_201")
    assert label2[2, 2, 2] == L["RightParotid"] and label2[4, 4, 0] == L["SpinalCord"]
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "Brainstem", "2": "SpinalCord",
                              "3": "RightParotid", "4": "LeftParotid", "5": "Esophagus",
                              "6": "Larynx", "7": "Mandible"}
    assert meta["training"] == [
        {"image": "./imagesTr/pt_1.nii.gz", "label": "./labelsTr/pt_1.nii.gz",
         "annotated_labels": [1, 2, 4, 5, 6, 7]},
        {"image": "./imagesTr/pt_201.nii.gz", "label": "./labelsTr/pt_201.nii.gz",
         "annotated_labels": [2, 3]},
    ]
    assert meta["name"] == "OpenKBP" and meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"} and meta["numTraining"] == 2
    assert "MIT" in meta["licence"] and "5549-5561" in meta["reference"]
    assert "Esophagus, Larynx, SpinalCord" in meta["description"]
    assert summary["overlap_pairs"]["LeftParotid&Mandible"] == {
        "patients": 1, "voxels": 1, "max_voxels": 1}
    assert set(summary["cases"][0]["overlaps"]) == {
        "Brainstem&SpinalCord", "SpinalCord&Esophagus", "LeftParotid&Mandible", "Larynx&Mandible"}
    assert summary["patients_with_overlap"] == 1
    assert summary["contoured_patients"]["SpinalCord"] == 2
    assert summary["contoured_patients"]["RightParotid"] == 1
    assert [r["split"] for r in summary["cases"]] == ["train-pats", "validation-pats"]
    marker = json.loads((dst / openkbp.MARKER).read_text())
    assert marker["generator"] == openkbp.GENERATOR and marker["num_cases"] == 2
    # The package's loader reads it (the labels are declared, the grids agree).
    info = read_dataset(str(dst))
    assert [c.case_id for c in info.cases] == ["pt_1", "pt_201"] and info.num_classes == 8
    case = load_case(info.cases[0], info)
    assert case.image.shape == (1, 5, 6, 4) and case.label.shape == (5, 6, 4)
    np.testing.assert_allclose(case.spacing, (3.5, 3.9, 2.5))


def test_orientation_checks_flag_a_mirrored_patient(tmp_path):
    src = tmp_path / "src"
    right, left = [_flat(2, 1, 1)], [_flat(2, 3, 1)]  # axis 1 runs right -> left
    _patient(src, "pt_1", organs={"RightParotid": right, "LeftParotid": left})
    _patient(src, "pt_2", organs={"RightParotid": left, "LeftParotid": right})
    _patient(src, "pt_3", organs={"Esophagus": right})
    summary = openkbp.convert(str(src), str(tmp_path / "dst"), shape=SHAPE)
    assert [r["orientation"] for r in summary["cases"]] == [
        {"left_right": True}, {"left_right": False}, {}]
    assert summary["orientation_agree"] == 1 and summary["orientation_disagree"] == ["pt_2"]
    assert summary["orientation_unchecked"] == ["pt_3"]


def test_limit_only_reconvert_and_foreign_dst(tmp_path):
    src = tmp_path / "src"
    for case in ("pt_10", "pt_2"):
        _patient(src, case)
    _patient(src, "pt_201", split="validation-pats")
    dst = tmp_path / "dst"
    summary = openkbp.convert(str(src), str(dst), limit=2, shape=SHAPE)
    assert [r["case"] for r in summary["cases"]] == ["pt_2", "pt_10"]  # by number
    summary = openkbp.convert(str(src), str(dst), only=["pt_201"], shape=SHAPE)  # own dst
    assert sorted(os.listdir(dst / "imagesTr")) == ["pt_201.nii.gz"]
    with pytest.raises(ValueError, match="no such patient"):
        openkbp.convert(str(src), str(dst), only=["pt_7"], shape=SHAPE)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        openkbp.convert(str(src), str(foreign), shape=SHAPE)
    assert (foreign / "notes.txt").read_text() == "mine"
    openkbp.convert(str(src), str(foreign), overwrite=True, shape=SHAPE)
    assert not (foreign / "notes.txt").exists()
    _patient(src, "pt_2", split="validation-pats")
    with pytest.raises(ValueError, match="pt_2: patient id pt_2 is also in"):
        openkbp.list_patients(str(src))


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink()


# Bad input: (how to break patient pt_1's folder, the file the error starts with, message).
BAD_INPUTS = {
    "missing ct": (lambda f: (f / "ct.csv.gz").unlink(), "ct.csv", "missing CT file"),
    "missing dims": (lambda f: (f / "voxel_dimensions.csv.gz").unlink(),
                     "voxel_dimensions.csv", "missing voxel sizes"),
    "index too large": (lambda f: _write(f / "ct.csv", f",data\n{6 * 5 * 4},1\n", True),
                        "ct.csv.gz", "index 120 is out of range 0..119"),
    "negative index": (lambda f: _write(f / "Brainstem.csv", ",data\n-1,\n", True),
                       "Brainstem.csv.gz", "index -1 is out of range"),
    "non-integer index": (lambda f: _write(f / "ct.csv", ",data\n2.5,1\n", True),
                          "ct.csv.gz", "index 2.5 is not an integer"),
    "non-numeric value": (lambda f: _write(f / "ct.csv", ",data\n1,2\n3,abc\n", True),
                          "ct.csv.gz:3", "not a number: 'abc'"),
    "non-numeric index": (lambda f: _write(f / "SpinalCord.csv", ",data\n4,\nx7,\n", True),
                          "SpinalCord.csv.gz:3", "not a number: 'x7'"),
    "missing column": (lambda f: _write(f / "ct.csv", ",data\n1,2\n3\n", True),
                       "ct.csv.gz:3", "expected 2 columns"),
    "duplicate index": (lambda f: _write(f / "ct.csv", ",data\n5,1\n5,2\n", True),
                        "ct.csv.gz", "index 5 is listed twice"),
    "no organ": (lambda f: _unlink(f / "SpinalCord.csv.gz", f / "Mandible.csv.gz"), "",
                 "no organ file"),
    "two dims": (lambda f: _write(f / "voxel_dimensions.csv", "3.9\n3.9\n", True),
                 "voxel_dimensions.csv.gz", "exactly 3 positive"),
    "zero dim": (lambda f: _write(f / "voxel_dimensions.csv", "3.9\n0\n2.5\n", True),
                 "voxel_dimensions.csv.gz", "exactly 3 positive"),
    "text dim": (lambda f: _write(f / "voxel_dimensions.csv", ",data\n3.9\n", True),
                 "voxel_dimensions.csv.gz", "non-numbers"),
    "ct header": (lambda f: _write(f / "ct.csv", "index,value\n1,2\n", True),
                  "ct.csv.gz", "expected the CSV header ',data'"),
    "structure header": (lambda f: _write(f / "SpinalCord.csv", "7,\n8,\n", True),
                         "SpinalCord.csv.gz", "expected the CSV header"),
    "empty structure": (lambda f: _write(f / "SpinalCord.csv", ",data\n", True),
                        "SpinalCord.csv.gz", "no data rows"),
    "csv and gz": (lambda f: _write(f / "ct.csv", ",data\n1,2\n", False),
                   "ct.csv", "both ct.csv and ct.csv.gz"),
    "bad gzip": (lambda f: (f / "Mandible.csv.gz").write_bytes(b"\x1f\x8b\x08junk"),
                 "Mandible.csv.gz", "not a valid gzip file"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_names_the_file_and_keeps_dst(tmp_path, name):
    src = tmp_path / "src"
    _patient(src, "pt_2")
    folder = _patient(src, "pt_1", organs={"SpinalCord": [3], "Mandible": [4]})
    dst = tmp_path / "dst"
    openkbp.convert(str(src), str(dst), shape=SHAPE)
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    breaker, file_name, message = BAD_INPUTS[name]
    breaker(folder)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        openkbp.convert(str(src), str(dst), shape=SHAPE)
    text = str(err.value)
    assert "\n" not in text and message in text, text
    assert text.startswith(str(folder / file_name)), text
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]  # no temporary folder left


def test_command_line(tmp_path):
    src = tmp_path / "src"
    _patient(src, "pt_1", organs={"SpinalCord": [_flat(1, 1, 1)], "Brainstem": [7]})
    base = [sys.executable, "-m", "medseg_jax.tools.convert_openkbp", f"--src={src}"]
    done = subprocess.run(base + [f"--dst={tmp_path / 'dst'}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 1 cases (train-pats 1, validation-pats 0)" in done.stdout
    image, label, _ = _load(tmp_path / "dst", "pt_1")  # the real 128^3 grid by default
    assert image.shape == label.shape == openkbp.GRID and label[0, 0, 7] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    done = subprocess.run(base + [f"--dst={foreign}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"convert_openkbp: error: {foreign}: folder is not empty and was not written by "
        f"{openkbp.GENERATOR}; pass --overwrite to replace it")
    _write(src / "train-pats" / "pt_1" / "voxel_dimensions.csv", "1\n2\n", True)
    done = subprocess.run(base + [f"--dst={tmp_path / 'dst'}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(
        f"convert_openkbp: error: {src / 'train-pats' / 'pt_1' / 'voxel_dimensions.csv.gz'}: ")


def _world_centroid(case, value: int) -> np.ndarray:
    ijk = np.argwhere(case.label == value).mean(axis=0)
    return case.affine[:3, :3] @ ijk + case.affine[:3, 3]


def test_real_openkbp(openkbp_dir, tmp_path):
    src = openkbp_dir
    # pt_1: five organs; pt_100: all seven, CT values above 4095; pt_236 (validation):
    # all seven, Esophagus and Larynx overlap.
    only = ["pt_1", "pt_100", "pt_236"]
    dst = tmp_path / "OpenKBP"
    summary = openkbp.convert(str(src), str(dst), only=only)
    assert summary["num_cases"] == 3 and summary["orientation_agree"] == 3
    assert summary["splits"] == {"train-pats": 2, "validation-pats": 1}
    assert summary["overlap_pairs"]["Esophagus&Larynx"]["patients"] == 1
    assert summary["cases"][1]["ct_clipped_voxels"] > 0
    info = read_dataset(str(dst))
    meta = json.loads((dst / "dataset.json").read_text())
    annotated = {e["image"].split("/")[-1][:-7]: e["annotated_labels"] for e in meta["training"]}
    assert annotated["pt_1"] == [1, 2, 3, 4, 7] and annotated["pt_236"] == list(range(1, 8))
    L = openkbp.LABELS
    for ref in info.cases:
        case = load_case(ref, info)
        assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
        assert case.image.shape == (1, 128, 128, 128) and case.label.shape == (128, 128, 128)
        hu = case.image[0]
        assert hu.min() == -1024 and hu.max() <= 3071
        present = sorted(set(np.unique(case.label).tolist()) - {0})
        assert present == annotated[ref.case_id]
        c = {name: _world_centroid(case, v) for name, v in L.items() if v in present}
        # RAS+: +x towards the patient's right, +y anterior, +z superior.
        assert c["LeftParotid"][0] < c["RightParotid"][0]
        assert c["Mandible"][1] > c["SpinalCord"][1]
        for lower in ("Esophagus", "Larynx", "SpinalCord"):
            if lower in c:
                assert c["Brainstem"][2] > c[lower][2]
        # Image and masks share the index decoding: bone under the mandible, soft tissue
        # in the brainstem.
        assert np.median(hu[case.label == L["Mandible"]]) > 300
        assert -100 < np.median(hu[case.label == L["Brainstem"]]) < 100
        # Axial slices are label[:, :, k]: the brainstem lies above the mandible's slices.
        k_brainstem = np.nonzero((case.label == L["Brainstem"]).any(axis=(0, 1)))[0]
        k_mandible = np.nonzero((case.label == L["Mandible"]).any(axis=(0, 1)))[0]
        assert k_brainstem.mean() > k_mandible.mean()
