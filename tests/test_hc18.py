"""Tests for medseg_jax.data.hc18 on tiny synthetic PNGs and, when present, real HC18."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medseg_jax.data import hc18 as convert_hc18
from medseg_jax.data.hc18 import Ellipse, convert, fit_ellipse
from medseg_jax.data.decathlon import read_dataset
from medseg_jax.data.nifti import load_case

SHAPE = (60, 80)  # PNG rows, cols
CLOSED = Ellipse(cx=38.3, cy=28.7, a=24.0, b=15.0, theta=0.4)
OPEN = Ellipse(cx=41.0, cy=44.0, a=26.0, b=21.0, theta=-0.2)  # runs off the bottom edge


def _outline(ellipse: Ellipse, shape=SHAPE) -> np.ndarray:
    """One-pixel outline of the rasterised ellipse; the image edge is not drawn."""
    inside = ellipse.rasterize(shape)
    return inside & ~ndimage.binary_erosion(inside, border_value=1)


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def _make_src(root: Path, cases: dict[str, tuple[Ellipse | None, float]],
              csv_rows: dict[str, tuple[float, float]] | None = None) -> Path:
    """HC18-like folder: ``cases`` maps a stem to (ellipse or None for empty, pixel size)."""
    folder = root / "training_set"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    for stem, (ellipse, pixel) in cases.items():
        _png(folder / f"{stem}.png", rng.integers(0, 256, SHAPE))
        outline = _outline(ellipse) if ellipse else np.zeros(SHAPE, bool)
        _png(folder / f"{stem}_Annotation.png", outline * 255)
        hc = ellipse.perimeter() * pixel if ellipse else 50.0
        rows[f"{stem}.png"] = (pixel, hc)
    rows = rows if csv_rows is None else csv_rows
    lines = ["filename,pixel size(mm),head circumference (mm)"]
    lines += [f"{name},{p},{hc:.2f}" for name, (p, hc) in rows.items()]
    (root / convert_hc18.CSV_NAME).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def src(tmp_path) -> Path:
    return _make_src(tmp_path / "HC18", {
        "000_HC": (CLOSED, 0.1),
        "001_HC": (OPEN, 0.2),
        "001_2HC": (CLOSED, 0.15),
    })


def test_fit_ellipse_recovers_parameters_and_perimeter():
    t = np.linspace(0, 2 * np.pi, 50, endpoint=False)
    e = Ellipse(cx=120.5, cy=-30.0, a=80.0, b=35.0, theta=0.7)
    x = e.cx + e.a * np.cos(t) * np.cos(e.theta) - e.b * np.sin(t) * np.sin(e.theta)
    y = e.cy + e.a * np.cos(t) * np.sin(e.theta) + e.b * np.sin(t) * np.cos(e.theta)
    fit = fit_ellipse(x[:20], y[:20])  # an arc is enough
    assert np.allclose([fit.cx, fit.cy, fit.a, fit.b], [e.cx, e.cy, e.a, e.b], atol=1e-6)
    assert np.isclose(np.cos(2 * (fit.theta - e.theta)), 1.0)
    assert np.isclose(Ellipse(0, 0, 5, 5, 0).perimeter(), 10 * np.pi)
    s = np.linspace(0, 2 * np.pi, 200001)
    exact = np.trapezoid(np.hypot(e.a * np.sin(s), e.b * np.cos(s)), s)
    assert abs(e.perimeter() - exact) / exact < 1e-6
    with pytest.raises(ValueError, match="collinear|ellipse"):
        fit_ellipse(np.arange(10.0), 2 * np.arange(10.0))


def test_convert_synthetic(src, tmp_path):
    dst = tmp_path / "out"
    summary = convert(str(src), str(dst))
    assert summary["num_cases"] == 3
    assert [c["case"] for c in summary["cases"]] == ["hc18_000", "hc18_001", "hc18_001_2"]
    assert summary["ellipse_fit"] == ["001_HC.png"]
    methods = {c["image"]: c["method"] for c in summary["cases"]}
    assert methods == {"000_HC.png": "fill", "001_HC.png": "ellipse_fit", "001_2HC.png": "fill"}
    assert summary["hc_rel_error_max"] < 0.05 and summary["hc_over_5_percent"] == []

    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["name"] == "HC18" and meta["tensorImageSize"] == "2D"
    assert meta["modality"] == {"0": "US"}
    assert meta["labels"] == {"0": "background", "1": "head"}
    assert meta["licence"] == "CC BY 4.0" and "van den Heuvel" in meta["reference"]
    assert meta["numTraining"] == 3 and len(meta["training"]) == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]  # no temp left

    info = read_dataset(str(dst))
    assert info.is_2d and info.num_classes == 2
    pixel = {"hc18_000": 0.1, "hc18_001": 0.2, "hc18_001_2": 0.15}
    truth = {"hc18_000": CLOSED, "hc18_001": OPEN, "hc18_001_2": CLOSED}
    for ref in info.cases:
        case = load_case(ref, info)
        assert case.spacing == pytest.approx((pixel[ref.case_id],) * 2)
        assert case.image.shape == (1, SHAPE[1], SHAPE[0]) and case.label.shape == SHAPE[::-1]
        png = np.asarray(Image.open(_png_name(src, ref.case_id)))
        assert np.array_equal(convert_hc18.nifti_to_png(case.image[0]), png)
        mask = convert_hc18.nifti_to_png(case.label)
        expected = truth[ref.case_id].rasterize(SHAPE)  # clipped analytic ellipse
        assert abs(mask.sum() / expected.sum() - 1) < 0.03
        assert set(np.unique(mask)) == {0, 1}
    # The closed ellipse lies inside the image: compare with the analytic area too.
    closed = convert_hc18.nifti_to_png(load_case(info.cases[0], info).label)
    assert abs(closed.sum() / CLOSED.area() - 1) < 0.03
    # On disk: X = PNG column, Y = PNG row reversed (row 0 at the largest Y), diag affine.
    png = np.asarray(Image.open(src / "training_set" / "000_HC.png"))
    img = nib.load(dst / "imagesTr" / "hc18_000.nii.gz")
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.uint8 and data.shape == (SHAPE[1], SHAPE[0])
    assert np.array_equal(data[:, -1], png[0]) and np.array_equal(data[5, :], png[::-1, 5])
    assert np.allclose(img.affine, np.diag([0.1, 0.1, 1.0, 1.0]))
    label = nib.load(dst / "labelsTr" / "hc18_000.nii.gz")
    assert np.allclose(label.affine, img.affine) and label.get_data_dtype() == np.uint8


def _png_name(src: Path, case_id: str) -> Path:
    num, *rep = case_id.removeprefix("hc18_").split("_")
    return src / "training_set" / f"{num}_{rep[0] if rep else ''}HC.png"


def test_limit_only_and_reconvert(src, tmp_path):
    dst = tmp_path / "out"
    assert [c["image"] for c in convert(str(src), str(dst), limit=2)["cases"]] == [
        "000_HC.png", "001_HC.png"]
    summary = convert(str(src), str(dst), only=["001_2HC", "000_HC.png"])  # own dst: replaced
    assert [c["image"] for c in summary["cases"]] == ["000_HC.png", "001_2HC.png"]
    assert sorted(os.listdir(dst / "labelsTr")) == ["hc18_000.nii.gz", "hc18_001_2.nii.gz"]
    with pytest.raises(ValueError, match="no such image.*999_HC"):
        convert(str(src), str(dst), only=["999_HC"])


def test_refuses_foreign_dst(src, tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(str(src), str(dst), limit=1)
    assert (dst / "notes.txt").exists()
    convert(str(src), str(dst), limit=1, overwrite=True)
    assert sorted(os.listdir(dst)) == ["dataset.json", "hc18_conversion.json", "imagesTr",
                                       "labelsTr"]
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(str(src), str(empty), limit=1)


def test_errors_name_the_file(tmp_path):
    dst = tmp_path / "out"
    good = {"000_HC": (CLOSED, 0.1)}

    root = _make_src(tmp_path / "a", good)
    (root / convert_hc18.CSV_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="training_set_pixel_size_and_HC.csv"):
        convert(str(root), str(dst))

    root = _make_src(tmp_path / "b", good)
    (root / "training_set" / "000_HC_Annotation.png").unlink()
    with pytest.raises(FileNotFoundError, match="000_HC.png: no annotation 000_HC_Annotation"):
        convert(str(root), str(dst))

    root = _make_src(tmp_path / "c", good, csv_rows={"001_HC.png": (0.1, 50.0)})
    with pytest.raises(ValueError, match="no row for 000_HC.png"):
        convert(str(root), str(dst))

    root = _make_src(tmp_path / "d", {**good, "001_HC": (None, 0.1)})
    with pytest.raises(ValueError, match="001_HC_Annotation.png: annotation has no foreground"):
        convert(str(root), str(dst))
    assert not dst.exists()  # nothing half-written
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]


def test_command_line(src, tmp_path):
    dst = tmp_path / "cli"
    cmd = [sys.executable, "-m", "medseg_jax.tools.convert_hc18", f"--src={src}", f"--dst={dst}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 cases" in done.stdout and "001_HC.png" in done.stdout
    (src / convert_hc18.CSV_NAME).unlink()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "missing HC18 CSV" in done.stderr


def test_real_hc18(hc18_dir, tmp_path):
    src = hc18_dir
    # 139_HC is 786x542 (most are 800x540); 186_HC's outline is cut by the bottom edge.
    only = ["000_HC", "010_HC", "010_2HC", "014_3HC", "139_HC", "186_HC"]
    summary = convert(str(src), str(tmp_path / "HC18"), only=only)
    assert [c["image"] for c in summary["cases"]] == [f"{s}.png" for s in only]
    assert summary["ellipse_fit"] == ["186_HC.png"]
    for record in summary["cases"]:
        assert record["hc_rel_error"] < 0.05, record
        assert record["hc_outline_rel_error"] < 0.005, record
    info = read_dataset(str(tmp_path / "HC18"))
    by_id = {ref.case_id: ref for ref in info.cases}
    for record in summary["cases"]:
        case = load_case(by_id[record["case"]], info)
        assert case.spacing == pytest.approx((record["pixel_size_mm"],) * 2)
        rows, cols = record["shape_rows_cols"]
        assert case.label.shape == (cols, rows) and case.label.sum() == record["head_pixels"]
