"""Preprocessing, once per data and settings: the cache a training run reads.

``prepare(config, workdir)`` fits the intensity normalisation and the target spacing
on the training cases only, checks from the headers that no training or validation
case needs more memory than ``config.data.max_case_gib``, preprocesses the training and validation cases (resized
slices, or cases resampled to the target spacing for patch-based runs; each case's crop
box and resampling decision in ``geometry.json``) and stores them
as ``.npy`` files in a folder keyed by a fingerprint of the files and the settings, so
an epoch reads memory-mapped arrays and never decodes NIfTI. The folder is built under
a temporary name and renamed when complete; its ``manifest.json`` (written last)
records every file's size and array header, checked on every use: an entry that does
not match (a file missing, cut short, unreadable, changed) is rebuilt from the data,
with a warning naming it, bit-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging

from medseg_jax import fileio
from medseg_jax.data import preprocess
from medseg_jax.data.dataset import Dataset, open_dataset
from medseg_jax.data.nifti import canonical_spacing


_CACHE_VERSION = 4


def _fingerprint(config, dataset: Dataset) -> str:
    files = []
    for s in ("train", "val"):
        for key in dataset.splits[s]:
            ref, _ = dataset.refs[key]
            for p in (*ref.image_paths, ref.label_path):
                st = os.stat(p)
                files.append((s, key, os.path.abspath(p), st.st_size, int(st.st_mtime_ns)))
            if ref.annotated is not None:  # partial labels, from dataset.json
                files.append((s, key, "annotated", list(ref.annotated)))
    settings = {
        # What dataset.json decides: the classes, and CT or z-score normalisation.
        "tasks": [[info.name, sorted(info.labels.items()), list(info.modalities)]
                  for info in dataset.infos],
        "version": _CACHE_VERSION,
        "image_size": list(config.data.image_size),
        "slice_axis": config.data.slice_axis,
        "spatial_dims": config.model.spatial_dims,
        "target_spacing": list(config.data.target_spacing),
        "in_plane": config.data.in_plane,
        "rescale_01": bool(config.data.rescale_01),
        "files": files,
    }
    if int(config.data.context_slices):  # (not there before: old caches stay valid)
        settings["context_slices"] = int(config.data.context_slices)
    if preprocess.resampling_method(config) != "simple":  # (likewise)
        settings["resampling"] = preprocess.resampling_method(config)
    if config.data.crop_nonzero:
        settings["crop_nonzero"] = True
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def intensity_plans(dataset: Dataset, loaded: dict | None = None) -> dict[str, list[dict]]:
    """Per task, per channel normalisation, from that task's training cases only.

    Cases read for the CT statistics are left in ``loaded`` (key -> Case) for reuse.
    """
    plans = {}
    loaded = {} if loaded is None else loaded
    for info in dataset.infos:
        keys = [k for k in dataset.splits["train"] if dataset.refs[k][1] is info]
        if not any(preprocess.is_ct(m) for m in info.modalities):
            plans[info.name] = [{"scheme": "zscore"} for _ in info.modalities]
            continue
        for k in keys:
            loaded[k] = dataset.load(k)
        cases = [loaded[k] for k in keys]
        plans[info.name] = preprocess.intensity_plan(
            info.modalities, [c.image for c in cases], [c.label for c in cases])
    return plans


def target_spacing(config, dataset: Dataset) -> list[float]:
    """config.data.target_spacing, or the median spacing of the training cases.

    3D models: three entries (mm along the RAS axes). 2D models: two, the in-plane
    axes (a 3D case keeps its own spacing along ``data.slice_axis``); a given
    three-entry value is accepted and its slice-axis entry dropped.
    """
    dims = config.model.spatial_dims
    axis = config.data.slice_axis
    given = tuple(config.data.target_spacing)
    if given:
        if len(given) not in ((3,) if dims == 3 else (2, 3)) or min(given) <= 0:
            raise ValueError(
                f"config.data.target_spacing: {given} must be "
                f"{'three' if dims == 3 else 'two (in plane) or three'} positive numbers "
                "(mm) or empty (median of the training cases)")
        if dims == 2 and len(given) == 3:
            given = given[:axis] + given[axis + 1:]
        return [float(x) for x in given]
    spacings = []
    for k in dataset.splits["train"]:
        ref, info = dataset.refs[k]
        spacing = canonical_spacing(ref.image_paths[0])
        if info.is_2d:
            spacing = spacing[:2]
        elif dims == 2:
            spacing = spacing[:axis] + spacing[axis + 1:]
        elif len(spacing) != 3:
            raise ValueError(f"{ref.image_paths[0]}: a 3D model needs 3D images")
        spacings.append(spacing)
    return [float(x) for x in np.median(np.array(spacings), axis=0)]


@dataclasses.dataclass
class Samples:
    """Preprocessed samples of one split, memory-mapped from the cache."""

    directory: str
    split: str

    def __post_init__(self):
        base = os.path.join(self.directory, self.split)
        self.images = np.load(base + "_images.npy", mmap_mode="r")
        self.labels = np.load(base + "_labels.npy", mmap_mode="r")
        self.case_index = np.load(base + "_case.npy")
        self.foreground = np.load(base + "_fg.npy")
        self.classes = np.load(base + "_classes.npy")  # (N, K): classes present
        # (N, K): classes annotated (partial labels only; None when all are)
        path = base + "_annotated.npy"
        self.annotated = np.load(path) if os.path.exists(path) else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {"image": np.asarray(self.images[i]), "label": np.asarray(self.labels[i])}

    def __getstate__(self):  # grain workers re-open the memmaps
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state):
        self.directory, self.split = state["directory"], state["split"]
        self.__post_init__()


def prepare(config, workdir: str, dataset: Dataset | None = None):
    """Returns (dataset, plans, {"train": Samples or Volumes (3D), "val": Samples}).

    ``plans`` = {"intensity": {task: per-channel normalisation}, "target_spacing":
    mm per axis for 3D models, per in-plane axis for 2D models with
    ``data.in_plane='spacing'``, None for resized 2D slices}.
    """
    dataset = dataset or open_dataset(config, workdir)
    cache_root = os.path.expanduser(config.data.cache_dir or os.path.join(workdir, "cache"))
    directory = os.path.join(cache_root, _fingerprint(config, dataset))
    plan_path = os.path.join(directory, "plan.json")
    volumetric = preprocess.uses_patches(config)
    if not volumetric and len(config.data.target_spacing):
        logging.warning("config.data.target_spacing=%s is not used: 2D models with "
                        "data.in_plane='resize' resize slices to data.image_size",
                        tuple(config.data.target_spacing))
    damaged = fileio.manifest_problem(directory) if os.path.exists(directory) else None
    if damaged:
        logging.warning("%s: the preprocessing cache is damaged (%s): rebuilding it from "
                        "the data", directory, damaged)
    if damaged or not os.path.exists(directory):
        logging.info("Preprocessing %d training and %d validation cases into %s",
                     len(dataset.splits["train"]), len(dataset.splits["val"]), directory)
        spacing = target_spacing(config, dataset) if volumetric else None
        for key in (*dataset.splits["train"], *dataset.splits["val"]):  # headers only
            preprocess.check_case_memory(*dataset.refs[key], config, spacing)
        loaded: dict = {}  # cases already read for the CT statistics, used once more below
        plans = {"intensity": intensity_plans(dataset, loaded), "target_spacing": spacing}
        os.makedirs(cache_root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root, prefix=".tmp_")
        geometry: dict = {}  # per case: crop box, target spacing, separate axis
        try:
            if volumetric:
                _write_volumes(tmp, "train", dataset, plans, config, loaded, geometry)
            for split in ("val",) if volumetric else ("train", "val"):
                images, labels, case_idx, annotated = [], [], [], []
                for i, key in enumerate(dataset.splits[split]):
                    case = loaded.pop(key, None) or dataset.load(key)
                    geometry[key] = preprocess.case_geometry(case, plans, config)
                    if volumetric:
                        volume = preprocess.case_volume(case, plans, config)
                        imgs, labs = preprocess.network_tiles(*volume, config)
                    else:
                        imgs, labs = preprocess.case_samples(case, plans, config)
                    images.append(imgs)
                    labels.append(labs)
                    case_idx.append(np.full(len(imgs), i, np.int32))
                    annotated.append(np.repeat(dataset.annotated(key)[None], len(imgs), 0))
                labels = np.concatenate(labels)
                base = os.path.join(tmp, split)
                np.save(base + "_images.npy", np.concatenate(images))
                np.save(base + "_labels.npy", labels)
                np.save(base + "_case.npy", np.concatenate(case_idx))
                np.save(base + "_fg.npy", labels.reshape(len(labels), -1).max(axis=1) > 0)
                np.save(base + "_classes.npy", class_presence(labels, dataset.num_classes))
                if dataset.partial:
                    np.save(base + "_annotated.npy", np.concatenate(annotated))
            fileio.write_json_atomic(os.path.join(tmp, "plan.json"), plans)
            fileio.write_json_atomic(os.path.join(tmp, "geometry.json"), geometry)
            fileio.write_manifest(tmp)  # last: what the entry holds, checked on every use
            # Atomic: the cache folder is complete or absent. A sound one that another
            # process finished first is kept; a damaged one is replaced.
            fileio.publish_folder(tmp, directory, fileio.manifest_problem)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    plans = fileio.read_json(plan_path, "the cache's preprocessing plan",
                             f"delete the folder {directory}: it is rebuilt from the data")
    fileio.write_json_atomic(os.path.join(workdir, "preprocess.json"), plans)
    train = Volumes(directory, "train") if volumetric else Samples(directory, "train")
    return dataset, plans, {"train": train, "val": Samples(directory, "val")}


_MAX_FG_COORDS = 20_000  # labelled voxels kept per case (and class) for centred patches


def class_presence(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K) bool: which classes occur in each of N label maps."""
    flat = labels.reshape(len(labels), -1)
    return np.stack([(flat == c).any(axis=1) for c in range(num_classes)], axis=1)


