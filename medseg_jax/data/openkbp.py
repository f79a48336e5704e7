"""Read the OpenKBP challenge's CSV format and convert it to a Decathlon folder.

Owns: reading the format (``ct.csv``, the structure CSVs, ``voxel_dimensions.csv``,
each as ``.csv`` or ``.csv.gz``), building the CT and label volumes, the affine,
the anatomical orientation checks and the whole-folder conversion (``convert``).
The command line is ``medseg_jax.tools.convert_openkbp``.

Input (as the challenge ships it): ``src/train-pats/pt_N/`` and
``src/validation-pats/pt_N/``, each holding ``ct.csv``, ``voxel_dimensions.csv``
and one CSV per contoured organ. CSVs have the header ``,data``; column 1 is a
flat C-order index into the ``128 x 128 x 128`` array, column 2 the value (CT:
HU + 1024; structures: empty, ignored, the listed voxels are the mask).
``voxel_dimensions.csv`` holds three voxel sizes in mm in the array's axis
order, no header. Other files (``dose.csv``, ``possible_dose_mask.csv``) are
ignored. Patient ids are unique over the challenge's folders (pt_1-200 train,
pt_201-240 validation, pt_241-340 test), so the case id is the folder name; an
id found in two folders is an error.

Output: ``dst/dataset.json``, ``dst/imagesTr/pt_N.nii.gz`` (int16 HU: the
organisers' value clipped to 0..4095, rounded, minus 1024; voxels absent from
``ct.csv`` are -1024), ``dst/labelsTr/pt_N.nii.gz`` (uint8) and
``dst/openkbp_conversion.json`` (the summary, written last; it also marks the
folder as written by this converter). The folder is built beside ``dst`` and
swapped into place (``fileio.build_folder``): never half-written.

Labels (the challenge's own order): 1 Brainstem, 2 SpinalCord, 3 RightParotid,
4 LeftParotid, 5 Esophagus, 6 Larynx, 7 Mandible. A missing organ file means the
organ was not contoured (unknown, not absent): its voxels are 0 and each
training entry of ``dataset.json`` lists the contoured label values in
``annotated_labels``.

Overlaps: organs are contoured independently and overlap in about half of the
patients, by a few voxels (measured on the 203 patients: RightParotid/Mandible
71 patients, LeftParotid/Mandible 52, Brainstem/SpinalCord 30, Esophagus/Larynx
3, SpinalCord/Esophagus 1, SpinalCord/LeftParotid 1; at most 45 voxels). A voxel
in several organs gets the one that comes first in ``PRIORITY``, the organs from
smallest to largest median volume on the real data (Esophagus 230 voxels,
Larynx 403, SpinalCord 539, Brainstem 557, RightParotid 560, LeftParotid 581,
Mandible 1307): the smaller structure wins, so a small organ keeps its border
voxels, under one fixed order.

Geometry: the arrays are stored as shipped. Organ centroids over the 203
patients (LeftParotid vs RightParotid, Mandible and Larynx vs SpinalCord,
Brainstem vs Esophagus, Larynx and SpinalCord; all agree) show that array axis
0 runs anterior to posterior, axis 1 right to left and axis 2 superior to
inferior (nibabel axis codes ``P, L, I``; axial slices are ``array[:, :, k]``).
The affine maps them to RAS+ world millimetres (+x to the patient's right, +y
anterior, +z superior) with the sizes of ``voxel_dimensions.csv``; no patient
position is shipped, so the grid centre is put at the world origin. Every case
is checked again in world coordinates (``orientation_checks``); a disagreement
is logged as a warning and listed in the summary.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import os
import re
import time
import zlib
from collections.abc import Sequence

import numpy as np
from absl import logging

from medseg_jax import fileio
from medseg_jax.data.nifti import write_nifti

_DESCRIP = b"OpenKBP via medseg_jax.data.openkbp"  # the NIfTI header's description

GENERATOR = "medseg_jax.data.openkbp"
VERSION = 1
MARKER = "openkbp_conversion.json"
GRID = (128, 128, 128)
SPLITS = ("train-pats", "validation-pats")
ORGANS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
          "Mandible")
LABELS = {name: value for value, name in enumerate(ORGANS, start=1)}
# First wins where organs overlap: smallest median volume on the 203 real patients first.
PRIORITY = ("Esophagus", "Larynx", "SpinalCord", "Brainstem", "RightParotid", "LeftParotid",
            "Mandible")
# Where each array axis points (nibabel axis codes), measured from organ centroids.
AXCODES = ("P", "L", "I")
CT_MAX = 4095  # the organisers advise clipping to 0..4095
HU_OFFSET = 1024
HEADER = ",data"
# (direction, organ, other, world axis, sign): organ lies at larger (sign +1) or smaller
# (-1) RAS+ world coordinate than other along the axis.
ORIENTATION_CHECKS = (
    ("left_right", "LeftParotid", "RightParotid", 0, -1),  # +x is the patient's right
    ("anterior_posterior", "Mandible", "SpinalCord", 1, +1),
    ("anterior_posterior", "Larynx", "SpinalCord", 1, +1),
    ("superior_inferior", "Brainstem", "Esophagus", 2, +1),
    ("superior_inferior", "Brainstem", "Larynx", 2, +1),
    ("superior_inferior", "Brainstem", "SpinalCord", 2, +1),
)
LICENCE = "MIT (OpenKBP challenge repository, copyright Aaron Babier)"
REFERENCE = (
    "Babier A, Zhang B, Mahmood R, Moore KL, Purdie TG, McNiven AL, Chan TCY. OpenKBP: The "
    "open-access knowledge-based planning grand challenge and dataset. Medical Physics 48, "
    "5549-5561 (2021). https://doi.org/10.1002/mp.14845; images from The Cancer Imaging Archive"
)

_PATIENT_RE = re.compile(r"^pt_(\d+)$")


# --------------------------------------------------------------------------
# Reading the CSV format
# --------------------------------------------------------------------------


def find_file(folder: str, stem: str) -> str | None:
    """``folder/stem.csv`` or ``folder/stem.csv.gz``, whichever exists (None: neither)."""
    plain = os.path.join(folder, f"{stem}.csv")
    packed = plain + ".gz"
    if os.path.isfile(plain) and os.path.isfile(packed):
        raise ValueError(f"{plain}: both {stem}.csv and {stem}.csv.gz exist; keep one")
    for path in (plain, packed):
        if os.path.isfile(path):
            return path
    return None


def read_text(path: str) -> str:
    """The text of a ``.csv`` or ``.csv.gz`` file."""
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file ({type(e).__name__}: {e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text CSV ({e})") from None


def _find_bad_line(path: str, text: str, with_values: bool, numpy_error: Exception) -> ValueError:
    """The first malformed data line, as one error naming the file and the line."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if lineno == 1 or not line.strip():
            continue
        fields = line.split(",")
        if with_values and len(fields) != 2:
            return ValueError(f"{path}:{lineno}: expected 2 columns (index,value), got {line!r}")
        for field in fields[: 2 if with_values else 1]:
            try:
                float(field)
            except ValueError:
                return ValueError(f"{path}:{lineno}: not a number: {field.strip()!r}")
    return ValueError(f"{path}: cannot parse ({' '.join(str(numpy_error).split())})")


