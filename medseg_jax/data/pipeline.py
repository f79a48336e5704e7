"""From raw Decathlon folders to batches: splits, preprocessing cache, grain loading.

`prepare(config, workdir)` resolves the data (the embedded synthetic set when
``config.data.root`` is empty), fixes the case split (``splits.json`` in the
workdir, reused by every later run and by evaluation), computes the intensity
plan on the training cases, and caches the preprocessed training and
validation samples as ``.npy`` files keyed by a fingerprint of the files and
the settings, so an epoch reads arrays and never decodes NIfTI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import grain
import numpy as np
from absl import logging

from medseg_jax.data import decathlon, preprocess, synthetic

SPLITS = ("train", "val", "test")
_CACHE_VERSION = 3


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside ``path`` (same name ending, so writers that pick the
    format from it still work) and renames it onto ``path`` when the block succeeds; on
    failure the temporary file is removed and ``path`` keeps its old content."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp_{os.getpid()}_", suffix=f"_{name}")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` through a temporary file and a rename: never half-written."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON through a temporary file and a rename: never half-written."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def data_roots(config, workdir: str) -> list[str]:
    """The task folders to read: config.data.root, or the synthetic set."""
    if config.data.root:
        roots = decathlon.split_roots(str(config.data.root))
        for r in roots:
            if not os.path.isdir(r):
                raise FileNotFoundError(f"config.data.root: {r} is not a directory")
        return roots
    target = os.path.join(workdir, "synthetic_data")
    roots = synthetic.make_synthetic(
        target, seed=config.data.synthetic_seed, num_cases=config.data.synthetic_cases,
        size=config.data.synthetic_size, depth=config.data.synthetic_depth)
    if config.model.spatial_dims == 3:  # the 2D ultrasound task has no volumes
        roots = [r for r in roots if not decathlon.read_dataset(r).is_2d]
    return roots


@dataclasses.dataclass
class Dataset:
    """Everything a run needs to know about its data."""

    infos: list[decathlon.DatasetInfo]
    refs: dict[str, tuple[decathlon.CaseRef, decathlon.DatasetInfo]]  # "Task/case" -> ref
    splits: dict[str, list[str]]
    labels: dict[int, str]
    num_classes: int
    num_channels: int

    def load(self, case_key: str) -> decathlon.Case:
        ref, info = self.refs[case_key]
        return decathlon.load_case(ref, info)


def case_key(ref: decathlon.CaseRef) -> str:
    return f"{ref.task}/{ref.case_id}"


def open_dataset(config, workdir: str) -> Dataset:
    infos = [decathlon.read_dataset(r) for r in data_roots(config, workdir)]
    first = infos[0]
    for info in infos[1:]:
        if info.labels != first.labels:
            raise ValueError(
                f"{info.root}/dataset.json: labels {info.labels} differ from "
                f"{first.root}/dataset.json: {first.labels}; tasks trained together "
                "must share one label set")
        if len(info.modalities) != len(first.modalities):
            raise ValueError(
                f"{info.root}/dataset.json: {len(info.modalities)} channels, but "
                f"{first.root} has {len(first.modalities)}")
    values = sorted(first.labels)
    if values != list(range(len(values))) or len(values) < 2:
        raise ValueError(
            f"{first.root}/dataset.json: label values must be 0..K-1 with K >= 2, "
            f"got {values}")
    refs = {}
    for info in infos:
        for ref in info.cases:
            key = case_key(ref)
            if key in refs:
                raise ValueError(f"case {key} appears twice ({info.root})")
            refs[key] = (ref, info)
    splits = resolve_splits(config, workdir, infos, refs)
    return Dataset(infos=infos, refs=refs, splits=splits, labels=dict(first.labels),
                   num_classes=len(values), num_channels=len(first.modalities))


def make_splits(infos, fractions, seed: int) -> dict[str, list[str]]:
    """Seeded split by case (never by slice), done per task so each is represented."""
    splits = {s: [] for s in SPLITS}
    for t, info in enumerate(infos):
        keys = sorted(case_key(r) for r in info.cases)
        order = np.random.default_rng([seed, t]).permutation(len(keys))
        keys = [keys[i] for i in order]
        n = len(keys)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:  # every split gets a case when there are enough
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        n_train = n - n_val - n_test
        splits["train"] += keys[:n_train]
        splits["val"] += keys[n_train:n_train + n_val]
        splits["test"] += keys[n_train + n_val:]
    return splits


def _check_splits(splits, refs, source: str) -> dict[str, list[str]]:
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise ValueError(f"{source}: must be a JSON object with keys {list(SPLITS)}")
    splits = {s: list(splits.get(s, [])) for s in SPLITS}
    seen = {}
    for s in SPLITS:
        for key in splits[s]:
            if key not in refs:
                raise ValueError(f"{source}: case {key!r} in split {s!r} is not in the data")
            if key in seen:
                raise ValueError(
                    f"{source}: case {key!r} is in both {seen[key]!r} and {s!r}")
            seen[key] = s
    for s in ("train", "val"):
        if not splits[s]:
            raise ValueError(f"{source}: split {s!r} has no cases")
    return splits


def resolve_splits(config, workdir, infos, refs) -> dict[str, list[str]]:
    path = os.path.join(workdir, "splits.json")
    if config.data.splits_file:
        source = config.data.splits_file
    elif os.path.exists(path):
        source = path
    else:
        splits = _check_splits(
            make_splits(infos, tuple(config.data.split_fractions), config.seed), refs,
            "config.data.split_fractions")
        write_json_atomic(path, splits)
        return splits
    try:
        with open(source) as f:
            splits = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{source}: cannot read splits: {e}") from e
    splits = _check_splits(splits, refs, source)
    if source != path:
        write_json_atomic(path, splits)
    return splits


# --------------------------------------------------------------------------
# Preprocessing, cached.


def _fingerprint(config, dataset: Dataset) -> str:
    files = []
    for s in ("train", "val"):
        for key in dataset.splits[s]:
            ref, _ = dataset.refs[key]
            for p in (*ref.image_paths, ref.label_path):
                st = os.stat(p)
                files.append((s, key, os.path.abspath(p), st.st_size, int(st.st_mtime_ns)))
    settings = {
        "version": _CACHE_VERSION,
        "image_size": list(config.data.image_size),
        "slice_axis": config.data.slice_axis,
        "spatial_dims": config.model.spatial_dims,
        "target_spacing": list(config.data.target_spacing),
        "in_plane": config.data.in_plane,
        "rescale_01": bool(config.data.rescale_01),
        "files": files,
    }
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


def normalized(case: decathlon.Case, plans, config) -> np.ndarray:
    """The case's image normalised as its task's plan says (+ optional [0, 1] rescale)."""
    image = preprocess.normalize(case.image, plans["intensity"][case.task])
    return preprocess.rescale_01(image) if config.data.rescale_01 else image


def uses_patches(config) -> bool:
    """Whether cases are resampled to a target spacing and cut into ``image_size``
    patches (3D models, and 2D models with ``data.in_plane='spacing'``) rather than
    resized slice by slice."""
    return config.model.spatial_dims == 3 or config.data.in_plane == "spacing"


def case_samples(case: decathlon.Case, plans, config):
    """2D models with ``data.in_plane='resize'``: the case's slices (or 2D image)
    resized to network size."""
    image = normalized(case, plans, config)
    return preprocess.to_samples(image, case.label, tuple(config.data.image_size),
                                 config.data.slice_axis)


def case_volume(case: decathlon.Case, plans, config):
    """Patch-based runs: the normalised case resampled to the target spacing (in plane
    only for 2D models), channels-last: (image (*spatial, C), label (*spatial))."""
    image = normalized(case, plans, config)
    target = preprocess.case_target_spacing(case.spacing, plans["target_spacing"],
                                            config.data.slice_axis)
    return preprocess.resample(image, case.label, case.spacing, target)


def network_tiles(volume: np.ndarray, label: np.ndarray, config):
    """Non-overlapping ``image_size`` inputs covering a resampled case (validation):
    (images (N, *image_size, C), labels (N, *image_size))."""
    size = tuple(config.data.image_size)
    patch = preprocess.volume_patch(size, label.ndim, config.data.slice_axis)
    imgs, labs = preprocess.tiles(volume, label, patch)
    return (imgs.reshape(len(imgs), *size, imgs.shape[-1]), labs.reshape(len(labs), *size))


def canonical_spacing(path: str) -> tuple[float, ...]:
    """Voxel size (mm) of a NIfTI file along the RAS axes, from its header only."""
    import nibabel as nib  # noqa: PLC0415

    img = nib.load(path)
    zooms = img.header.get_zooms()[:3]
    ornt = nib.io_orientation(img.affine)
    spacing = [0.0] * len(zooms)
    for axis, (target, _) in enumerate(ornt[: len(zooms)]):
        spacing[int(target)] = float(zooms[axis])
    return tuple(spacing)


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
    volumetric = uses_patches(config)
    if not volumetric and len(config.data.target_spacing):
        logging.warning("config.data.target_spacing=%s is not used: 2D models with "
                        "data.in_plane='resize' resize slices to data.image_size",
                        tuple(config.data.target_spacing))
    if not os.path.exists(plan_path):
        logging.info("Preprocessing %d training and %d validation cases into %s",
                     len(dataset.splits["train"]), len(dataset.splits["val"]), directory)
        loaded: dict = {}  # cases already read for the CT statistics, used once more below
        plans = {"intensity": intensity_plans(dataset, loaded),
                 "target_spacing": target_spacing(config, dataset) if volumetric else None}
        os.makedirs(cache_root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root, prefix=".tmp_")
        try:
            if volumetric:
                _write_volumes(tmp, "train", dataset, plans, config, loaded)
            for split in ("val",) if volumetric else ("train", "val"):
                images, labels, case_idx = [], [], []
                for i, key in enumerate(dataset.splits[split]):
                    case = loaded.pop(key, None) or dataset.load(key)
                    if volumetric:
                        imgs, labs = network_tiles(*case_volume(case, plans, config), config)
                    else:
                        imgs, labs = case_samples(case, plans, config)
                    images.append(imgs)
                    labels.append(labs)
                    case_idx.append(np.full(len(imgs), i, np.int32))
                labels = np.concatenate(labels)
                base = os.path.join(tmp, split)
                np.save(base + "_images.npy", np.concatenate(images))
                np.save(base + "_labels.npy", labels)
                np.save(base + "_case.npy", np.concatenate(case_idx))
                np.save(base + "_fg.npy", labels.reshape(len(labels), -1).max(axis=1) > 0)
            write_json_atomic(os.path.join(tmp, "plan.json"), plans)
            try:  # atomic: the cache folder is complete or absent
                os.replace(tmp, directory)
            except OSError:
                if not os.path.exists(plan_path):
                    raise
                shutil.rmtree(tmp)  # another process finished the same cache first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    with open(plan_path) as f:
        plans = json.load(f)
    write_json_atomic(os.path.join(workdir, "preprocess.json"), plans)
    train = Volumes(directory, "train") if volumetric else Samples(directory, "train")
    return dataset, plans, {"train": train, "val": Samples(directory, "val")}


_MAX_FG_COORDS = 20_000  # labelled voxels kept per case for foreground-centred patches


def _write_volumes(directory: str, split: str, dataset: Dataset, plans, config,
                   loaded: dict) -> None:
    shapes, mins = [], []
    for i, key in enumerate(dataset.splits[split]):
        image, label = case_volume(loaded.pop(key, None) or dataset.load(key), plans, config)
        mins.append(float(image.min()))
        fg = np.argwhere(label > 0).astype(np.int32)
        if len(fg) > _MAX_FG_COORDS:
            fg = fg[:: len(fg) // _MAX_FG_COORDS + 1]
        base = os.path.join(directory, f"{split}_vol{i:05d}")
        np.save(base + "_image.npy", image)
        np.save(base + "_label.npy", label)
        np.save(base + "_fg.npy", fg)
        shapes.append(list(label.shape))
    write_json_atomic(os.path.join(directory, f"{split}_volumes.json"),
                      {"shapes": shapes, "mins": mins})


class Volumes:
    """Preprocessed whole volumes of one split (3D models), memory-mapped from the cache."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        with open(os.path.join(directory, f"{split}_volumes.json")) as f:
            meta = json.load(f)
        self.shapes = [tuple(s) for s in meta["shapes"]]
        self.mins = meta["mins"]
        self._cache: dict[int, tuple] = {}

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

    def __getstate__(self):  # grain workers re-open the memmaps
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["split"])


