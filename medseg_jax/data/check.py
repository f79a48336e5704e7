"""Check Decathlon / nnU-Net data folders before training.

Command line: ``python -m medseg_jax.tools.check_data --root=/path/to/Task04_Hippocampus``.

Reads ``dataset.json`` and then every case with ``nifti.load_case`` (a
small thread pool), collecting each case's fault instead of stopping at the
first one, and checks across cases: duplicate case ids, differing channel
counts, declared labels present in no case, empty labels, spacing anisotropy
and variation, intensity ranges. The summary also gives each class's geometry
at the data's resolution: the share of its voxels on its boundary and the Dice
that a mask shifted by one voxel along each axis scores, which says what a Dice
target means on that grid (a thin organ at 4 mm loses a third of its Dice to a
one-voxel error). Prints one line per problem
(``ERROR <task>/<case>: <file>: <fault>``, ``WARNING ...``, ``INFO ...``),
then a summary; exits 1 if there is any ERROR. ``check(roots)`` returns the
same as a ``Report`` for use from Python.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent import futures
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from medseg_jax.data import decathlon, nifti

ERROR, WARNING, INFO = "ERROR", "WARNING", "INFO"
ANISOTROPY_LIMIT = 3.0  # largest / smallest voxel size
INTENSITY_FACTOR = 100.0  # case maximum vs the median maximum
PROGRESS_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding. ``where`` is ``task/case`` or ``task``; ``file`` may be empty."""

    severity: str
    where: str
    file: str
    fault: str

    def __str__(self) -> str:
        file = f" {self.file}:" if self.file else ""
        return f"{self.severity} {self.where}:{file} {self.fault}"


@dataclasses.dataclass
class CaseStats:
    """What the cross-case checks need from one case (the arrays are not kept)."""

    case_id: str
    image_path: str
    label_path: str | None
    shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]
    minima: tuple[float, ...]  # per channel
    maxima: tuple[float, ...]
    label_counts: np.ndarray | None  # voxels per label value
    # per label value present (not background): (boundary share, one-voxel-shift Dice per axis)
    label_geometry: dict[int, tuple[float, tuple[float, ...]]] | None = None


@dataclasses.dataclass
class TaskSummary:
    """Per data folder: what was listed and read, and its statistics."""

    root: str
    name: str
    labels: dict[int, str] = dataclasses.field(default_factory=dict)
    modalities: tuple[str, ...] = ()
    listed: int = 0
    cases: list[CaseStats] = dataclasses.field(default_factory=list)

    @property
    def read(self) -> int:
        return len(self.cases)


@dataclasses.dataclass
class Report:
    """Everything ``check`` found; ``ok`` when there is no error."""

    errors: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    info: list[Problem] = dataclasses.field(default_factory=list)
    tasks: list[TaskSummary] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def cases_listed(self) -> int:
        return sum(t.listed for t in self.tasks)

    @property
    def cases_read(self) -> int:
        return sum(t.read for t in self.tasks)

    @property
    def problems(self) -> list[Problem]:
        return [*self.errors, *self.warnings, *self.info]

    def add(self, severity: str, where: str, file: str, fault: str) -> None:
        target = {ERROR: self.errors, WARNING: self.warnings, INFO: self.info}[severity]
        target.append(Problem(severity, where, file, fault))

    def summary(self) -> str:
        """Multi-line summary: per task shapes, spacing, intensities, label voxels; totals."""
        lines = ["Summary"]
        for task in self.tasks:
            lines += _task_summary(task)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(
            f"{verdict}: {self.cases_read} of {self.cases_listed} listed cases read, "
            f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}, "
            f"{len(self.info)} info, {self.seconds:.1f} s"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _num(x: float) -> str:
    return f"{x:.4g}"


def _min_median_max(values: np.ndarray) -> str:
    return "/".join(_num(v) for v in (values.min(), np.median(values), values.max()))


def _short(text: str, root: str) -> str:
    """Paths inside ``root`` written relative to it (the task is named on the line)."""
    return text.replace(root.rstrip(os.sep) + os.sep, "")


