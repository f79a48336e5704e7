"""The HC18 fetal head ultrasound training set, converted to a Decathlon folder.

Command line: ``python -m medseg_jax.tools.convert_hc18 --src=../shared/data/HC18
--dst=/tmp/HC18_decathlon``.

Input (as the HC18 challenge distributes it): ``src/training_set/NNN_HC.png``
(8-bit grayscale), ``NNN_HC_Annotation.png`` (a one-pixel ellipse outline,
0/255), repeat frames ``NNN_2HC.png`` / ``NNN_3HC.png`` with their
annotations, and ``src/training_set_pixel_size_and_HC.csv``
(``filename,pixel size(mm),head circumference (mm)``).

Output: ``dst/dataset.json`` (``tensorImageSize`` "2D", label 1 = head),
``dst/imagesTr/hc18_NNN[_2|_3].nii.gz`` (uint8) and ``dst/labelsTr/`` (same
names, uint8 0/1), plus ``dst/hc18_conversion.json`` (the summary; it also
marks the folder as written by this converter).

Axes: NIfTI ``X`` = PNG column (left to right), ``Y`` = PNG row reversed
(bottom to top), i.e. ``data = png[::-1, :].T``; image and label use the same
mapping (``png_to_nifti`` / ``nifti_to_png``). The affine is
``diag(p, p, 1, 1)`` with ``p`` the pixel size in mm, so the image is upright
in a viewer drawing +X right and +Y up, and distances come out in mm.

Masks: the outline is filled (``binary_fill_holes``). An ellipse is also
fitted to every outline (Fitzgibbon's direct least-squares fit, in the
numerically stable form of Halir and Flusser); when the fill encloses less
than half of the fitted ellipse's area (an outline that is not closed, e.g.
cut by the image border) the mask is the rasterised fitted ellipse, clipped
to the image, plus the outline. Either way the mask holds the whole outline.
Each mask is checked against the reference head circumference: an ellipse is
fitted to the mask's boundary pixels and its perimeter (Ramanujan's second
approximation) times the pixel size is compared with the CSV value
(``hc_rel_error``; a warning above 5%). ``hc_outline_rel_error`` does the same
for the ellipse fitted to the outline itself. The HC18 outlines are about 2-3
pixels wide and centred on the reference ellipse, so the outline fit matches
the CSV to about 1e-4 while the masks, holding the whole outline, come out
about 1 pixel larger (HC about +0.5%).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image  # a matplotlib dependency
from scipy import ndimage

from medseg_jax import fileio
from medseg_jax.data.nifti import write_nifti

_DESCRIP = b"HC18 via medseg_jax.data.convert_hc18"  # the NIfTI header's description

# The converter's mark in its summary (the module's first name, kept so that folders
# converted then are still recognised as the converter's own).
GENERATOR = "medseg_jax.data.convert_hc18"
VERSION = 1
MARKER = "hc18_conversion.json"
CSV_NAME = "training_set_pixel_size_and_HC.csv"
IMAGES_DIR = "training_set"
HC_WARN = 0.05  # relative head circumference error that is logged as a warning
FILL_MIN_FRACTION = 0.5  # fill area / fitted ellipse area below this: use the fit
REFERENCE = (
    "van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B. Automated measurement of "
    "fetal head circumference using 2D ultrasound images. PLoS ONE 13(8): e0200412 (2018). "
    "https://doi.org/10.1371/journal.pone.0200412; data: https://doi.org/10.5281/zenodo.1327317"
)

_IMAGE_RE = re.compile(r"^(?P<num>\d+)_(?P<rep>\d*)HC\.png$")
_CSV_COLUMNS = ("filename", "pixel size(mm)", "head circumference (mm)")


# --------------------------------------------------------------------------
# Ellipse fit
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ellipse:
    """An ellipse in pixel coordinates (``x`` = column, ``y`` = row)."""

    cx: float
    cy: float
    a: float  # semi-major axis
    b: float  # semi-minor axis
    theta: float  # angle of the major axis from +x, radians

    def perimeter(self) -> float:
        """Ramanujan's second approximation of the circumference."""
        h = ((self.a - self.b) / (self.a + self.b)) ** 2
        return float(np.pi * (self.a + self.b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h))))

    def area(self) -> float:
        return float(np.pi * self.a * self.b)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether the points ``(x, y)`` lie inside or on the ellipse."""
        c, s = np.cos(self.theta), np.sin(self.theta)
        dx, dy = x - self.cx, y - self.cy
        u = (c * dx + s * dy) / self.a
        v = (-s * dx + c * dy) / self.b
        return u * u + v * v <= 1.0

    def rasterize(self, shape: tuple[int, int]) -> np.ndarray:
        """Boolean ``(rows, cols)`` mask of the pixel centres inside, clipped to ``shape``."""
        rows, cols = np.ogrid[: shape[0], : shape[1]]
        return self.contains(cols.astype(np.float64), rows.astype(np.float64))


def fit_ellipse(x: np.ndarray, y: np.ndarray) -> Ellipse:
    """Direct least-squares ellipse fit (Fitzgibbon et al. 1999; Halir & Flusser 1998).

    Raises ``ValueError`` when the points do not determine an ellipse.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size < 6:
        raise ValueError(f"need at least 6 points to fit an ellipse, got {x.size}")
    # Centre and scale the points for conditioning; the constraint 4AC - B^2 = 1
    # is unaffected up to a positive factor.
    mx, my = x.mean(), y.mean()
    scale = float(np.sqrt(((x - mx) ** 2 + (y - my) ** 2).mean()))
    if scale == 0:
        raise ValueError("all points coincide")
    u, v = (x - mx) / scale, (y - my) / scale
    d1 = np.stack([u * u, u * v, v * v], axis=1)
    d2 = np.stack([u, v, np.ones_like(u)], axis=1)
    s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
    try:
        t = -np.linalg.solve(s3, s2.T)
    except np.linalg.LinAlgError:
        raise ValueError("points are collinear; no ellipse fits") from None
    m = s1 + s2 @ t
    m = np.stack([m[2] / 2, -m[1], m[0] / 2])  # inv(C1) @ m
    _, vecs = np.linalg.eig(m)
    vecs = np.real(vecs)
    cond = 4 * vecs[0] * vecs[2] - vecs[1] ** 2
    k = int(np.argmax(cond))
    if not cond[k] > 0:
        raise ValueError("the points do not lie on an ellipse")
    a1 = vecs[:, k]
    qa, qb, qc = a1
    qd, qe, qf = t @ a1
    quad = np.array([[qa, qb / 2], [qb / 2, qc]])
    centre = np.linalg.solve(2 * quad, [-qd, -qe])
    f0 = qf + 0.5 * (qd * centre[0] + qe * centre[1])  # conic value at the centre
    lam, vec = np.linalg.eigh(quad)
    if lam[0] * lam[1] <= 0 or f0 * lam[0] >= 0:
        raise ValueError("the fitted conic is not a real ellipse")
    semi = np.sqrt(-f0 / lam) * scale  # semi-axis along each eigenvector
    major = int(np.argmax(semi))
    theta = float(np.arctan2(vec[1, major], vec[0, major]))
    return Ellipse(
        cx=float(centre[0] * scale + mx),
        cy=float(centre[1] * scale + my),
        a=float(semi[major]),
        b=float(semi[1 - major]),
        theta=theta,
    )


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a face neighbour outside the mask; the image border is not background."""
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def fill_outline(outline: np.ndarray) -> tuple[np.ndarray, str, Ellipse, float]:
    """Solid mask from an outline: ``(mask, method, fitted ellipse, fill area / fit area)``.

    ``method`` is ``"fill"`` (holes of the outline filled) or ``"ellipse_fit"``
    (the outline does not enclose the fitted ellipse: rasterised fit, clipped,
    plus the outline).
    """
    rows, cols = np.nonzero(outline)
    ellipse = fit_ellipse(cols, rows)
    fitted = ellipse.rasterize(outline.shape) | outline
    filled = ndimage.binary_fill_holes(outline)
    ratio = float(filled.sum()) / float(fitted.sum())
    if ratio < FILL_MIN_FRACTION:
        return fitted, "ellipse_fit", ellipse, ratio
    return filled, "fill", ellipse, ratio


def mask_circumference(mask: np.ndarray) -> float:
    """Circumference in pixels of the ellipse fitted to the mask's boundary."""
    rows, cols = np.nonzero(mask_boundary(mask))
    return fit_ellipse(cols, rows).perimeter()


