"""Read Medical Segmentation Decathlon and nnU-Net raw data folders.

A data set folder holds ``dataset.json``, ``imagesTr/`` and ``labelsTr/``. Two
naming schemes are understood:

* Decathlon: ``imagesTr/x.nii.gz`` and ``labelsTr/x.nii.gz`` share one file
  name; a multi-channel image is one 4D file ``(X, Y, Z, C)``.
* nnU-Net: ``imagesTr/x_0000.nii.gz``, ``x_0001.nii.gz``, ... one file per
  channel, and ``labelsTr/x.nii.gz``.

``read_dataset`` lists the cases without reading any image (``data/nifti.py``
reads them). ``dataset.json`` is read with ``fileio.read_json`` (a regular file, size
and nesting bounded); its label keys must be distinct non-negative integers as
written, its ``file_ending`` a real ending; a file name that is not valid UTF-8 is
refused (case ids become CSV rows and JSON keys).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from medseg_jax import fileio

DATASET_JSON = "dataset.json"
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclasses.dataclass(frozen=True)
class CaseRef:
    """Where one case lives on disk."""

    case_id: str
    image_paths: tuple[str, ...]  # one per channel, or one 4D file
    label_path: str | None
    task: str
    # Partial labels: the foreground label values annotated in this case (an organ not
    # contoured is unknown, not absent); None: every declared label is annotated.
    annotated: tuple[int, ...] | None = None


@dataclasses.dataclass
class DatasetInfo:
    """The contents of ``dataset.json`` plus the list of training cases."""

    root: str
    name: str
    labels: dict[int, str]
    modalities: tuple[str, ...]
    tensor_dims: int | None
    cases: list[CaseRef]
    file_ending: str = ".nii.gz"

    @property
    def num_classes(self) -> int:
        """Number of output classes (largest label value + 1)."""
        return max(self.labels) + 1

    @property
    def is_2d(self) -> bool:
        return self.tensor_dims == 2

    @property
    def partial(self) -> bool:
        """Whether some case lacks the annotation of some declared label."""
        return any(c.annotated is not None for c in self.cases)


# --------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------


def _parse_labels(raw: Any, json_path: str) -> dict[int, str]:
    """Accept ``{"0": "background"}`` (Decathlon) or ``{"background": 0}`` (nnU-Net v2)."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{json_path}: field 'labels' must be a non-empty mapping, got {raw!r}")
    labels: dict[int, str] = {}
    if all(isinstance(k, str) and k.strip().lstrip("-+").isdigit() for k in raw):
        written: dict[int, str] = {}
        for key, name in raw.items():
            if not isinstance(name, str):
                raise ValueError(
                    f"{json_path}: field 'labels' entry {key!r} must name the class, got {name!r}"
                )
            if not key.strip().isdigit():
                raise ValueError(f"{json_path}: field 'labels' key {key!r} is not a "
                                 "non-negative integer; write label values as 0, 1, 2, ...")
            value = int(key)
            if value in written:  # "1" and "01": one value, two classes
                raise ValueError(
                    f"{json_path}: field 'labels' keys {written[value]!r} and {key!r} are "
                    f"the same label value {value} ({labels[value]!r} and {name!r}); give "
                    "each class its own value")
            written[value], labels[value] = key, name
    else:
        for name, value in raw.items():
            if isinstance(value, (list, tuple)):
                raise ValueError(
                    f"{json_path}: field 'labels' entry {name!r} is an nnU-Net region "
                    f"({value!r}); region-based labels are not supported"
                )
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"{json_path}: field 'labels' entry {name!r} must be an integer, got {value!r}"
                )
            if value in labels:
                raise ValueError(
                    f"{json_path}: field 'labels' gives value {value} to both "
                    f"{labels[value]!r} and {name!r}"
                )
            labels[value] = name
    bad = sorted(v for v in labels if not 0 <= v <= 255)
    if bad:
        raise ValueError(f"{json_path}: field 'labels' values must lie in 0..255, got {bad}")
    return dict(sorted(labels.items()))


def _parse_modalities(meta: dict[str, Any], json_path: str) -> tuple[str, ...]:
    for field in ("modality", "channel_names"):
        if field in meta:
            raw = meta[field]
            if not isinstance(raw, dict) or not raw:
                raise ValueError(f"{json_path}: field {field!r} must be a non-empty mapping")
            try:
                keys = sorted(raw, key=int)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{json_path}: field {field!r} keys must be channel numbers, got {list(raw)}"
                ) from None
            if [int(k) for k in keys] != list(range(len(keys))):
                raise ValueError(
                    f"{json_path}: field {field!r} channels must be numbered 0..{len(keys) - 1}, "
                    f"got {keys}"
                )
            return tuple(str(raw[k]) for k in keys)
    raise ValueError(
        f"{json_path}: missing field 'modality' (Decathlon) or 'channel_names' (nnU-Net)"
    )