def _locate(message: str, candidates: list[str], root: str) -> tuple[str, str]:
    """Split an exception message into (file at fault, fault text)."""
    candidates = [p for p in candidates if p]
    prefix = next((p for p in candidates if message.startswith(p + ": ")), None)
    rest = message[len(prefix) + 2:] if prefix else message
    mentioned = sorted((rest.find(p), p) for p in candidates if p != prefix and p in rest)
    if prefix is not None and not (prefix.endswith(decathlon.DATASET_JSON) and mentioned):
        return prefix, _short(rest, root)
    if mentioned:
        return mentioned[0][1], _short(rest, root)
    return (prefix or (candidates[0] if candidates else "")), _short(rest, root)


def _describe(error: BaseException) -> str:
    if isinstance(error, (ValueError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"  # unexpected: keep the type


def _task_summary(task: TaskSummary) -> list[str]:
    mods = ", ".join(task.modalities) or "?"
    lines = [
        f"  {task.name} ({task.root}): {task.read} of {task.listed} listed cases read; "
        f"{_plural(len(task.modalities), 'channel')} ({mods})"
    ]
    if not task.cases:
        return lines
    shapes = [c.shape for c in task.cases]
    dims = sorted({len(s) for s in shapes})
    for nd in dims:
        arr = np.array([s for s in shapes if len(s) == nd])
        tag = f" ({nd}D, {len(arr)} cases)" if len(dims) > 1 else ""
        lines.append(
            f"    shape{tag}: min {tuple(int(v) for v in arr.min(0))}, "
            f"max {tuple(int(v) for v in arr.max(0))}, "
            f"voxels {_min_median_max(arr.prod(1).astype(float))} (min/median/max)"
        )
        spacing = np.array([c.spacing for c in task.cases if len(c.shape) == nd])
        axes = ", ".join(f"axis {a} {_min_median_max(spacing[:, a])}" for a in range(nd))
        lines.append(f"    spacing{tag} mm (min/median/max): {axes}")
    maxima = np.array([c.maxima for c in task.cases], dtype=float)
    minima = np.array([c.minima for c in task.cases], dtype=float)
    for ch, mod in enumerate(task.modalities[: maxima.shape[1]]):
        lines.append(
            f"    intensity channel {ch} ({mod}): case minimum {_num(minima[:, ch].min())} .. "
            f"{_num(minima[:, ch].max())}, case maximum {_min_median_max(maxima[:, ch])} "
            "(min/median/max)"
        )
    labelled = [c.label_counts for c in task.cases if c.label_counts is not None]
    if labelled:
        size = max(len(c) for c in labelled)
        counts = np.stack([np.pad(c, (0, size - len(c))) for c in labelled])
        total = counts.sum(0)
        parts = [
            f"{v} {task.labels.get(v, '?')} {int(total[v]):,} "
            f"({_num(100 * total[v] / max(total.sum(), 1))}%, "
            f"in {_plural(int((counts[:, v] > 0).sum()), 'case')})"
            for v in range(size)
        ]
        lines.append(f"    label voxels ({_plural(len(labelled), 'labelled case')}): "
                     + "; ".join(parts))
        lines += _geometry_lines(task)
    if len(labelled) < task.read:
        lines.append(f"    {_plural(task.read - len(labelled), 'case')} without a label file")
    return lines


def _geometry_lines(task: TaskSummary) -> list[str]:
    """Per class: boundary share and one-voxel-shift Dice per axis, means over the cases
    that contain the class."""
    per_class: dict[int, list[tuple[float, tuple[float, ...]]]] = {}
    for c in task.cases:
        for value, entry in (c.label_geometry or {}).items():
            per_class.setdefault(value, []).append(entry)
    lines = []
    for value in sorted(per_class):
        entries = per_class[value]
        ndims = {len(shift) for _, shift in entries}
        if len(ndims) > 1:  # 2D and 3D cases in one folder: axes do not line up
            continue
        boundary = np.mean([b for b, _ in entries])
        shift = np.mean([s for _, s in entries], axis=0)
        axes = ", ".join("-" if np.isnan(v) else f"{v:.2f}" for v in shift)
        lines.append(f"      {value} {task.labels.get(value, '?')}: {100 * boundary:.0f}% of its "
                     f"voxels on its boundary; shifted by one voxel along axis "
                     f"{'/'.join(str(a) for a in range(len(shift)))}: Dice {axes} "
                     f"({_plural(len(entries), 'case')})")
    if lines:
        lines.insert(0, "    label geometry at this resolution (means over the cases with "
                        "the class):")
    return lines


# --------------------------------------------------------------------------
# Listing the cases of one folder, tolerantly
# --------------------------------------------------------------------------


def _read_header(root: str) -> tuple[dict[str, Any], decathlon.DatasetInfo]:
    """``decathlon.read_header`` plus a check that ``training`` is a list."""
    meta, info = decathlon.read_header(root)
    if meta.get("training") and not isinstance(meta["training"], list):
        json_path = os.path.join(info.root, decathlon.DATASET_JSON)
        raise ValueError(f"{json_path}: field 'training' must be a list")
    return meta, info


def _list_training(meta: dict[str, Any], info: decathlon.DatasetInfo, report: Report) -> None:
    """The ``training`` list, one entry at a time, faults reported per case."""
    json_path = os.path.join(info.root, decathlon.DATASET_JSON)
    seen: dict[str, str] = {}
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            report.add(ERROR, f"{info.name}/training[{i}]", json_path,
                       f"'training' entry {i} must be a mapping with an 'image' path")
            continue
        image = decathlon._resolve(info.root, str(entry["image"]))
        base = os.path.basename(image)
        name = decathlon._strip_ending(base, info.file_ending) or base.split(".")[0]
        label = entry.get("label")
        paths = [image, decathlon._resolve(info.root, str(label)) if label else "", json_path]
        try:
            refs = decathlon._cases_from_training_list(
                info.root, {"training": [entry]}, json_path, info.name, info.modalities,
                info.file_ending, info.labels)
        except (OSError, ValueError) as e:
            file, fault = _locate(str(e), paths, info.root)
            report.add(ERROR, f"{info.name}/{name}", file, fault)
            continue
        for ref in refs:
            if ref.case_id in seen:
                report.add(ERROR, f"{info.name}/{ref.case_id}", json_path,
                           f"case id listed twice in 'training' ({seen[ref.case_id]} and "
                           f"{_short(ref.image_paths[0], info.root)})")
                continue
            seen[ref.case_id] = _short(ref.image_paths[0], info.root)
            info.cases.append(ref)


def _list_folders(info: decathlon.DatasetInfo, report: Report) -> None:
    """Cases of ``imagesTr``/``labelsTr`` (no training list), faults reported per case."""
    images_dir = os.path.join(info.root, "imagesTr")
    labels_dir = os.path.join(info.root, "labelsTr")
    ending = info.file_ending

    images = decathlon.list_folder(images_dir, ending)
    labels = decathlon.list_folder(labels_dir, ending)
    grouped, nnunet = decathlon.group_channels(images, labels)
    for stem, path in labels.items():
        if stem not in grouped:
            expected = f"{stem}{'_0000' if nnunet else ''}{ending}"
            report.add(ERROR, f"{info.name}/{stem}", path,
                       f"label without image (no {expected} in imagesTr)")
    for case_id, channels in sorted(grouped.items()):
        first = channels[min(channels)]
        if nnunet and sorted(channels) != list(range(len(info.modalities))):
            report.add(ERROR, f"{info.name}/{case_id}", first,
                       f"channel files {sorted(os.path.basename(p) for p in channels.values())} "
                       f"but dataset.json declares {len(info.modalities)} modalities "
                       f"{info.modalities}")
            continue
        label = labels.get(case_id)
        if label is None and os.path.isdir(labels_dir):
            report.add(ERROR, f"{info.name}/{case_id}", first,
                       f"no label {case_id}{ending} in labelsTr")
            continue
        ref = decathlon.CaseRef(case_id, tuple(channels[k] for k in sorted(channels)), label,
                                info.name)
        info.cases.append(ref)


def _open(root: str, report: Report) -> decathlon.DatasetInfo | None:
    """``read_dataset``, or on a case-level fault a tolerant listing; None if unusable."""
    root = os.path.abspath(os.path.expanduser(root))
    try:
        return decathlon.read_dataset(root)
    except (OSError, ValueError) as e:
        first = e
    json_path = os.path.join(root, decathlon.DATASET_JSON)
    try:
        meta, info = _read_header(root)
    except (OSError, ValueError) as e:  # dataset.json itself is broken: stop here
        report.add(ERROR, os.path.basename(root), json_path,
                   _locate(str(e), [json_path], root)[1])
        return None
    before = len(report.errors)
    if meta.get("training"):
        _list_training(meta, info, report)
    elif os.path.isdir(os.path.join(root, "imagesTr")):
        _list_folders(info, report)
    if len(report.errors) == before:  # the tolerant listing missed what read_dataset saw
        file, fault = _locate(_describe(first), [json_path], root)
        report.add(ERROR, info.name, file, fault)
    return info


# --------------------------------------------------------------------------
# Reading the cases
# --------------------------------------------------------------------------


def label_geometry(label: np.ndarray) -> dict[int, tuple[float, tuple[float, ...]]]:
    """Per class present in the integer ``label`` map (background 0 excluded): the share
    of its voxels on its boundary (a face neighbour outside the class, or the volume's
    edge) and, per axis, the Dice between the class mask and the same mask shifted by one
    voxel along that axis (adjacent voxel pairs inside the mask along the axis / mask
    voxels; NaN along an axis of one voxel)."""
    label = np.asarray(label)  # each class is cropped to its tight bounding box: a mask
    # voxel on the box's faces has its outer neighbour outside the class, so the erosion's
    # zero border counts exactly the boundary (metrics.surface's convention; not imported:
    # it would bring jax into this data-layer tool)
    kept = [a for a, n in enumerate(label.shape) if n > 1]  # an axis of one slice has no
    structure = ndimage.generate_binary_structure(len(kept), 1)  # neighbours along it
    out = {}
    for value, box in enumerate(ndimage.find_objects(label), start=1):
        if box is None:
            continue
        mask = label[box] == value
        voxels = int(mask.sum())
        squeezed = [mask.shape[a] for a in kept]
        inner = (ndimage.binary_erosion(mask.reshape(squeezed), structure, border_value=0)
                 if kept else np.zeros(1, bool))  # a single voxel: all boundary
        shift = tuple(float(np.logical_and(mask.take(range(1, n), axis=a),
                                           mask.take(range(n - 1), axis=a)).sum() / voxels)
                      if label.shape[a] > 1 else float("nan")  # one slice: no shift
                      for a, n in enumerate(mask.shape))
        out[value] = (1.0 - float(inner.sum()) / voxels, shift)
    return out


def _inspect(ref: decathlon.CaseRef, info: decathlon.DatasetInfo) -> CaseStats:
    case = nifti.load_case(ref, info)
    flat = case.image.reshape(case.image.shape[0], -1)
    counts = geometry = None
    if case.label is not None:
        counts = np.bincount(case.label.ravel(), minlength=max(info.labels) + 1)
        geometry = label_geometry(case.label)
    return CaseStats(
        case_id=ref.case_id,
        image_path=ref.image_paths[0],
        label_path=ref.label_path,
        shape=tuple(int(s) for s in case.image.shape[1:]),
        channels=int(case.image.shape[0]),
        spacing=tuple(float(s) for s in case.spacing),
        minima=tuple(float(v) for v in flat.min(axis=1)),
        maxima=tuple(float(v) for v in flat.max(axis=1)),
        label_counts=counts,
        label_geometry=geometry,
    )


def _read_all(
    jobs: list[tuple[decathlon.CaseRef, decathlon.DatasetInfo]],
    workers: int,
    progress: Callable[[str], None] | None,
) -> list[CaseStats | BaseException]:
    """Load every case (thread pool); each result is its stats or its exception."""
    results: list[CaseStats | BaseException] = [RuntimeError("not read")] * len(jobs)

    def one(i: int) -> None:
        ref, info = jobs[i]
        try:
            results[i] = _inspect(ref, info)
        except Exception as e:  # every fault of a case is reported, never raised
            results[i] = e

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(one, i) for i in range(len(jobs))]
        for done, fut in enumerate(futures.as_completed(pending), 1):
            fut.result()
            if progress and (done % PROGRESS_EVERY == 0 or done == len(jobs)):
                progress(f"read {done}/{len(jobs)} cases ({time.perf_counter() - start:.1f} s)")
    return results


# --------------------------------------------------------------------------
# Cross-case checks
# --------------------------------------------------------------------------


def _check_task(task: TaskSummary, report: Report) -> None:
    """Checks over the cases of one folder that read without error."""
    json_path = os.path.join(task.root, decathlon.DATASET_JSON)
    labelled = [c for c in task.cases if c.label_counts is not None]
    for c in labelled:
        if c.label_counts[1:].sum() == 0:
            report.add(WARNING, f"{task.name}/{c.case_id}", c.label_path or "",
                       "label is empty (background only)")
    if labelled:
        present = np.zeros(max(task.labels) + 1, dtype=bool)
        for c in labelled:
            present[: len(c.label_counts)] |= c.label_counts > 0
        for value, name in task.labels.items():
            if not present[value]:
                report.add(WARNING, task.name, json_path,
                           f"label {value} ({name!r}) is declared but present in none of the "
                           f"{len(labelled)} labelled cases")
    for c in task.cases:
        spacing = np.array(c.spacing)
        if spacing.min() <= 0:
            report.add(ERROR, f"{task.name}/{c.case_id}", c.image_path,
                       f"voxel size {tuple(_num(s) for s in spacing)} has a zero axis "
                       "(degenerate affine)")
            continue
        ratio = spacing.max() / spacing.min()
        if ratio > ANISOTROPY_LIMIT:
            report.add(WARNING, f"{task.name}/{c.case_id}", c.image_path,
                       f"spacing {'x'.join(_num(s) for s in spacing)} mm is anisotropic "
                       f"({ratio:.1f}:1 > {ANISOTROPY_LIMIT:g}:1)")
        for ch, (lo, hi) in enumerate(zip(c.minima, c.maxima)):
            if lo == hi:
                report.add(WARNING, f"{task.name}/{c.case_id}", c.image_path,
                           f"channel {ch} is constant ({_num(lo)})")
    for nd in sorted({len(c.spacing) for c in task.cases}):
        spacing = np.array([c.spacing for c in task.cases if len(c.spacing) == nd])
        lo, hi = spacing.min(0), spacing.max(0)
        if np.any(hi - lo > 1e-3 * hi):
            axes = ", ".join(f"axis {a} {_min_median_max(spacing[:, a])}" for a in range(nd))
            report.add(INFO, task.name, "",
                       f"spacing varies across {len(spacing)} cases, mm (min/median/max): "
                       f"{axes}; 2D models resize images to data.image_size by default, so "
                       "physical scale differs between cases: data.in_plane=spacing "
                       "resamples them to one pixel size instead")
    if not task.cases:
        return
    maxima = np.array([c.maxima for c in task.cases], dtype=float)
    for ch, mod in enumerate(task.modalities[: maxima.shape[1]]):
        col = maxima[:, ch]
        median = float(np.median(col))
        if median <= 0:
            continue
        off = (col > INTENSITY_FACTOR * median) | (col * INTENSITY_FACTOR < median)
        if not off.any():
            continue
        names = [task.cases[i].case_id for i in np.flatnonzero(off)[:3]]
        text = (f"channel {ch} ({mod}): the maximum intensity of {int(off.sum())} of "
                f"{len(col)} cases differs by more than {INTENSITY_FACTOR:g}x from the median "
                f"maximum {_num(median)} (range {_num(col.min())} .. {_num(col.max())}; e.g. "
                f"{', '.join(names)}); ")
        if mod.strip().upper() == "CT":
            report.add(WARNING, task.name, "",
                       text + "CT is normalised with data-set statistics, so check these cases")
        else:
            report.add(INFO, task.name, "",
                       text + "per-case normalisation is needed, which the pipeline does "
                       "(z-score per case)")


def _check_across(tasks: list[tuple[TaskSummary, decathlon.DatasetInfo]],
                  report: Report) -> None:
    """Checks between folders trained together and between all cases."""
    first_task, first = tasks[0]
    values = sorted(first.labels)
    if values != list(range(len(values))) or len(values) < 2:
        report.add(ERROR, first_task.name, os.path.join(first.root, decathlon.DATASET_JSON),
                   f"label values must be 0..K-1 with K >= 2 for training, got {values}")
    for task, info in tasks[1:]:
        json_path = os.path.join(info.root, decathlon.DATASET_JSON)
        if info.labels != first.labels:
            report.add(ERROR, task.name, json_path,
                       f"labels {info.labels} differ from {first_task.name}'s {first.labels}; "
                       "tasks trained together must share one label set")
    counts: dict[int, int] = {}
    for task, _ in tasks:
        for c in task.cases:
            counts[c.channels] = counts.get(c.channels, 0) + 1
    if len(counts) > 1:
        common = max(counts, key=lambda k: (counts[k], -k))
        for task, _ in tasks:
            for c in task.cases:
                if c.channels != common:
                    report.add(ERROR, f"{task.name}/{c.case_id}", c.image_path,
                               f"image has {_plural(c.channels, 'channel')}, "
                               f"{counts[common]} other cases have {common}")


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def check(
    roots: list[str] | str,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Check the data folders ``roots`` (each may be comma-separated); never raises on data."""
    start = time.perf_counter()
    report = Report()
    opened: list[tuple[TaskSummary, decathlon.DatasetInfo]] = []
    seen_roots: set[str] = set()
    keys: dict[str, str] = {}
    jobs: list[tuple[decathlon.CaseRef, decathlon.DatasetInfo]] = []
    owners: list[TaskSummary] = []
    for root in decathlon.split_roots(roots):
        path = os.path.abspath(os.path.expanduser(root))
        if path in seen_roots:
            report.add(ERROR, os.path.basename(path), path, "data folder given twice")
            continue
        seen_roots.add(path)
        info = _open(path, report)
        if info is None:
            report.tasks.append(TaskSummary(path, os.path.basename(path)))
            continue
        task = TaskSummary(path, info.name, dict(info.labels), info.modalities, len(info.cases))
        report.tasks.append(task)
        opened.append((task, info))
        for ref in info.cases:
            key = f"{ref.task}/{ref.case_id}"
            if key in keys:  # two folders with the same task name and case id
                report.add(ERROR, key, ref.image_paths[0],
                           f"case id also used by {keys[key]} (task {ref.task!r})")
                continue
            keys[key] = ref.image_paths[0]
            jobs.append((ref, info))
            owners.append(task)
    if progress and jobs:
        progress(f"reading {len(jobs)} cases of {_plural(len(opened), 'data set')}")
    workers = workers or min(4, max(2, os.cpu_count() or 2))
    for (ref, info), task, result in zip(jobs, owners, _read_all(jobs, workers, progress)):
        if isinstance(result, CaseStats):
            task.cases.append(result)
            continue
        paths = [*ref.image_paths, ref.label_path or ""]
        file, fault = _locate(_describe(result), paths, info.root)
        report.add(ERROR, f"{ref.task}/{ref.case_id}", file, fault)
    for task, _ in opened:
        _check_task(task, report)
    if opened:
        _check_across(opened, report)
    report.seconds = time.perf_counter() - start
    return report