def patch_records(volumes: Volumes, batch_size: int, steps: int, seed: int, epoch: int,
                  foreground_fraction: float) -> np.ndarray:
    """Patch draws of one epoch: (steps, batch, 3) of (case, centred-on-foreground, seed)."""
    rng = np.random.default_rng([seed, epoch, 3])
    n = len(volumes)
    reps = -(-steps * batch_size // n)
    cases = np.concatenate([rng.permutation(n) for _ in range(reps)])[: steps * batch_size]
    records = np.zeros((steps, batch_size, 3), np.int64)
    records[..., 0] = cases.reshape(steps, batch_size)
    records[:, : int(round(foreground_fraction * batch_size)), 1] = 1
    records[..., 2] = rng.integers(0, 2**31 - 1, size=(steps, batch_size))
    return records


class _Patch:
    """Picklable record -> random ``image_size`` input (centred on a labelled voxel when
    asked); from a volume, a 2D input is a patch of one slice along ``slice_axis``."""

    def __init__(self, volumes: Volumes, image_size: tuple[int, ...], slice_axis: int = 2):
        self.volumes, self.size, self.slice_axis = volumes, tuple(image_size), slice_axis

    def __call__(self, record) -> dict:
        image = np.empty((*self.size, self.volumes.case(int(record[0]))[0].shape[-1]), np.float32)
        label = np.empty(self.size, np.uint8)
        self.fill(record, image, label)
        return {"image": image, "label": label}

    def fill(self, record, image_out: np.ndarray, label_out: np.ndarray) -> None:
        """Writes the record's patch into ``image_out`` (*image_size, C) and ``label_out``;
        the part beyond the volume's end is padding (the volume's minimum, background)."""
        case, on_fg, seed = (int(x) for x in record)
        image, label, fg = self.volumes.case(case)
        rng = np.random.default_rng(seed)
        shape = label.shape
        patch = preprocess.volume_patch(self.size, len(shape), self.slice_axis)
        if on_fg and len(fg):
            centre = fg[rng.integers(len(fg))]
        else:
            centre = [rng.integers(n) for n in shape]
        start = [min(max(int(c) - p // 2, 0), max(n - p, 0))  # np.clip: 3x slower here
                 for c, p, n in zip(centre, patch, shape)]
        box = tuple(slice(s, s + p) for s, p in zip(start, patch))
        inside = tuple(slice(0, min(p, n - s)) for s, p, n in zip(start, patch, shape))
        img = image_out.reshape(*patch, image_out.shape[-1])  # views: (.., 1, ..) for 2D
        lab = label_out.reshape(patch)
        if any(b.stop < p for b, p in zip(inside, patch)):
            img[...] = self.volumes.mins[case]
            lab[...] = 0
        img[inside] = image[box]
        lab[inside] = label[box]


def patch_batches(volumes: Volumes, records: np.ndarray, image_size: tuple[int, ...],
                  process_index: int, process_count: int, num_workers: int = 0,
                  slice_axis: int = 2) -> Iterator[dict]:
    """This process's rows of each global batch of ``image_size`` patches."""
    steps, batch_size, _ = records.shape
    local = batch_size // process_count
    rows = records[:, process_index * local:(process_index + 1) * local].reshape(-1, 3)
    ds = grain.MapDataset.source(list(rows)).map(
        _Patch(volumes, image_size, slice_axis)).batch(
        local, drop_remainder=True)
    return _iterate(ds, num_workers)


class _StepBatch:
    """Picklable global step -> this process's rows of that step's batch (module level,
    for spawn).

    A step's batch is a function of (seed, epoch, step in the epoch) alone: each
    worker computes an epoch's order (``epoch_indices`` / ``patch_records``) on first
    use, so one grain pipeline, and one set of worker processes, serves a whole run.
    """

    def __init__(self, train: "Samples | Volumes", config, steps_per_epoch: int,
                 process_index: int, process_count: int):
        self.train, self.steps = train, steps_per_epoch
        self.batch = int(config.train.batch_size)
        self.seed = int(config.seed)
        self.fg = float(config.data.foreground_fraction)
        local = self.batch // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        if isinstance(train, Volumes):
            self.patch = _Patch(train, tuple(config.data.image_size), config.data.slice_axis)
        else:
            self.lookup = _BatchLookup(train)
        self._epoch, self._order = None, None

    def __call__(self, step) -> dict:
        epoch, i = divmod(int(step), self.steps)
        if epoch != self._epoch:
            make = patch_records if isinstance(self.train, Volumes) else epoch_indices
            self._order = make(self.train, self.batch, self.steps, self.seed, epoch, self.fg)
            self._epoch = epoch
        rows = self._order[i, self.rows]
        if not isinstance(self.train, Volumes):
            return self.lookup(rows)
        channels = self.train.case(int(rows[0][0]))[0].shape[-1]
        image = np.empty((len(rows), *self.patch.size, channels), np.float32)
        label = np.empty((len(rows), *self.patch.size), np.uint8)
        for j, record in enumerate(rows):
            self.patch.fill(record, image[j], label[j])
        return {"image": image, "label": label}

    def __getstate__(self):
        return dict(self.__dict__, _epoch=None, _order=None)


def run_batches(train: "Samples | Volumes", config, steps_per_epoch: int, first: int = 0,
                last: int | None = None):
    """The training batches of global steps ``first`` .. ``last`` - 1 (default: to the end
    of ``train.num_epochs``), across epochs, from one grain pipeline: with
    ``data.num_workers`` > 0 the worker processes start once per run, not per epoch.

    Resized slices, or patches of resampled cases. Returns grain's iterator; ``close()``
    it when stopping early (it stops the workers).
    """
    import jax  # noqa: PLC0415

    last = steps_per_epoch * config.train.num_epochs if last is None else last
    ds = grain.MapDataset.source(np.arange(first, last)).map(
        _StepBatch(train, config, steps_per_epoch, jax.process_index(), jax.process_count()))
    return _iterate(ds, config.data.num_workers)


def epoch_batches(train: "Samples | Volumes", config, epoch: int, steps: int,
                  start: int = 0):
    """The training batches of one epoch, from batch ``start`` on."""
    return run_batches(train, config, steps, epoch * steps + start, (epoch + 1) * steps)


# --------------------------------------------------------------------------
# Batches.


def epoch_indices(samples: Samples, batch_size: int, steps: int, seed: int, epoch: int,
                  foreground_fraction: float) -> np.ndarray:
    """Global sample order of one epoch: (steps, batch_size), a function of (seed, epoch).

    A pass over a fresh permutation, with the first ``round(fraction * batch)``
    entries of every batch replaced by samples that contain foreground.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(samples)
    reps = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(reps)])[: steps * batch_size]
    order = order.reshape(steps, batch_size)
    fg = np.flatnonzero(samples.foreground)
    k = int(round(foreground_fraction * batch_size))
    if k and fg.size:
        order[:, :k] = rng.choice(fg, size=(steps, k))
    return order


class _BatchLookup:
    """Picklable rows -> batch map for grain (module level, for spawn).

    One grain record is a whole batch, gathered with one fancy index on the
    memory-mapped arrays: per-sample records cost grain's per-record machinery
    16 times a batch (benchmarks/pipeline_throughput.py measured 3.2x more
    slices/s this way on Hippocampus).
    """

    def __init__(self, samples: Samples):
        self.samples = samples

    def __call__(self, rows) -> dict:
        rows = np.asarray(rows)
        return {"image": np.asarray(self.samples.images[rows]),
                "label": np.asarray(self.samples.labels[rows])}


def _iterate(ds, num_workers: int) -> Iterator[dict]:
    if num_workers > 0:
        return iter(ds.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers)))
    # Arrays already in memory: grain's read-ahead threads only contend for the GIL.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def train_batches(samples: Samples, order: np.ndarray, process_index: int,
                  process_count: int, num_workers: int = 0) -> Iterator[dict]:
    """This process's rows of each global batch in ``order`` (steps, batch)."""
    _, batch_size = order.shape
    local = batch_size // process_count
    rows = order[:, process_index * local:(process_index + 1) * local]
    ds = grain.MapDataset.source(list(rows)).map(_BatchLookup(samples))
    return _iterate(ds, num_workers)


def padded_batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Fixed-size batches over all samples, the last padded; ``mask`` marks real rows."""
    n = len(images)
    local = batch_size // process_count
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)[process_index * local:(process_index + 1) * local]
        real = idx < n
        idx = np.where(real, idx, 0)
        batch = {"image": np.asarray(images[idx]), "mask": real.astype(np.float32)}
        if labels is not None:
            batch["label"] = np.asarray(labels[idx])
        yield batch