def _parse_tensor_dims(meta: dict[str, Any], json_path: str) -> int | None:
    raw = meta.get("tensorImageSize")
    if raw is None:
        return None
    match = re.fullmatch(r"\s*([234])\s*[dD]\s*", str(raw))
    if not match:
        raise ValueError(
            f"{json_path}: field 'tensorImageSize' must be '2D', '3D' or '4D', got {raw!r}"
        )
    return int(match.group(1))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _resolve(root: str, rel: str) -> str:
    rel = rel[2:] if rel.startswith("./") else rel
    return os.path.normpath(os.path.join(root, rel))


def _strip_ending(name: str, file_ending: str) -> str | None:
    if name.endswith(file_ending) and len(name) > len(file_ending):
        return name[: -len(file_ending)]
    return None


def _channel_index(folder: str, file_ending: str) -> dict[str, dict[int, str]]:
    """nnU-Net channel files in ``folder``: case stem -> {channel: path}."""
    index: dict[str, dict[int, str]] = {}
    if not os.path.isdir(folder):
        return index
    for name in os.listdir(folder):
        stem = _strip_ending(name, file_ending)
        if stem:
            text_name(os.path.join(folder, name))
        match = CHANNEL_RE.match(stem) if stem and not _is_hidden(name) else None
        if match:
            channel = int(match.group("channel"))
            index.setdefault(match.group("case"), {})[channel] = os.path.join(folder, name)
    return index


def _cases_from_training_list(
    root: str,
    meta: dict[str, Any],
    json_path: str,
    task: str,
    modalities: tuple[str, ...],
    file_ending: str,
    labels: dict[int, str] | None = None,
) -> list[CaseRef]:
    """Cases from the Decathlon ``training`` list (nnU-Net v1 channel files accepted)."""
    entries = meta["training"]
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: field 'training' must be a list")
    cases = []
    seen: set[str] = set()
    indices: dict[str, dict[str, dict[int, str]]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(
                f"{json_path}: 'training' entry {i} must be a mapping with an 'image' path"
            )
        image = text_name(_resolve(root, str(entry["image"])))
        if _is_hidden(os.path.basename(image)):
            continue
        label = text_name(_resolve(root, str(entry["label"]))) if entry.get("label") else None
        if os.path.isfile(image):
            image_paths: tuple[str, ...] = (image,)
        else:
            folder, name = os.path.split(image)
            if folder not in indices:
                indices[folder] = _channel_index(folder, file_ending)
            found = indices[folder].get(_strip_ending(name, file_ending) or "", {})
            channels = [found[k] for k in sorted(found)]
            if not channels:
                what = f" (label {label})" if label else ""
                raise FileNotFoundError(
                    f"{json_path}: image {image} listed in 'training'{what} does not exist"
                )
            if len(channels) != len(modalities):
                raise ValueError(
                    f"{image}: found {len(channels)} channel files "
                    f"{[os.path.basename(c) for c in channels]} but dataset.json declares "
                    f"{len(modalities)} modalities {modalities}"
                )
            image_paths = tuple(channels)
        if label is not None and not os.path.isfile(label):
            raise FileNotFoundError(
                f"{json_path}: label {label} listed in 'training' does not exist"
            )
        name = os.path.basename(image)
        case_id = _strip_ending(name, file_ending) or name.split(".")[0]
        if case_id in seen:
            raise ValueError(f"{json_path}: case {case_id!r} is listed twice in 'training'")
        seen.add(case_id)
        cases.append(CaseRef(case_id, image_paths, label, task,
                             _annotated(entry, i, json_path, labels)))
    return cases


def _annotated(entry: dict, index: int, json_path: str,
               labels: dict[int, str] | None) -> tuple[int, ...] | None:
    """A training entry's ``annotated_labels`` (partial labels): the foreground label
    values annotated in that case; None when the entry has none (all annotated)."""
    raw = entry.get("annotated_labels")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in raw):
        raise ValueError(f"{json_path}: 'training' entry {index} ({entry.get('image')}): "
                         f"'annotated_labels' must be a list of label values, got {raw!r}")
    unknown = sorted(set(raw) - set(labels) - {0}) if labels else []
    if unknown:
        raise ValueError(f"{json_path}: 'training' entry {index} ({entry.get('image')}): "
                         f"'annotated_labels' {unknown} are not declared in 'labels' "
                         f"{sorted(labels)}")
    return tuple(sorted(set(raw) - {0}))


def list_folder(folder: str, file_ending: str) -> dict[str, str]:
    """{file stem: path} of the ``file_ending`` files in ``folder`` (hidden ones skipped)."""
    if not os.path.isdir(folder):
        return {}
    return {
        stem: os.path.join(folder, f)
        for f in sorted(os.listdir(folder))
        if not _is_hidden(f)
        and (stem := _strip_ending(f, file_ending)) is not None
        and text_name(os.path.join(folder, f))
    }


