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
files are one case each (named by the file without its extension). A case that
cannot be read (corrupt file, wrong channel count, NaN voxels, ...) is reported
by name and skipped; the others are still written, and the run then fails with
a message listing the skipped files. Each output is written to a temporary file
and renamed, so an existing file is replaced whole or not at all.
"""

from __future__ import annotations

import os
import time

import jax
import nibabel as nib
import numpy as np
from absl import logging
from medseg_jax import fileio, inference, postprocess
from medseg_jax import state as state_lib
from medseg_jax.data import decathlon, nifti, preprocess

_NIFTI = (".nii.gz", ".nii")


def _strip(name: str) -> str | None:
    for ending in _NIFTI:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def find_inputs(path: str, num_channels: int) -> list[tuple[str, tuple[str, ...]]]:
    """[(case name, channel files)] of a NIfTI file or of a folder of them, sorted."""
    if os.path.isfile(path):
        stem = _strip(os.path.basename(path))
        if stem is None:
            raise ValueError(f"--input {path}: not a NIfTI file (.nii or .nii.gz)")
        match = decathlon.CHANNEL_RE.match(stem)
        return [(match["case"] if match and num_channels == 1 else stem, (path,))]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    groups: dict[str, dict[int, str]] = {}
    singles: dict[str, str] = {}
    for name in sorted(os.listdir(path)):
        stem = _strip(name)
        full = os.path.join(path, name)
        if stem is None or name.startswith(".") or not os.path.isfile(full):
            continue
        match = decathlon.CHANNEL_RE.match(stem)
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = full
        else:
            singles[stem] = full
    cases = [(stem, (file,)) for stem, file in singles.items()]
    for case, channels in groups.items():
        cases.append((case, tuple(channels[k] for k in sorted(channels))))
    if not cases:
        raise ValueError(f"--input {path}: the folder holds no .nii or .nii.gz file")
    return sorted(cases)


def _write_nifti(array: np.ndarray, reference: nib.Nifti1Image, path: str) -> None:
    """Writes ``array`` with the reference image's affine and header, atomically."""
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
    with fileio.atomic_path(path) as tmp:  # keeps the .nii.gz ending nibabel goes by
        nib.save(image, tmp)


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


def predict(config, workdir: str, input_path: str, output_dir: str, task: str | None = None,
            save_probabilities: bool = False) -> dict:
    """Predicts every case of ``input_path`` into ``output_dir``; returns a summary."""
    run = state_lib.restore_run(config, workdir)
    members = state_lib.restore_members(run)
    run = postprocess.resolved_run(run, choose_as_auto=False)
    config = run.config  # with the run's plan applied and its post-processing resolved
    info = _pick_task(run, task)
    inputs = find_inputs(input_path, len(info.modalities))
    writer = jax.process_index() == 0
    if writer:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"--output {output_dir}: cannot create the folder ({e})") from e
        if not os.access(output_dir, os.W_OK):
            raise PermissionError(f"--output {output_dir}: the folder is not writable")
    logging.info("Predicting %d case(s) from %s with the %s checkpoint (step %d) of %s%s%s",
                 len(inputs), input_path, run.which, run.step, workdir,
                 "".join(f", averaged with {m.workdir} (step {m.step})" for m in members),
                 " and flip TTA" if config.eval.tta else "")
    written, skipped, t0, t_predict = [], [], time.time(), 0.0
    for name, files in inputs:
        ref = decathlon.CaseRef(case_id=name, image_paths=files, label_path=None,
                                task=info.name)
        try:
            preprocess.check_case_memory(ref, info, config, run.plans.get("target_spacing"),
                                         run.dataset.num_classes)  # from the header
            case = nifti.load_case(ref, info)
        except (ValueError, FileNotFoundError, OSError) as e:
            logging.error("Skipped %s: %s", name, e)
            skipped.append(f"{name} ({e})")
            continue
        t1 = time.time()
        probs, _ = inference.ensemble_probs(case, [run, *members])
        labels = inference.label_map(probs, config)
        t_predict += time.time() - t1
        if writer:
            reference = nib.load(files[0])
            out = os.path.join(output_dir, f"{name}.nii.gz")
            _write_nifti(_original_grid(labels, case), reference, out)
            if save_probabilities:
                _write_nifti(_original_grid(probs.astype(np.float32), case), reference,
                             os.path.join(output_dir, f"{name}_probabilities.nii.gz"))
            written.append(out)
        logging.info("Wrote %s (%s, %.2f s)", f"{name}.nii.gz", "x".join(map(str, labels.shape)),
                     time.time() - t1)
    seconds = time.time() - t0
    n_pred = len(inputs) - len(skipped)
    summary = {"written": written, "skipped": skipped, "seconds": seconds,
               "postprocess": config.eval.postprocess,
               "ensemble": [m.workdir for m in members],
               "predict_seconds": t_predict,
               "cases_per_second": n_pred / t_predict if t_predict > 0 else float("nan")}
    logging.info("Predicted %d case(s) in %.1f s (%.2f cases/s, network and resampling only); "
                 "%d skipped", n_pred, seconds, summary["cases_per_second"], len(skipped))
    if skipped:
        raise ValueError(f"{len(skipped)} of {len(inputs)} input case(s) could not be read and "
                         f"were skipped (the others are written to {output_dir}): "
                         + "; ".join(skipped))
    return summary