def read_sparse(path: str, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(indices int64, values float64 or None)`` of an OpenKBP CSV (header ``,data``).

    Structure files (``with_values=False``) are read for their first column only.
    Indices must be integers; range and duplicate checks are ``check_indices``'s.
    """
    text = read_text(path)
    head, _, body = text.partition("\n")
    if head.strip().replace(" ", "") != HEADER:
        raise ValueError(f"{path}: expected the CSV header {HEADER!r}, got {head.strip()[:60]!r}")
    table = np.zeros((0, 2))
    if body.strip():
        try:
            table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2,
                               usecols=None if with_values else (0,))
        except ValueError as e:
            raise _find_bad_line(path, text, with_values, e) from None
    if table.shape[0] == 0:
        raise ValueError(f"{path}: no data rows (an empty {'CT' if with_values else 'structure'} "
                         "file)")
    if with_values and table.shape[1] != 2:
        raise ValueError(f"{path}: expected 2 columns (index,value), got {table.shape[1]}")
    index = table[:, 0]
    bad = ~np.isfinite(index) | (index != np.floor(index))
    if bad.any():
        raise ValueError(f"{path}: index {float(index[bad][0]):g} is not an integer")
    values = None
    if with_values:
        values = table[:, 1]
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"{path}: value {float(values[bad][0]):g} at index "
                             f"{int(index[bad][0])} is not finite")
    return index.astype(np.int64), values


def read_voxel_dimensions(path: str) -> tuple[float, float, float]:
    """The three voxel sizes in mm (array axis order) of ``voxel_dimensions.csv``."""
    tokens = read_text(path).replace(",", " ").split()
    try:
        sizes = [float(t) for t in tokens]
    except ValueError:
        raise ValueError(f"{path}: expected 3 voxel sizes in mm, got non-numbers in "
                         f"{tokens[:6]}") from None
    if len(sizes) != 3 or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise ValueError(f"{path}: expected exactly 3 positive voxel sizes in mm, got "
                         f"{tokens[:6]}{' ...' if len(tokens) > 6 else ''}")
    return sizes[0], sizes[1], sizes[2]


def check_indices(path: str, index: np.ndarray, shape: Sequence[int]) -> None:
    """Every index lies in the C-order grid ``shape`` and none is listed twice."""
    size = int(np.prod(shape))
    bad = (index < 0) | (index >= size)
    if bad.any():
        raise ValueError(f"{path}: index {int(index[bad][0])} is out of range 0..{size - 1} "
                         f"(a {'x'.join(map(str, shape))} grid)")
    seen = np.zeros(size, dtype=bool)
    seen[index] = True
    if int(seen.sum()) != index.size:
        values, counts = np.unique(index, return_counts=True)
        raise ValueError(f"{path}: index {int(values[counts > 1][0])} is listed twice")


def ct_to_hu(values: np.ndarray) -> np.ndarray:
    """Organisers' CT values -> int16 HU: round, clip to 0..CT_MAX, minus HU_OFFSET."""
    return (np.clip(np.rint(values), 0, CT_MAX) - HU_OFFSET).astype(np.int16)


def ct_volume(path: str, shape: Sequence[int] = GRID) -> tuple[np.ndarray, dict]:
    """The CT of ``ct.csv`` as an int16 HU volume (absent voxels -1024), and its facts."""
    index, values = read_sparse(path, with_values=True)
    assert values is not None
    check_indices(path, index, shape)
    volume = np.full(int(np.prod(shape)), -HU_OFFSET, dtype=np.int16)
    volume[index] = ct_to_hu(values)
    facts = {"ct_rows": int(index.size), "ct_value_min": float(values.min()),
             "ct_value_max": float(values.max()),
             "ct_clipped_voxels": int(((values < 0) | (values > CT_MAX)).sum())}
    return volume.reshape(tuple(shape)), facts


def label_volume(masks: dict[str, np.ndarray], shape: Sequence[int] = GRID
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """uint8 label map from ``{organ: flat indices}``; overlaps resolved by ``PRIORITY``.

    Returns the map and ``{"A&B": shared voxels}`` for every overlapping pair (``A``
    before ``B`` in label order).
    """
    unknown = sorted(set(masks) - set(ORGANS))
    if unknown:
        raise ValueError(f"unknown organs {unknown}; expected some of {list(ORGANS)}")
    labels = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    for organ in reversed(PRIORITY):  # the first in PRIORITY is painted last and wins
        if organ in masks:
            labels[masks[organ]] = LABELS[organ]
    overlaps = {}
    present = [o for o in ORGANS if o in masks]
    for a, b in itertools.combinations(present, 2):
        shared = int(np.intersect1d(masks[a], masks[b], assume_unique=True).size)
        if shared:
            overlaps[f"{a}&{b}"] = shared
    return labels.reshape(tuple(shape)), overlaps


def affine(spacing: Sequence[float], shape: Sequence[int] = GRID,
           axcodes: Sequence[str] = AXCODES) -> np.ndarray:
    """Voxel -> RAS+ world (mm) affine: array axis ``a`` points along ``axcodes[a]``
    with step ``spacing[a]``; the grid centre sits at the world origin."""
    world_axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    out = np.eye(4)
    out[:3, :3] = 0.0
    for a, code in enumerate(axcodes):
        out[world_axis[code], a] = (1.0 if code in "RAS" else -1.0) * float(spacing[a])
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    out[:3, 3] = -out[:3, :3] @ centre
    return out


def centroids(masks: dict[str, np.ndarray], shape: Sequence[int], aff: np.ndarray
              ) -> dict[str, np.ndarray]:
    """World (RAS+ mm) centroid of each organ's voxels."""
    out = {}
    for organ, index in masks.items():
        ijk = np.stack(np.unravel_index(index, tuple(shape)), axis=1).mean(axis=0)
        out[organ] = aff[:3, :3] @ ijk + aff[:3, 3]
    return out


def orientation_checks(world_centroids: dict[str, np.ndarray]) -> dict[str, bool]:
    """``{direction: agrees}`` for each direction with both organs of a check present
    (a direction agrees when all its checks do); see ``ORIENTATION_CHECKS``."""
    out: dict[str, bool] = {}
    for direction, organ, other, axis, sign in ORIENTATION_CHECKS:
        if organ in world_centroids and other in world_centroids:
            ok = sign * (world_centroids[organ][axis] - world_centroids[other][axis]) > 0
            out[direction] = out.get(direction, True) and bool(ok)
    return out


# --------------------------------------------------------------------------
# Patients
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Patient:
    case: str  # e.g. "pt_1"
    split: str  # "train-pats" or "validation-pats"
    path: str


def list_patients(src: str, limit: int | None = None, only: Sequence[str] | None = None
                  ) -> list[Patient]:
    """The patients of ``src``'s split folders, train first, each by patient number.

    ``only`` picks patients by id (``pt_1``); ``limit`` then keeps the first ``limit``.
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: OpenKBP folder does not exist")
    found: dict[str, Patient] = {}
    splits = [s for s in SPLITS if os.path.isdir(os.path.join(src, s))]
    if not splits:
        raise FileNotFoundError(f"{src}: no {' or '.join(SPLITS)} folder (is it the OpenKBP "
                                "folder?)")
    for split in splits:
        folder = os.path.join(src, split)
        names = [n for n in os.listdir(folder) if _PATIENT_RE.match(n)
                 and os.path.isdir(os.path.join(folder, n))]
        for name in sorted(names, key=lambda n: int(n[3:])):
            if name in found:
                raise ValueError(f"{os.path.join(folder, name)}: patient id {name} is also in "
                                 f"{found[name].path}")
            found[name] = Patient(name, split, os.path.join(folder, name))
    if not found:
        raise FileNotFoundError(f"{src}: no patient folders (pt_N) in {', '.join(splits)}")
    patients = list(found.values())
    if only is not None:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise ValueError(f"only: no such patient in {src}: {unknown}")
        patients = [p for p in patients if p.case in set(only)]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        patients = patients[:limit]
    return patients


@dataclasses.dataclass
class PatientData:
    """One patient read and checked: volumes plus the facts for the summary."""

    ct: np.ndarray  # int16 HU
    labels: np.ndarray  # uint8
    affine: np.ndarray
    record: dict


def read_patient(patient: Patient, shape: Sequence[int] = GRID) -> PatientData:
    """Read, check and build the volumes of one patient folder."""
    start = time.perf_counter()
    ct_path = find_file(patient.path, "ct")
    if ct_path is None:
        raise FileNotFoundError(f"{os.path.join(patient.path, 'ct.csv')}: missing CT file "
                                "(ct.csv or ct.csv.gz)")
    dims_path = find_file(patient.path, "voxel_dimensions")
    if dims_path is None:
        raise FileNotFoundError(f"{os.path.join(patient.path, 'voxel_dimensions.csv')}: missing "
                                "voxel sizes file (voxel_dimensions.csv or .csv.gz)")
    spacing = read_voxel_dimensions(dims_path)
    masks = {}
    for organ in ORGANS:
        path = find_file(patient.path, organ)
        if path is not None:
            index, _ = read_sparse(path, with_values=False)
            check_indices(path, index, shape)
            masks[organ] = np.sort(index)
    if not masks:
        raise FileNotFoundError(f"{patient.path}: no organ file (one of "
                                f"{', '.join(o + '.csv' for o in ORGANS)}, or .csv.gz)")
    ct, ct_facts = ct_volume(ct_path, shape)
    labels, overlaps = label_volume(masks, shape)
    aff = affine(spacing, shape)
    checks = orientation_checks(centroids(masks, shape, aff))
    counts = np.bincount(labels.ravel(), minlength=len(ORGANS) + 1)
    record = {
        "case": patient.case,
        "split": patient.split,
        "spacing_mm": list(spacing),
        **ct_facts,
        "hu_min": int(ct.min()),
        "hu_max": int(ct.max()),
        "contoured": [o for o in ORGANS if o in masks],
        "annotated_labels": [LABELS[o] for o in ORGANS if o in masks],
        "organ_voxels": {o: int(masks[o].size) for o in ORGANS if o in masks},
        "label_voxels": {o: int(counts[LABELS[o]]) for o in ORGANS if o in masks},
        "overlaps": overlaps,
        "orientation": checks,
        "read_seconds": round(time.perf_counter() - start, 3),
    }
    return PatientData(ct, labels, aff, record)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def convert_patient(patient: Patient, out_dir: str, shape: Sequence[int] = GRID) -> dict:
    """Read one patient and write ``imagesTr/`` and ``labelsTr/`` under ``out_dir``."""
    data = read_patient(patient, shape)
    name = f"{patient.case}.nii.gz"
    write_nifti(os.path.join(out_dir, "imagesTr", name), data.ct, data.affine, _DESCRIP)
    write_nifti(os.path.join(out_dir, "labelsTr", name), data.labels, data.affine, _DESCRIP)
    return data.record


def dataset_json(records: list[dict]) -> dict:
    """The Decathlon ``dataset.json`` of the converted cases."""
    training = [
        {"image": f"./imagesTr/{r['case']}.nii.gz", "label": f"./labelsTr/{r['case']}.nii.gz",
         "annotated_labels": r["annotated_labels"]}
        for r in records
    ]
    return {
        "name": "OpenKBP",
        "description": (
            "Head-and-neck CT (int16 HU) with clinical organ-at-risk contours, OpenKBP 2020 "
            "challenge train-pats and validation-pats, 128^3 grid as shipped. Partial labels: "
            "each training entry lists in 'annotated_labels' the organs contoured in that case; "
            "voxels of other organs are 0 (unknown, not absent). Overlapping contours: the voxel "
            "goes to the first organ of " + ", ".join(PRIORITY) + " (smallest median volume "
            "first). Converted by " + GENERATOR
        ),
        "reference": REFERENCE,
        "licence": LICENCE,
        "release": "OpenKBP 2020",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(v): o for o, v in LABELS.items()}},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files)


def summarise(records: list[dict]) -> dict:
    """Whole-set statistics: organ counts, overlaps, orientation agreement, CT range."""
    pairs: dict[str, dict[str, int]] = {}
    for r in records:
        for pair, n in r["overlaps"].items():
            s = pairs.setdefault(pair, {"patients": 0, "voxels": 0, "max_voxels": 0})
            s["patients"] += 1
            s["voxels"] += n
            s["max_voxels"] = max(s["max_voxels"], n)
    disagree = [r["case"] for r in records if not all(r["orientation"].values())]
    directions = ("left_right", "anterior_posterior", "superior_inferior")
    return {
        "splits": {s: sum(r["split"] == s for r in records) for s in SPLITS},
        "contoured_patients": {o: sum(o in r["contoured"] for r in records) for o in ORGANS},
        "overlap_pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1]["patients"])),
        "patients_with_overlap": sum(bool(r["overlaps"]) for r in records),
        "orientation_agree": sum(bool(r["orientation"]) and all(r["orientation"].values())
                                 for r in records),
        "orientation_disagree": disagree,
        "orientation_unchecked": [r["case"] for r in records if not r["orientation"]],
        "orientation_checked_per_direction": {
            d: sum(d in r["orientation"] for r in records) for d in directions},
        "ct_value_min": min(r["ct_value_min"] for r in records),
        "ct_value_max": max(r["ct_value_max"] for r in records),
        "ct_clipped_patients": sum(r["ct_clipped_voxels"] > 0 for r in records),
        "ct_clipped_voxels": sum(r["ct_clipped_voxels"] for r in records),
        "hu_min": min(r["hu_min"] for r in records),
        "hu_max": max(r["hu_max"] for r in records),
    }


def convert(src: str, dst: str, limit: int | None = None, only: Sequence[str] | None = None,
            overwrite: bool = False, shape: Sequence[int] = GRID) -> dict:
    """Convert the OpenKBP folder ``src`` into the Decathlon folder ``dst``; return the summary.

    ``dst`` is built beside itself and swapped in at the end (never half-written; on
    any error the old ``dst`` is left as it was). A non-empty ``dst`` not written by
    this converter is refused unless ``overwrite``. ``shape`` is the grid of the
    flat indices (the challenge's is 128^3). One process: 203 patients take about
    25 s on one core, and two processes on the 2-core machine saved only ~15%.
    """
    start = time.perf_counter()
    src = os.path.abspath(os.path.expanduser(src))
    dst = os.path.abspath(os.path.expanduser(dst))
    shape = tuple(int(s) for s in shape)
    fileio.check_destination(dst, MARKER, GENERATOR, overwrite)
    patients = list_patients(src, limit=limit, only=only)
    with fileio.build_folder(dst) as tmp:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        records = []
        for patient in patients:
            record = convert_patient(patient, tmp, shape)
            records.append(_log_record(record, len(records) + 1, len(patients)))
        fileio.write_json_atomic(os.path.join(tmp, "dataset.json"), dataset_json(records))
        summary = {
            "generator": GENERATOR,
            "version": VERSION,
            "src": src,
            "dst": dst,
            "num_cases": len(records),
            "grid": list(shape),
            "axes": (f"array axes point {'/'.join(AXCODES)} (nibabel codes); affine to RAS+ mm "
                     "from voxel_dimensions, grid centre at the origin"),
            "labels": {str(v): o for o, v in LABELS.items()},
            "overlap_priority": list(PRIORITY),
            "hu": f"clip(value, 0, {CT_MAX}) - {HU_OFFSET}; voxels absent from ct.csv "
                  f"-{HU_OFFSET}",
            **summarise(records),
            "output_bytes": _folder_bytes(tmp),
            "seconds": 0.0,
            "cases": records,
        }
        # Again: something may have appeared meanwhile.
        fileio.check_destination(dst, MARKER, GENERATOR, overwrite)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        fileio.write_json_atomic(os.path.join(tmp, MARKER), summary)  # last: marks it done
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _log_record(record: dict, done: int, total: int) -> dict:
    if not all(record["orientation"].values()):
        failed = [d for d, ok in record["orientation"].items() if not ok]
        logging.warning("%s (%s): organ centroids disagree with the %s orientation",
                        record["case"], record["split"], ", ".join(failed))
    if done % 25 == 0 or done == total:
        logging.info("converted %d / %d patients", done, total)
    return record
