"""Training and evaluation batches: grain pipelines over the preprocessed cache.

A training batch is a function of (seed, epoch, step) alone: resized slices are
gathered from the memory-mapped cache by one index per batch, patches are cut from
the resampled cases (a share centred on foreground). One grain pipeline serves a
whole run (``run_batches``), so worker processes start once. ``padded_batches``
gives fixed-size evaluation batches with a mask for the padded rows.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from medseg_jax.data import preprocess
from medseg_jax.data.cache import Samples, Volumes


FOREGROUND, CLASS = 1, 2  # how a patch is centred on foreground (``data.oversample``)


def patch_records(volumes: Volumes, batch_size: int, steps: int, seed: int, epoch: int,
                  foreground_fraction: float, oversample: str = "foreground") -> np.ndarray:
    """Patch draws of one epoch: (steps, batch, 3) of (case, centring, seed); centring 0:
    anywhere, ``FOREGROUND``: on a labelled voxel, ``CLASS``: on a voxel of a class drawn
    among those the case holds (nnU-Net's oversampling)."""
    rng = np.random.default_rng([seed, epoch, 3])
    n = len(volumes)
    reps = -(-steps * batch_size // n)
    cases = np.concatenate([rng.permutation(n) for _ in range(reps)])[: steps * batch_size]
    records = np.zeros((steps, batch_size, 3), np.int64)
    records[..., 0] = cases.reshape(steps, batch_size)
    records[:, : int(round(foreground_fraction * batch_size)), 1] = (
        CLASS if oversample == "class" else FOREGROUND)
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
        if on_fg == CLASS and len(fg):
            coords, classes, bounds = self.volumes.class_coordinates(case)
            c = rng.integers(len(classes))
            centre = coords[bounds[c] + rng.integers(bounds[c + 1] - bounds[c])]
        elif on_fg and len(fg):
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
        self.oversample = str(config.data.oversample)
        local = self.batch // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self.num_classes = 0
        if isinstance(train, Volumes):
            self.patch = _Patch(train, tuple(config.data.image_size), config.data.slice_axis)
            self.num_classes = train.num_classes
        else:
            self.lookup = _BatchLookup(train)
        self._epoch, self._order = None, None

    def __call__(self, step) -> dict:
        epoch, i = divmod(int(step), self.steps)
        if epoch != self._epoch:
            make = patch_records if isinstance(self.train, Volumes) else epoch_indices
            self._order = make(self.train, self.batch, self.steps, self.seed, epoch, self.fg,
                               self.oversample)
            self._epoch = epoch
        rows = self._order[i, self.rows]
        if not isinstance(self.train, Volumes):
            return self.lookup(rows)
        channels = self.train.case(int(rows[0][0]))[0].shape[-1]
        image = np.empty((len(rows), *self.patch.size, channels), np.float32)
        label = np.empty((len(rows), *self.patch.size), np.uint8)
        for j, record in enumerate(rows):
            self.patch.fill(record, image[j], label[j])
        batch = {"image": image, "label": label}
        if self.train.annotated is not None:  # partial labels: classes annotated per row
            batch["annotated"] = annotated_rows(
                [self.train.annotated[int(r[0])] for r in rows], label.shape[0],
                int(self.num_classes))
        return batch

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


def epoch_indices(samples: Samples, batch_size: int, steps: int, seed: int, epoch: int,
                  foreground_fraction: float, oversample: str = "foreground") -> np.ndarray:
    """Global sample order of one epoch: (steps, batch_size), a function of (seed, epoch).

    A pass over a fresh permutation, with the first ``round(fraction * batch)``
    entries of every batch replaced by samples that contain foreground
    (``oversample="class"``: a class drawn uniformly among the foreground classes of
    the split, then a sample that holds it).
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(samples)
    reps = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(reps)])[: steps * batch_size]
    order = order.reshape(steps, batch_size)
    fg = np.flatnonzero(samples.foreground)
    k = int(round(foreground_fraction * batch_size))
    if k and fg.size and oversample == "class":
        present = [np.flatnonzero(samples.classes[:, c])
                   for c in range(1, samples.classes.shape[1])]
        present = [p for p in present if p.size]
        drawn = rng.integers(len(present), size=(steps, k))
        picks = np.empty((steps, k), np.int64)
        for c, rows in enumerate(present):
            where = drawn == c
            picks[where] = rng.choice(rows, size=int(where.sum()))
        order[:, :k] = picks
    elif k and fg.size:
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
        batch = {"image": np.asarray(self.samples.images[rows]),
                 "label": np.asarray(self.samples.labels[rows])}
        if self.samples.annotated is not None:  # partial labels
            batch["annotated"] = self.samples.annotated[rows].astype(np.float32)
        return batch


def annotated_rows(per_row: list, rows: int, num_classes: int) -> np.ndarray:
    """(rows, K) float32 1/0: the classes annotated in each row (lists of label values,
    background included)."""
    out = np.zeros((rows, num_classes), np.float32)
    for j, values in enumerate(per_row):
        out[j, list(values)] = 1.0
    return out


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
                   process_index: int = 0, process_count: int = 1,
                   annotated: np.ndarray | None = None,
                   indices: np.ndarray | None = None) -> Iterator[dict]:
    """Fixed-size batches over all samples (or over ``indices``, in their order), the last
    padded; ``mask`` marks real rows (``annotated``: (N, K) classes annotated per sample,
    for partial labels)."""
    order = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)
    n = len(order)
    local = batch_size // process_count
    for start in range(0, n, batch_size):
        rows = slice(process_index * local, (process_index + 1) * local)
        pos = np.arange(start, start + batch_size)[rows]
        real = pos < n
        idx = order[np.where(real, pos, 0)]
        batch = {"image": np.asarray(images[idx]), "mask": real.astype(np.float32)}
        if labels is not None:
            batch["label"] = np.asarray(labels[idx])
        if annotated is not None:
            batch["annotated"] = np.asarray(annotated[idx], np.float32)
        yield batch


def evenly_spaced(n: int, max_samples: int) -> np.ndarray | None:
    """Indices of at most ``max_samples`` of ``n`` samples, evenly spaced over the split
    (so over its cases, which are stored one after the other), in order; None (all of
    them) when ``max_samples`` is 0 or at least ``n``."""
    if max_samples <= 0 or max_samples >= n:
        return None
    return (np.arange(max_samples) * n) // max_samples
