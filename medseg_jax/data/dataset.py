"""The cases of a run: data folders, the case list and the train / val / test split.

``open_dataset(config, workdir)`` resolves the data (``config.data.root``, or the
embedded synthetic set written into the workdir when it is empty), checks that the
tasks share one label set, and fixes the split by case: ``splits.json`` in the workdir,
made once from the seed (or taken from ``data.splits_file``) and reused by every later
run and by evaluation.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from medseg_jax import fileio
from medseg_jax.data import decathlon, nifti, synthetic


SPLITS = ("train", "val", "test")


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
    num_channels: int  # the network's input channels: modalities x (2 context_slices + 1)

    def load(self, case_key: str) -> nifti.Case:
        ref, info = self.refs[case_key]
        return nifti.load_case(ref, info)

    @property
    def partial(self) -> bool:
        """Partial labels: some case lacks the annotation of some class."""
        return any(info.partial for info in self.infos)

    def annotated(self, case_key: str) -> np.ndarray:
        """(num_classes,) bool: the classes annotated in the case (background always)."""
        ref, _ = self.refs[case_key]
        out = np.ones(self.num_classes, bool)
        if ref.annotated is not None:
            out[1:] = False
            out[list(ref.annotated)] = True
        return out


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
                   num_classes=len(values), num_channels=len(first.modalities)
                   * (2 * int(config.data.context_slices) + 1))


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
        if os.path.isdir(os.path.join(workdir, "checkpoints")):  # a run's split, lost
            logging.warning("%s: missing (the run's case split): made again from config.seed "
                            "and config.data.split_fractions (the same split while the data "
                            "are unchanged)", path)
        fileio.write_json_atomic(path, splits)
        return splits
    recover = ("delete it: the next training run makes it again from config.seed and "
               "config.data.split_fractions (the same split while the data are unchanged), "
               "or restore it from a copy" if source == path else "fix the file")
    what = "the run's case split" if source == path else "config.data.splits_file"
    splits = fileio.read_json(source, what, recover)
    splits = _check_splits(splits, refs, source)
    if source != path:
        fileio.write_json_atomic(path, splits)
    return splits