# --------------------------------------------------------------------------
# Axes and files
# --------------------------------------------------------------------------


def png_to_nifti(array: np.ndarray) -> np.ndarray:
    """PNG ``(row, col)`` -> NIfTI ``(X, Y)``: X = column, Y = row reversed."""
    return np.ascontiguousarray(array[::-1, :].T)


def nifti_to_png(array: np.ndarray) -> np.ndarray:
    """Inverse of ``png_to_nifti``."""
    return np.ascontiguousarray(array.T[::-1, :])


def _read_png(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "P", "RGB", "RGBA", "LA"):
                img = img.convert("L")
            elif mode != "L":
                raise ValueError(f"{path}: unsupported {what} PNG mode {mode!r} (expected 8-bit)")
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError) as e:  # PIL raises these for truncated/corrupt files
        raise ValueError(f"{path}: cannot read {what} PNG ({type(e).__name__}: {e})") from e


def read_csv(path: str) -> dict[str, tuple[float, float]]:
    """``filename -> (pixel size mm, head circumference mm)`` from the HC18 CSV."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: missing HC18 CSV (pixel size and head circumference of every image)"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if tuple(header[:3]) != _CSV_COLUMNS:
            raise ValueError(f"{path}: expected the columns {list(_CSV_COLUMNS)}, got {header}")
        rows: dict[str, tuple[float, float]] = {}
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{line}: expected 3 columns, got {row}")
            name = row[0].strip()
            try:
                pixel, hc = float(row[1]), float(row[2])
            except ValueError:
                raise ValueError(f"{path}:{line}: {name}: not a number in {row[1:3]}") from None
            if not (np.isfinite(pixel) and pixel > 0 and np.isfinite(hc) and hc > 0):
                raise ValueError(
                    f"{path}:{line}: {name}: pixel size and head circumference must be > 0, "
                    f"got {pixel}, {hc}"
                )
            if name in rows:
                raise ValueError(f"{path}:{line}: {name} is listed twice")
            rows[name] = (pixel, hc)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclasses.dataclass(frozen=True)
class _Item:
    stem: str  # e.g. "010_2HC"
    case: str  # e.g. "hc18_010_2"
    image: str
    annotation: str
    pixel_size: float
    hc_mm: float


def _case_name(match: re.Match) -> str:
    rep = match.group("rep")
    return f"hc18_{match.group('num')}" + (f"_{rep}" if rep else "")


def _sort_key(match: re.Match) -> tuple[int, int]:
    return int(match.group("num")), int(match.group("rep") or 1)


def list_images(
    src: str, limit: int | None = None, only: Sequence[str] | None = None
) -> list[_Item]:
    """The images of ``src`` to convert, in file-number order (``NNN_HC``, ``NNN_2HC``, ...).

    ``only`` picks images by stem (``"186_HC"`` or ``"186_HC.png"``); ``limit``
    then keeps the first ``limit``. Checks every pairing before any image is read.
    """
    folder = os.path.join(src, IMAGES_DIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: missing HC18 image folder (is {src} the HC18 folder?)")
    table = read_csv(os.path.join(src, CSV_NAME))
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    pngs = [n for n in names if n.lower().endswith(".png")]
    annotations = {n for n in pngs if n.endswith("_Annotation.png")}
    matches = {}
    for name in pngs:
        if name in annotations:
            continue
        match = _IMAGE_RE.match(name)
        if match is None:
            raise ValueError(
                f"{os.path.join(folder, name)}: not an HC18 image name (NNN_HC.png, NNN_2HC.png)"
            )
        matches[name] = match
    for ann in sorted(annotations):
        image = ann[: -len("_Annotation.png")] + ".png"
        if image not in matches:
            raise FileNotFoundError(
                f"{os.path.join(folder, ann)}: annotation without image {image}"
            )
    if not matches:
        raise FileNotFoundError(f"{folder}: no HC18 images (NNN_HC.png)")
    ordered = sorted(matches, key=lambda n: _sort_key(matches[n]))
    if only is not None:
        wanted = [w if w.endswith(".png") else f"{w}.png" for w in only]
        unknown = [w for w in wanted if w not in matches]
        if unknown:
            raise ValueError(f"only: no such image in {folder}: {unknown}")
        ordered = [n for n in ordered if n in set(wanted)]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        ordered = ordered[:limit]
    items = []
    for name in ordered:
        stem = name[: -len(".png")]
        annotation = f"{stem}_Annotation.png"
        if annotation not in annotations:
            raise FileNotFoundError(
                f"{os.path.join(folder, name)}: no annotation {annotation} next to it"
            )
        if name not in table:
            raise ValueError(
                f"{os.path.join(folder, name)}: no row for {name} in {os.path.join(src, CSV_NAME)}"
            )
        pixel, hc = table[name]
        items.append(_Item(stem, _case_name(matches[name]), os.path.join(folder, name),
                           os.path.join(folder, annotation), pixel, hc))
    return items


def convert_one(item: _Item, images_dir: str, labels_dir: str) -> dict:
    """Convert one image and its annotation; return its summary record."""
    image = _read_png(item.image, "image")
    outline = _read_png(item.annotation, "annotation") > 127
    if image.shape != outline.shape:
        raise ValueError(
            f"{item.annotation}: shape {outline.shape} differs from image {item.image} "
            f"{image.shape}"
        )
    if not outline.any():
        raise ValueError(f"{item.annotation}: annotation has no foreground (no outline pixel)")
    try:
        mask, method, ellipse, ratio = fill_outline(outline)
        hc_px = mask_circumference(mask)
    except ValueError as e:
        raise ValueError(f"{item.annotation}: cannot fit an ellipse to the outline: {e}") from e
    hc_mm = hc_px * item.pixel_size
    error = abs(hc_mm - item.hc_mm) / item.hc_mm
    outline_error = abs(ellipse.perimeter() * item.pixel_size - item.hc_mm) / item.hc_mm
    name = f"{item.case}.nii.gz"
    affine = np.diag([item.pixel_size, item.pixel_size, 1.0, 1.0])
    write_nifti(os.path.join(images_dir, name), png_to_nifti(image), affine, _DESCRIP)
    write_nifti(os.path.join(labels_dir, name), png_to_nifti(mask.astype(np.uint8)), affine,
                _DESCRIP)
    return {
        "case": item.case,
        "image": os.path.basename(item.image),
        "shape_rows_cols": list(image.shape),
        "pixel_size_mm": item.pixel_size,
        "method": method,
        "fill_over_fit_area": round(ratio, 5),
        "head_pixels": int(mask.sum()),
        "hc_reference_mm": item.hc_mm,
        "hc_mask_mm": round(hc_mm, 4),
        "hc_rel_error": error,
        "hc_outline_rel_error": outline_error,
        "outline_fit_px": {"cx": ellipse.cx, "cy": ellipse.cy, "a": ellipse.a, "b": ellipse.b,
                           "theta": ellipse.theta},
    }


# --------------------------------------------------------------------------
# Whole folder
# --------------------------------------------------------------------------


def _dataset_json(records: list[dict]) -> dict:
    training = [
        {"image": f"./imagesTr/{r['case']}.nii.gz", "label": f"./labelsTr/{r['case']}.nii.gz"}
        for r in records
    ]
    return {
        "name": "HC18",
        "description": "Fetal head circumference, 2D B-mode ultrasound (HC18 challenge training "
        "set); head = the sonographer's ellipse, filled. Converted by " + GENERATOR,
        "reference": REFERENCE,
        "licence": "CC BY 4.0",
        "release": "1.0",
        "tensorImageSize": "2D",
        "modality": {"0": "US"},
        "labels": {"0": "background", "1": "head"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }


def convert(
    src: str,
    dst: str,
    limit: int | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert HC18 at ``src`` into a Decathlon folder ``dst``; return the summary.

    ``dst`` is built in a temporary folder next to it and moved into place at
    the end, so it is never half-written. A non-empty ``dst`` not written by
    this converter is refused unless ``overwrite``.
    """
    start = time.perf_counter()
    src = os.path.abspath(os.path.expanduser(src))
    dst = os.path.abspath(os.path.expanduser(dst))
    fileio.check_destination(dst, MARKER, GENERATOR, overwrite)
    items = list_images(src, limit=limit, only=only)
    with fileio.build_folder(dst) as tmp:
        images_dir = os.path.join(tmp, "imagesTr")
        labels_dir = os.path.join(tmp, "labelsTr")
        os.makedirs(images_dir)
        os.makedirs(labels_dir)
        records = []
        for i, item in enumerate(items):
            record = convert_one(item, images_dir, labels_dir)
            if record["hc_rel_error"] > HC_WARN:
                logging.warning(
                    "%s: head circumference of the mask %.2f mm differs from the reference "
                    "%.2f mm by %.1f%%", item.image, record["hc_mask_mm"], item.hc_mm,
                    100 * record["hc_rel_error"])
            if record["method"] == "fill" and abs(record["fill_over_fit_area"] - 1) > HC_WARN:
                logging.warning("%s: filled outline covers %.1f%% of the fitted ellipse's area",
                                item.annotation, 100 * record["fill_over_fit_area"])
            if record["method"] == "ellipse_fit":
                logging.info("%s: outline not closed (fill covers %.1f%% of the fitted ellipse); "
                             "using the fitted ellipse", item.annotation,
                             100 * record["fill_over_fit_area"])
            records.append(record)
            if (i + 1) % 50 == 0:
                logging.info("converted %d / %d images", i + 1, len(items))
        errors = np.array([r["hc_rel_error"] for r in records])
        worst = records[int(np.argmax(errors))]
        summary = {
            "generator": GENERATOR,
            "version": VERSION,
            "src": src,
            "dst": dst,
            "num_cases": len(records),
            "axes": "X = PNG column, Y = PNG row reversed; affine diag(pixel mm, pixel mm, 1, 1)",
            "ellipse_fit": [r["image"] for r in records if r["method"] == "ellipse_fit"],
            "hc_rel_error_median": float(np.median(errors)),
            "hc_rel_error_max": float(errors.max()),
            "hc_rel_error_max_image": worst["image"],
            "hc_over_5_percent": [r["image"] for r in records if r["hc_rel_error"] > HC_WARN],
            "hc_outline_rel_error_median": float(
                np.median([r["hc_outline_rel_error"] for r in records])),
            "hc_outline_rel_error_max": max(r["hc_outline_rel_error"] for r in records),
            "seconds": 0.0,
            "cases": records,
        }
        with open(os.path.join(tmp, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(_dataset_json(records), f, indent=2)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        # Again: something may have appeared meanwhile.
        fileio.check_destination(dst, MARKER, GENERATOR, overwrite)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