def group_channels(images: dict[str, str],
                   labels: dict[str, str]) -> tuple[dict[str, dict[int, str]], bool]:
    """Image files (stem -> path) grouped into cases: ``({case: {channel: path}}, nnunet)``.

    nnU-Net naming (every image is ``CASE_XXXX`` and no label shares an image's name)
    groups the channel files of a case; otherwise every file is one single-channel case.
    """
    nnunet = (bool(images) and all(CHANNEL_RE.match(s) for s in images)
              and not set(images) & set(labels))
    grouped: dict[str, dict[int, str]] = {}
    for stem, path in images.items():
        match = CHANNEL_RE.match(stem) if nnunet else None
        if match:
            grouped.setdefault(match.group("case"), {})[int(match.group("channel"))] = path
        else:
            grouped[stem] = {0: path}
    return grouped, nnunet


def _cases_from_folders(
    root: str, task: str, modalities: tuple[str, ...], file_ending: str
) -> list[CaseRef]:
    """Cases found by scanning ``imagesTr``/``labelsTr`` (nnU-Net or Decathlon naming)."""
    images_dir = os.path.join(root, "imagesTr")
    labels_dir = os.path.join(root, "labelsTr")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(
            f"{images_dir}: no 'training' list in dataset.json and no imagesTr folder"
        )

    images = list_folder(images_dir, file_ending)
    labels = list_folder(labels_dir, file_ending)
    grouped, nnunet = group_channels(images, labels)
    for stem, path in labels.items():
        if stem not in grouped:
            expected = f"{stem}{'_0000' if nnunet else ''}{file_ending}"
            raise ValueError(f"{path}: label without image (no {expected} in {images_dir})")
    cases = []
    for case_id, channels in sorted(grouped.items()):
        if nnunet and sorted(channels) != list(range(len(modalities))):
            raise ValueError(
                f"{channels[min(channels)]}: case {case_id!r} has channel files "
                f"{sorted(os.path.basename(p) for p in channels.values())} but dataset.json "
                f"declares {len(modalities)} modalities {modalities}"
            )
        label = labels.get(case_id)
        if label is None and os.path.isdir(labels_dir):
            raise FileNotFoundError(
                f"{channels[min(channels)]}: no label {case_id}{file_ending} in {labels_dir}"
            )
        cases.append(CaseRef(case_id, tuple(channels[k] for k in sorted(channels)), label, task))
    return cases


def split_roots(roots: list[str] | str) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (the ``config.data.root`` convention)."""
    if isinstance(roots, str):
        roots = [roots]
    return [r.strip() for item in roots for r in str(item).split(",") if r.strip()]


def read_header(root: str) -> tuple[dict[str, Any], DatasetInfo]:
    """Parse ``root/dataset.json`` without listing cases: (raw JSON, info with no cases)."""
    root = os.path.abspath(os.path.expanduser(root))
    json_path = os.path.join(root, DATASET_JSON)
    if not os.path.exists(json_path):
        raise FileNotFoundError(
            f"{json_path}: missing dataset.json (is {root} a Decathlon/nnU-Net data folder?)"
        )
    meta = fileio.read_json(json_path, "the data set's description")
    if "labels" not in meta:
        raise ValueError(f"{json_path}: missing field 'labels'")
    info = DatasetInfo(
        root=root,
        name=str(meta.get("name") or os.path.basename(root)),
        labels=_parse_labels(meta["labels"], json_path),
        modalities=_parse_modalities(meta, json_path),
        tensor_dims=_parse_tensor_dims(meta, json_path),
        cases=[],
        file_ending=_parse_file_ending(meta, json_path),
    )
    return meta, info


def _parse_file_ending(meta: dict[str, Any], json_path: str) -> str:
    """``file_ending``: the ending every image file has (".nii.gz", ".nii"), which is
    cut off to give the case id; an empty one would make every case id ""."""
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or len(ending) < 2 or not ending.startswith(".") \
            or "/" in ending:
        raise ValueError(f"{json_path}: field 'file_ending' must be a file name ending such "
                         f"as '.nii.gz', got {ending!r}")
    return ending


def text_name(path: str) -> str:
    """``path`` itself when it is valid text; a file name that is not valid UTF-8 (its
    undecodable bytes become surrogates in Python) is refused, since case ids become
    CSV rows, JSON keys and file names of results: a ValueError naming it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{os.fsencode(path)!r}: file name is not valid UTF-8 text; rename "
                         "it (case ids are written to CSV and JSON results)") from None
    return path


def read_dataset(root: str) -> DatasetInfo:
    """Read ``root/dataset.json`` and list the training cases (no image is read)."""
    meta, info = read_header(root)
    json_path = os.path.join(info.root, DATASET_JSON)
    if meta.get("training"):
        info.cases = _cases_from_training_list(info.root, meta, json_path, info.name,
                                               info.modalities, info.file_ending, info.labels)
    else:
        info.cases = _cases_from_folders(info.root, info.name, info.modalities,
                                         info.file_ending)
    if not info.cases:
        raise ValueError(
            f"{json_path}: no cases found ('training' list empty, nothing in {info.root}/imagesTr)"
        )
    return info