def class_coordinates(label: np.ndarray) -> np.ndarray:
    """(M, ndim + 1) int32: voxel coordinates of each foreground class (at most
    ``_MAX_FG_COORDS`` per class, evenly thinned) and the class, sorted by class."""
    out = [np.zeros((0, label.ndim + 1), np.int32)]
    for c in np.unique(label):
        if c == 0:
            continue
        coords = np.argwhere(label == c).astype(np.int32)
        if len(coords) > _MAX_FG_COORDS:
            coords = coords[:: len(coords) // _MAX_FG_COORDS + 1]
        out.append(np.concatenate([coords, np.full((len(coords), 1), c, np.int32)], axis=1))
    return np.concatenate(out)


def _write_volumes(directory: str, split: str, dataset: Dataset, plans, config,
                   loaded: dict, geometry: dict) -> None:
    shapes, mins, annotated = [], [], []
    for i, key in enumerate(dataset.splits[split]):
        case = loaded.pop(key, None) or dataset.load(key)
        geometry[key] = preprocess.case_geometry(case, plans, config)
        image, label = preprocess.case_volume(case, plans, config)
        mins.append(float(image.min()))
        fg = np.argwhere(label > 0).astype(np.int32)
        if len(fg) > _MAX_FG_COORDS:
            fg = fg[:: len(fg) // _MAX_FG_COORDS + 1]
        base = os.path.join(directory, f"{split}_vol{i:05d}")
        np.save(base + "_image.npy", image)
        np.save(base + "_label.npy", label)
        np.save(base + "_fg.npy", fg)
        np.save(base + "_fgclass.npy", class_coordinates(label))
        shapes.append(list(label.shape))
        annotated.append([int(v) for v in np.flatnonzero(dataset.annotated(key))])
    meta = {"shapes": shapes, "mins": mins}
    if dataset.partial:
        meta["annotated"], meta["num_classes"] = annotated, dataset.num_classes
    fileio.write_json_atomic(os.path.join(directory, f"{split}_volumes.json"), meta)


class Volumes:
    """Preprocessed whole volumes of one split (3D models), memory-mapped from the cache."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        meta = fileio.read_json(os.path.join(directory, f"{split}_volumes.json"),
                                "the cache's volume list",
                                f"delete the folder {directory}: it is rebuilt from the data")
        self.shapes = [tuple(s) for s in meta["shapes"]]
        self.mins = meta["mins"]
        self.annotated = meta.get("annotated")  # per case, partial labels only
        self.num_classes = meta.get("num_classes", 0)
        self._cache: dict[int, tuple] = {}
        self._classes: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.shapes)

    def patches_per_pass(self, image_size: tuple[int, ...], slice_axis: int = 2) -> int:
        """How many ``image_size`` inputs hold as many voxels as the whole split (one
        'epoch'); a 2D input in a volume is one slice thick."""
        return max(1, int(sum(
            np.prod(s) / np.prod(preprocess.volume_patch(image_size, len(s), slice_axis))
            for s in self.shapes)))

    def case(self, i: int):
        """(image (*spatial, C), label (*spatial), foreground voxel coordinates)."""
        if i not in self._cache:
            base = os.path.join(self.directory, f"{self.split}_vol{i:05d}")
            self._cache[i] = (np.load(base + "_image.npy", mmap_mode="r"),
                              np.load(base + "_label.npy", mmap_mode="r"),
                              np.load(base + "_fg.npy"))
        return self._cache[i]

    def class_coordinates(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(coordinates (M, ndim), the classes present, where each class's rows start and
        end) of case ``i``'s foreground, sorted by class (per-class oversampling)."""
        if i not in self._classes:
            base = os.path.join(self.directory, f"{self.split}_vol{i:05d}")
            table = np.load(base + "_fgclass.npy")
            classes, starts = np.unique(table[:, -1], return_index=True)
            bounds = np.append(starts, len(table))
            self._classes[i] = (table[:, :-1], classes, bounds)
        return self._classes[i]

    def __getstate__(self):  # grain workers re-open the memmaps
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["split"])
