"""Prediction: NIfTI images in, NIfTI label maps out, in the input's exact geometry.

``python -m medseg_jax.main --config=... --workdir=RUN --mode=predict --input=DIR_OR_FILE
--output=DIR`` restores the run's best checkpoint (``eval.checkpoint``) and writes,
for every input case, ``<case>.nii.gz``: a uint8 label map with the label values
of the run's ``dataset.json``, the input's shape, affine and header (orientation
codes included). With ``--save_probabilities`` it also writes
``<case>_probabilities.nii.gz``, float32 softmax with the classes on the last axis.
With ``eval.ensemble`` the probabilities are the mean of the run's and those runs'.

Inputs: a NIfTI file, or a folder of them. In a folder, nnU-Net channel files
``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... form one case ``CASE``; other
files are one case each (named by the file without its extension). The case names
of the whole folder are found first: two files giving one name (``b.nii.gz`` and
``b_0000.nii.gz``; ``a.nii`` and ``a.nii.gz``), or two cases writing one output file,
stop the command before anything is written, naming both files. Other files
(not ``.nii``/``.nii.gz``, hidden, folders) are listed in the log and ignored.

Every case ends predicted or skipped with its reason: a file that cannot be read
(corrupt, wrong channel count, NaN voxels, ...), an image whose dimensionality is not
that of the run's task (a 2D image for a task of 3D images), a case the network
cannot take, or probabilities that are not finite. A skipped case writes nothing;
the others are still written, and the command then fails (exit 1) with one line
listing the skipped files.

The output folder (owned here): predict writes only where it may.
  * Refused: the input folder (or the input file's folder) or a folder inside it; a
    folder that holds ``imagesTr``, ``labelsTr`` or ``dataset.json``, or lies inside
    one (after resolving symlinks); a data root of the run (``data.root``, the
    flag config's and the run's ``config.json``'s) or a folder inside it; the run's
    workdir (or an ensemble member's) itself or a folder inside its ``checkpoints/``.
    Another folder inside the workdir (``RUN/predictions``) is allowed.
  * Predict records what it wrote in ``.medseg_predict.json`` in the output folder
    (every file's size and SHA-256, the case, its input files, the run, checkpoint
    step and time), rewritten atomically after each case.
  * An existing folder is accepted only when everything in it is listed in that
    manifest (predict's own temporary ``.tmp_*`` files aside): a non-empty folder
    without a manifest, or with any file or folder the manifest does not list (a
    file the user added), is refused, naming the entries, with or without
    ``--overwrite`` (conservative: predict shares no folder with other files).
  * A file of the folder that a prediction would write is never replaced without
    ``--overwrite``; with it, only when its size and SHA-256 are still those the
    manifest records (a file the user changed is refused, named). Listed files the
    run does not write are left as they are.
  * Each output is written to a temporary file and renamed (a case's label map and
    probabilities together), so an existing file is replaced whole or not at all. A
    kill between a case's rename and the manifest's update leaves that case's files
    unlisted: the next predict into the folder names them (remove them, or use a new
    folder).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import time

import jax
import nibabel as nib
import numpy as np
from absl import logging
from medseg_jax import fileio, inference, postprocess
from medseg_jax import state as state_lib
from medseg_jax.data import decathlon, nifti, preprocess

_NIFTI = (".nii.gz", ".nii")
MANIFEST = ".medseg_predict.json"
GENERATOR = "medseg_jax predict"
_TEMPORARY = re.compile(r"^\.tmp_\d+_")  # fileio.atomic_path's temporary files
_DATA_MARKERS = ("dataset.json", "imagesTr", "labelsTr")


def _strip(name: str) -> str | None:
    for ending in _NIFTI:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _names(files) -> str:
    names = [os.path.basename(f) for f in files]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def find_inputs(path: str, num_channels: int) -> list[tuple[str, tuple[str, ...]]]:
    """[(case name, channel files)] of a NIfTI file or of a folder of them, sorted.
    Raises ValueError naming the files when two of a folder's files give one case name
    (or one channel of a case twice)."""
    if os.path.isfile(path):
        stem = _strip(os.path.basename(path))
        if stem is None:
            raise ValueError(f"--input {path}: not a NIfTI file (.nii or .nii.gz)")
        match = decathlon.CHANNEL_RE.match(stem)
        return [(match["case"] if match and num_channels == 1 else stem, (path,))]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    groups: dict[str, dict[int, list[str]]] = {}
    singles: dict[str, list[str]] = {}
    for name in sorted(os.listdir(path)):
        stem = _strip(name)
        full = os.path.join(path, name)
        if stem is None or name.startswith(".") or not os.path.isfile(full):
            continue
        match = decathlon.CHANNEL_RE.match(stem)
        if match:
            groups.setdefault(match["case"], {}).setdefault(int(match["channel"]), []).append(full)
        else:
            singles.setdefault(stem, []).append(full)
    clashes = []
    for case in sorted(set(singles) | set(groups)):
        files = list(singles.get(case, []))
        files += [f for channel in sorted(groups.get(case, {})) for f in groups[case][channel]]
        repeated = [fs for fs in groups.get(case, {}).values() if len(fs) > 1]
        if len(singles.get(case, [])) > 1 or (case in singles and case in groups) or repeated:
            clashes.append(f"{_names(files)} {'both' if len(files) == 2 else 'all'} give "
                           f"case '{case}'")
    if clashes:
        raise ValueError(f"--input {path}: " + "; ".join(clashes) + "; rename or move the "
                         "extra files (nnU-Net channel files CASE_0000, CASE_0001, ... form "
                         "one case CASE)")
    cases = [(stem, (files[0],)) for stem, files in singles.items()]
    for case, channels in groups.items():
        cases.append((case, tuple(channels[k][0] for k in sorted(channels))))
    if not cases:
        raise ValueError(f"--input {path}: the folder holds no .nii or .nii.gz file")
    return sorted(cases)


def ignored_inputs(path: str) -> list[str]:
    """The entries of an input folder that are not read (not NIfTI, hidden, folders)."""
    if not os.path.isdir(path):
        return []
    return [name for name in sorted(os.listdir(path))
            if _strip(name) is None or name.startswith(".")
            or not os.path.isfile(os.path.join(path, name))]


def _inside(path: str, folder: str) -> bool:
    """Whether the resolved ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _run_data_roots(config, workdir: str) -> list[str]:
    """The data roots of the flag config and of the run's config.json (as recorded)."""
    roots = decathlon.split_roots(config.data.root)
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            recorded = json.load(f)
        roots += decathlon.split_roots(recorded["data"].get("root", ""))
        roots += decathlon.split_roots(recorded.get("paths", {}).get("data.root", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # restoring the run names a missing or damaged config.json
    return roots


def check_output_location(output_dir: str, input_path: str, config, workdir: str) -> None:
    """Raises ValueError when ``output_dir`` is, or lies inside, the input folder, a data
    set folder, a data root of the run, the run's workdir or its checkpoints (see the
    module docstring); symlinks are resolved first."""
    out = os.path.realpath(output_dir)
    source = os.path.realpath(input_path)
    source = source if os.path.isdir(source) else os.path.dirname(source)
    recover = "give another --output, a folder of the predictions' own"
    if _inside(out, source):
        where = ("is the input folder" if out == source
                 else f"lies inside the input folder {source}")
        raise ValueError(f"--output {output_dir}: {where} (inputs are never written over); "
                         f"{recover}")
    folder = out
    while True:
        held = [m for m in _DATA_MARKERS if os.path.exists(os.path.join(folder, m))]
        if held:
            where = "is" if folder == out else "lies inside"
            raise ValueError(f"--output {output_dir}: {where} the data set folder {folder} "
                             f"(it holds {', '.join(held)}; data are never written over); "
                             f"{recover}")
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for root in _run_data_roots(config, workdir):
        if _inside(out, os.path.realpath(root)):
            where = "is" if out == os.path.realpath(root) else "lies inside"
            raise ValueError(f"--output {output_dir}: {where} the run's data root {root} "
                             f"(config.data.root; data are never written over); {recover}")
    try:
        workdirs = [workdir, *state_lib.ensemble_paths(config, workdir)]
    except ValueError:
        workdirs = [workdir]  # restoring the run names the problem
    for run in workdirs:
        real = os.path.realpath(run)
        if out == real or _inside(out, os.path.join(real, "checkpoints")):
            what = (f"is the run's workdir {run}" if out == real
                    else f"lies inside the checkpoints of the run {run}")
            raise ValueError(f"--output {output_dir}: {what}; {recover} (a new folder inside "
                             f"the workdir, such as {run}/predictions, is fine)")


def _listing(names, most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class OutputFolder:
    """The output folder and its manifest (``MANIFEST``): what may be written there."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path, self.overwrite = path, overwrite
        self.manifest = os.path.join(path, MANIFEST)
        self.files: dict[str, dict] = {}  # the manifest's entries
        self.present: set[str] = set()  # the folder's entries when checked

    def check(self) -> None:
        """Raises ValueError when the folder exists and holds anything its manifest does
        not list (or the manifest is damaged); reads only."""
        if not os.path.lexists(self.path):
            return
        if not os.path.isdir(self.path):
            raise ValueError(f"--output {self.path}: exists and is not a folder; give a "
                             "folder (new, empty, or one predict wrote)")
        try:
            entries = [n for n in sorted(os.listdir(self.path))
                       if n != MANIFEST and not _TEMPORARY.match(n)]
        except OSError as e:
            raise ValueError(f"--output {self.path}: cannot list the folder ({e.strerror or e})"
                             "; give a readable folder") from None
        if os.path.lexists(self.manifest):
            self.files = self._read_manifest()
        elif entries:
            raise ValueError(
                f"--output {self.path}: the folder holds {len(entries)} file(s) predict did "
                f"not write ({_listing(entries)}); predict writes only into a new or empty "
                "folder or one it wrote itself: give another --output")
        foreign = [n for n in entries if n not in self.files
                   or os.path.islink(os.path.join(self.path, n))
                   or not os.path.isfile(os.path.join(self.path, n))]
        if foreign:
            raise ValueError(
                f"--output {self.path}: holds {len(foreign)} file(s) that predict did not "
                f"write (not in its {MANIFEST}): {_listing(foreign)}; predict shares no "
                "folder with other files: move them away or give another --output")
        self.present = set(entries)

    def _read_manifest(self) -> dict[str, dict]:
        recover = "give another --output (or move the folder's files away)"
        content = fileio.read_json(self.manifest, "predict's record of the files it wrote",
                                   recover)
        files = content.get("files")
        if content.get("generator") != GENERATOR or not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int)
                and isinstance(e.get("sha256"), str) and "/" not in n and n != MANIFEST
                for n, e in files.items()):
            raise ValueError(f"{self.manifest}: not a record written by predict (generator, "
                             f"files with size and sha256); {recover}")
        return files

    def changed(self, name: str) -> str | None:
        """How the listed file ``name`` differs from the manifest's record, or None."""
        path, entry = os.path.join(self.path, name), self.files[name]
        if os.path.islink(path) or not os.path.isfile(path):
            return "is no longer a plain file"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"changed ({size} bytes, {entry['size']} when predict wrote it)"
        if _sha256(path) != entry["sha256"]:
            return "changed (its SHA-256 is not the one predict recorded)"
        return None

    def may_replace(self, name: str) -> str | None:
        """None when the existing file ``name`` may be replaced; else why not."""
        if name not in self.files:
            return f"is not in {MANIFEST} (predict did not write it)"
        if not self.overwrite:
            return "was written by an earlier predict; pass --overwrite to replace it"
        problem = self.changed(name)
        return problem and (f"{problem}; --overwrite replaces only predict's own files "
                            "unchanged since: move it away or give another --output")

    def check_replacements(self, names: list[str]) -> None:
        """Raises ValueError when writing ``names`` would replace a file it may not."""
        present = [n for n in names if n in self.present]
        if present and not self.overwrite:
            raise ValueError(
                f"--output {self.path}: would replace {len(present)} file(s) an earlier "
                f"predict wrote ({_listing(present)}); pass --overwrite to replace them, or "
                "give another --output")
        for name in present:
            problem = self.may_replace(name)
            if problem:
                raise ValueError(f"{os.path.join(self.path, name)}: {problem}")

    def write_case(self, arrays: dict, record: dict) -> list[str]:
        """Writes a case's files (``{name: (array, reference image)}``) together (all
        renamed into place, or none), then records them in the manifest. Raises
        ValueError, writing nothing, when a file to replace may not be (it appeared or
        changed since the check)."""
        for name in arrays:
            path = os.path.join(self.path, name)
            problem = os.path.lexists(path) and self.may_replace(name)
            if problem:
                raise ValueError(f"{path}: {problem}")
        paths = [os.path.join(self.path, name) for name in arrays]
        with contextlib.ExitStack() as stack:
            for (array, reference), path in zip(arrays.values(), paths):
                _write_nifti(array, reference, stack.enter_context(fileio.atomic_path(path)))
        for name, path in zip(arrays, paths):
            self.files[name] = {"size": os.path.getsize(path), "sha256": _sha256(path),
                                **record}
        fileio.write_json_atomic(self.manifest, {"generator": GENERATOR, "version": 1,
                                                 "files": self.files})
        return paths


def finite_problem(probs: np.ndarray) -> str | None:
    """Why class probabilities cannot be written (NaN or infinite values), or None."""
    if np.isfinite(probs).all():
        return None
    nan = int(np.isnan(probs).sum())
    inf = int(probs.size - nan - np.isfinite(probs).sum())
    found = [f"NaN ({nan} of {probs.size} values)"] if nan else []
    found += [f"infinite values ({inf} of {probs.size})"] if inf else []
    return f"probabilities hold {' and '.join(found)}"


def _write_nifti(array: np.ndarray, reference: nib.Nifti1Image, path: str) -> None:
    """Writes ``array`` with the reference image's affine and header to ``path`` (a
    temporary file of ``fileio.atomic_path``: keeps the .nii.gz ending nibabel goes by)."""
    header = reference.header.copy()
    image = nib.Nifti1Image(array, reference.affine, header)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    sform, sform_code = reference.get_sform(coded=True)
    qform, qform_code = reference.get_qform(coded=True)
    if sform is not None:
        image.set_sform(sform, int(sform_code))
    if qform is not None:
        image.set_qform(qform, int(qform_code))
    nib.save(image, path)


def _original_grid(array: np.ndarray, case: nifti.Case) -> np.ndarray:
    """A case-grid array (optionally with a trailing class axis) in the file's voxel order."""
    if array.ndim == case.image.ndim - 1:
        return nifti.to_original_orientation(array, case)
    return np.stack([nifti.to_original_orientation(array[..., k], case)
                     for k in range(array.shape[-1])], axis=-1)


def _pick_task(run: state_lib.Run, task: str | None) -> decathlon.DatasetInfo:
    infos = {info.name: info for info in run.dataset.infos}
    if task is None:
        if len(infos) == 1:
            return next(iter(infos.values()))
        raise ValueError(f"--task: the run was trained on several tasks ({', '.join(infos)}); "
                         "name the one whose intensity normalisation the inputs need")
    if task not in infos:
        raise ValueError(f"--task: {task!r} is not a task of this run; valid: "
                         f"{', '.join(infos)}")
    return infos[task]


def output_names(inputs, save_probabilities: bool) -> list[str]:
    """The files the cases will write; raises ValueError naming the input files when two
    cases would write one file (``x`` and ``x_probabilities`` with probabilities)."""
    owner: dict[str, tuple[str, ...]] = {}
    for name, files in inputs:
        for out in [f"{name}.nii.gz"] + ([f"{name}_probabilities.nii.gz"]
                                         if save_probabilities else []):
            if out in owner:
                raise ValueError(f"--input: {_names(owner[out] + files)} would both be "
                                 f"written to {out}; rename one of them")
            owner[out] = files
    return list(owner)


def _dimension_problem(case: nifti.Case, info: decathlon.DatasetInfo, config) -> str | None:
    """Why the case's image does not fit the run (a 2D image for a task of 3D images)."""
    dims = case.image.ndim - 1
    expected = info.tensor_dims or (3 if config.model.spatial_dims == 3 else None)
    if expected is None or dims == expected:
        return None
    source = (f"the run's task {info.name} holds {expected}D images (dataset.json "
              "tensorImageSize)" if info.tensor_dims else "the run's model is 3D")
    return f"a {dims}D image, but {source}; predict it with a run trained on {dims}D images"


def _predict_case(name: str, files: tuple[str, ...], info: decathlon.DatasetInfo, runs,
                  config, save_probabilities: bool):
    """({output file: (array in the file's voxel order, reference image)}, None, network
    seconds) for a case, or (None, why it is skipped, seconds)."""
    ref = decathlon.CaseRef(case_id=name, image_paths=files, label_path=None, task=info.name)
    try:
        preprocess.check_case_memory(ref, info, config, runs[0].plans.get("target_spacing"),
                                     runs[0].dataset.num_classes)  # from the header
        case = nifti.load_case(ref, info)
        reference = nib.load(files[0])
    except (ValueError, OSError) as e:  # a file that cannot be read
        return None, str(e), 0.0
    problem = _dimension_problem(case, info, config)
    if problem:
        return None, problem, 0.0
    t0 = time.time()
    try:
        probs, _ = inference.ensemble_probs(case, runs)
    except (ValueError, ArithmeticError, IndexError) as e:  # a case the network cannot take
        return None, f"prediction failed: {e}", time.time() - t0
    problem = finite_problem(probs)  # the label map's source too
    if problem:
        return None, problem, time.time() - t0
    labels = inference.label_map(probs, config)
    seconds = time.time() - t0
    arrays = {f"{name}.nii.gz": (_original_grid(labels, case), reference)}
    if save_probabilities:
        arrays[f"{name}_probabilities.nii.gz"] = (
            _original_grid(probs.astype(np.float32), case), reference)
    return arrays, None, seconds


def predict(config, workdir: str, input_path: str, output_dir: str, task: str | None = None,
            save_probabilities: bool = False, overwrite: bool = False) -> dict:
    """Predicts every case of ``input_path`` into ``output_dir``; returns a summary.
    Raises ValueError (nothing written) for a refused output folder or clashing case
    names, and (after writing the others) when cases were skipped."""
    # Before the run is restored (and JAX starts): the inputs' names and the output folder.
    find_inputs(input_path, 1)
    check_output_location(output_dir, input_path, config, workdir)
    folder = OutputFolder(output_dir, overwrite)
    folder.check()
    run = state_lib.restore_run(config, workdir)
    members = state_lib.restore_members(run)
    run = postprocess.resolved_run(run, choose_as_auto=False)
    config = run.config  # with the run's plan applied and its post-processing resolved
    info = _pick_task(run, task)
    inputs = find_inputs(input_path, len(info.modalities))
    folder.check_replacements(output_names(inputs, save_probabilities))
    writer = jax.process_index() == 0
    if writer:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"--output {output_dir}: cannot create the folder ({e})") from e
        if not os.access(output_dir, os.W_OK):
            raise PermissionError(f"--output {output_dir}: the folder is not writable")
    ignored = ignored_inputs(input_path)
    if ignored:
        logging.info("Ignored in %s (not .nii/.nii.gz files): %s", input_path, _listing(ignored))
    n_files = sum(len(files) for _, files in inputs)
    logging.info("Predicting %d case(s) (%d file(s)) from %s with the %s checkpoint (step %d) "
                 "of %s%s%s", len(inputs), n_files, input_path, run.which, run.step, workdir,
                 "".join(f", averaged with {m.workdir} (step {m.step})" for m in members),
                 " and flip TTA" if config.eval.tta else "")
    written, skipped, t0, t_predict = [], [], time.time(), 0.0
    for name, files in inputs:
        who = f"{name} ({_names(files)})"
        t1 = time.time()
        arrays, problem, seconds = _predict_case(name, files, info, [run, *members], config,
                                                 save_probabilities)
        t_predict += seconds
        if writer and problem is None:
            record = {"case": name, "inputs": [os.path.abspath(f) for f in files],
                      "run": os.path.abspath(workdir), "checkpoint": run.which,
                      "step": int(run.step),
                      "written": datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds")}
            try:
                written.append(folder.write_case(arrays, record)[0])
            except ValueError as e:  # a file to replace changed meanwhile, a bad header
                problem = f"not written: {e}"
            except OSError as e:  # the output folder, not the case: stop
                raise OSError(f"--output {output_dir}: cannot write the files of {who} "
                              f"({e.strerror or e}); the cases before it are written") from e
        if problem is not None:
            logging.error("Skipped %s: %s", who, problem)
            skipped.append(f"{who}: {problem}")
            continue
        logging.info("Wrote %s (%s, %.2f s)", f"{name}.nii.gz",
                     "x".join(map(str, arrays[f"{name}.nii.gz"][0].shape)), time.time() - t1)
    seconds = time.time() - t0
    n_pred = len(inputs) - len(skipped)
    summary = {"written": written, "skipped": skipped, "seconds": seconds,
               "postprocess": config.eval.postprocess,
               "ensemble": [m.workdir for m in members],
               "predict_seconds": t_predict,
               "cases_per_second": n_pred / t_predict if t_predict > 0 else float("nan")}
    logging.info("Predicted %d of %d case(s) (%d input file(s)) in %.1f s (%.2f cases/s, "
                 "network and resampling only); %d skipped", n_pred, len(inputs), n_files,
                 seconds, summary["cases_per_second"], len(skipped))
    if skipped:
        raise ValueError(f"{len(skipped)} of {len(inputs)} input case(s) were skipped and "
                         f"nothing was written for them (the others are written to "
                         f"{output_dir}): " + "; ".join(skipped))
    return summary
