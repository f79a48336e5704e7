"""The careless or hostile user, through the command line: every case gives the exit
status and the one line (file or field named) that docs/troubleshooting.md lists, and
the user's inputs, labels and earlier outputs are byte-identical afterwards.

Tiny data and a tiny run trained once per module; each case works on copies of them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_run, snapshot, tiny_trained_run

ROOT = Path(__file__).resolve().parents[1]

# The tiny config of conftest.tiny_config as command-line overrides.
TINY_ARGS = {
    "data.synthetic_cases": 4, "data.synthetic_size": 16, "data.synthetic_depth": 4,
    "data.image_size": "(16,16)", "model.base_features": 4, "model.depth": 3,
    "train.batch_size": 8, "train.num_epochs": 1, "train.steps_per_epoch": 2,
    "train.log_every_steps": 1, "eval.batch_size": 8,
}


def cli(*args, overrides: dict | None = None, tiny: bool = True, timeout: float = 300,
        config: str = "configs/unet.py") -> subprocess.CompletedProcess:
    """``python -m medseg_jax.main --config=CONFIG ARGS`` with the tiny config's fields
    (``tiny``) and ``overrides`` as ``--config.a.b=v`` flags; one CPU device."""
    fields = {**(TINY_ARGS if tiny else {}),
              "train.compilation_cache_dir": os.environ["JAX_COMPILATION_CACHE_DIR"],
              **(overrides or {})}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, "-m", "medseg_jax.main", f"--config={ROOT / config}",
               *map(str, args), *(f"--config.{k}={v}" for k, v in fields.items())]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_line(result: subprocess.CompletedProcess, status: int = 1) -> str:
    """The one ``medseg_jax: error:`` line of a run that ended with ``status``; no
    traceback."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("medseg_jax: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One task of 4 cases and a workdir trained on it for one epoch (checkpoint: step 2)."""
    return tiny_trained_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the data and of the trained workdir (config.json pointing at the copy)."""
    return copy_run(*trained, tmp_path)


# --------------------------------------------------------------------------- #
# Predict writes only where it may
# --------------------------------------------------------------------------- #


def _predict(data, run, source, output, *flags):
    return cli(f"--workdir={run}", "--mode=predict", f"--input={source}", f"--output={output}",
               *flags, overrides={"data.root": str(data)})


def _inputs(data, folder, **names):
    """A folder of copies of the task's images: {new name: image index}."""
    folder.mkdir()
    images = sorted((data / "imagesTr").iterdir())
    for name, index in names.items():
        shutil.copy(images[index], folder / name.replace("__", "."))
    return folder


def test_predict_refuses_to_write_over_inputs_or_data(copy, tmp_path):
    data, run = copy
    other = _inputs(data, tmp_path / "in", x__nii__gz=0)
    before = snapshot(data, run, other)
    for source, output, expected in [
        (data / "imagesTr", data / "imagesTr", "is the input folder"),
        (other, data / "labelsTr", f"lies inside the data set folder {data}"),
        (other, data / "predictions", f"lies inside the data set folder {data}"),
    ]:
        line = error_line(_predict(data, run, source, output))
        assert line.startswith(f"medseg_jax: error: --output {output}: {expected}"), line
        assert line.endswith("give another --output, a folder of the predictions' own"), line
        assert snapshot(data, run, other) == before
    assert not (data / "predictions").exists()


def test_predict_refuses_a_folder_it_did_not_write(copy, tmp_path):
    data, run = copy
    source = _inputs(data, tmp_path / "in", x__nii__gz=0)
    output = tmp_path / "results"
    output.mkdir()
    (output / "x.nii.gz").write_bytes(b"the user's own segmentation")
    before = snapshot(data, run, source, output)
    line = error_line(_predict(data, run, source, output, "--overwrite"))
    assert line == (f"medseg_jax: error: --output {output}: the folder holds 1 file(s) "
                    "predict did not write (x.nii.gz); predict writes only into a new or "
                    "empty folder or one it wrote itself: give another --output")
    assert snapshot(data, run, source, output) == before


def test_predict_again_replaces_only_its_own_unchanged_files(copy, tmp_path):
    data, run = copy
    source = _inputs(data, tmp_path / "in", a__nii__gz=0, b__nii__gz=1)
    output = tmp_path / "pred"
    first = _predict(data, run, source, output)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(output)) == [".medseg_predict.json", "a.nii.gz", "b.nii.gz"]
    before = snapshot(data, run, source, output)
    line = error_line(_predict(data, run, source, output))
    assert line == (f"medseg_jax: error: --output {output}: would replace 2 file(s) an "
                    "earlier predict wrote (a.nii.gz, b.nii.gz); pass --overwrite to replace "
                    "them, or give another --output")
    assert snapshot(data, run, source, output) == before
    again = _predict(data, run, source, output, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    after = snapshot(data, run, source, output)
    manifest = str(output / ".medseg_predict.json")
    assert {k: v for k, v in after.items() if k != manifest} == \
        {k: v for k, v in before.items() if k != manifest}  # the same predictions
    with open(output / "b.nii.gz", "ab") as f:
        f.write(b"corrected by hand")
    before = snapshot(data, run, source, output)
    line = error_line(_predict(data, run, source, output, "--overwrite"))
    assert line.startswith(f"medseg_jax: error: {output / 'b.nii.gz'}: changed ("), line
    assert line.endswith("--overwrite replaces only predict's own files unchanged since: move "
                         "it away or give another --output"), line
    assert snapshot(data, run, source, output) == before


def test_predict_stops_on_clashing_case_names(copy, tmp_path):
    data, run = copy
    source = _inputs(data, tmp_path / "in", a__nii__gz=0, b__nii__gz=1, b_0000__nii__gz=2)
    shutil.copy(next((data / "imagesTr").iterdir()), source / "a.nii")  # gzip content: fine
    before = snapshot(data, run, source)
    line = error_line(_predict(data, run, source, tmp_path / "pred"))
    assert line == (f"medseg_jax: error: --input {source}: a.nii and a.nii.gz both give case "
                    "'a'; b.nii.gz and b_0000.nii.gz both give case 'b'; rename or move the "
                    "extra files (nnU-Net channel files CASE_0000, CASE_0001, ... form one "
                    "case CASE)")
    assert snapshot(data, run, source) == before and not (tmp_path / "pred").exists()


def test_predict_skips_bad_cases_and_writes_the_others(copy, tmp_path):
    """A 2D image among 3D ones and a float64 image of 1e300 (finite, but not as float32):
    each named and skipped, nothing written for them, the others written, exit 1."""
    import nibabel as nib
    import numpy as np

    data, run = copy
    source = _inputs(data, tmp_path / "in", a__nii__gz=0, c__nii__gz=1)
    image = nib.load(source / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, 0], image.affine),
             source / "b_flat.nii.gz")
    nib.save(nib.Nifti1Image(np.full(image.shape, 1e300), image.affine),
             source / "b_huge.nii.gz")
    output = tmp_path / "pred"
    before = snapshot(data, run, source)
    line = error_line(_predict(data, run, source, output, "--save_probabilities"))
    assert line.startswith(f"medseg_jax: error: 2 of 4 input case(s) were skipped and nothing "
                           f"was written for them (the others are written to {output}): "), line
    assert "b_flat (b_flat.nii.gz): a 2D image, but the run's task SynthMRI holds 3D" in line
    assert "b_huge (b_huge.nii.gz): " in line
    assert sorted(os.listdir(output)) == [".medseg_predict.json", "a.nii.gz",
                                          "a_probabilities.nii.gz", "c.nii.gz",
                                          "c_probabilities.nii.gz"]
    assert snapshot(data, run, source) == before


# --------------------------------------------------------------------------- #
# A run's record is the truth: resume and config numbers
# --------------------------------------------------------------------------- #


def _resume_refused(copy, overrides, shown):
    """A resume of the trained copy with ``overrides`` is refused in one line naming
    ``shown`` (old -> new); config.json, checkpoints and data stay byte-identical."""
    data, run = copy
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={run}", overrides={"data.root": data, **overrides}))
    assert line.startswith(f"medseg_jax: error: {run} holds a run with a different config ("), line
    assert f"; recorded in {run}/config.json); these change what it computes: " in line
    for text in shown:
        assert text in line, line
    assert f"use a new --workdir, or resume it with the recorded values " \
           f"(--config=configs/run.py:{run})" in line
    assert snapshot(data, run) == before


def test_resume_with_settings_that_change_the_result_is_refused(copy):
    _resume_refused(copy, {"train.batch_size": 4, "train.learning_rate": 0.5,
                           "train.ce_weight": 0.0, "seed": 5, "augment.p_flip": 0.0,
                           "train.num_epochs": 3},
                    ["(augment.p_flip: 0.5 -> 0.0; seed: 0 -> 5; train.batch_size: 8 -> 4; "
                     "train.ce_weight: 1.0 -> 0.0; train.learning_rate: 0.001 -> 0.5;"])


def test_resume_with_another_schedule_is_refused_before_the_checkpoint_is_read(copy):
    """(It used to fail on the checkpoint's structure after config.json was rewritten.)"""
    _resume_refused(copy, {"train.lr_schedule": "cosine"},
                    ["(train.lr_schedule: 'constant' -> 'cosine';"])


def test_resume_with_more_epochs_trains_on_and_records_the_change(copy):
    data, run = copy
    inputs, checkpoints = snapshot(data), sorted(os.listdir(run / "checkpoints"))
    result = cli(f"--workdir={run}", overrides={"data.root": data, "train.num_epochs": 2,
                                                "eval.figures": False})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config.train.num_epochs changed from 1 to 2 at step 2" in result.stderr
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["train"]["num_epochs"] == 2
    assert recorded["changes"] == [
        {"step": 2, "field": "eval.figures", "old": True, "new": False},
        {"step": 2, "field": "train.num_epochs", "old": 1, "new": 2}]
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2]  # trained on
    assert "4" in os.listdir(run / "checkpoints") and checkpoints != sorted(
        os.listdir(run / "checkpoints"))
    assert snapshot(data) == inputs


def test_eval_names_a_schedule_that_restores_another_optimizer_state(copy):
    """Evaluation compares the network and its input, and the optimizer state it restores
    (it used to be a checkpoint structure mismatch naming no field)."""
    data, run = copy
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={run}", "--mode=eval",
                          overrides={"data.root": data, "train.lr_schedule": "cosine",
                                     "eval.tta": True}))
    assert f"{run} holds a run with a different config (train.lr_schedule: 'constant' -> " \
           f"'cosine'; recorded in {run}/config.json)" in line, line
    assert f"evaluate it with the recorded values (--config=configs/run.py:{run})" in line
    assert snapshot(data, run) == before


@pytest.mark.parametrize("field,value,message", [
    ("train.steps_per_epoch", -5, "config.train.steps_per_epoch: must be >= 0 (0: one pass), "
                                  "got -5"),
    ("train.learning_rate", -1, "config.train.learning_rate: must be > 0, got -1.0"),
    ("train.patience", -1, "config.train.patience: must be >= 0 (0: no early stopping), "
                           "got -1"),
    ("train.log_every_steps", 0, "config.train.log_every_steps: must be >= 1, got 0"),
    ("seed", -1, "config.seed: must be >= 0, got -1"),
])
def test_a_number_out_of_range_is_named_before_the_workdir_is_made(tmp_path, field, value,
                                                                   message):
    workdir = tmp_path / "run"
    line = error_line(cli(f"--workdir={workdir}", overrides={field: value}), 1)
    assert line == f"medseg_jax: error: {message}"
    assert not workdir.exists()


# --------------------------------------------------------------------------- #
# Data files: memory, finite values, headers, names and JSON
# --------------------------------------------------------------------------- #


def _split_case(run, split: str) -> str:
    """The first case (file stem) of ``split`` in the trained run's splits.json."""
    return json.loads((run / "splits.json").read_text())[split][0].split("/")[-1]


def _rescaled(path: Path, factor: float, data=None) -> None:
    """Rewrites the NIfTI ``path`` with its voxel size times ``factor`` (and ``data``)."""
    import nibabel as nib

    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[:3, :3] *= factor
    array = np.asanyarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(array, affine), str(path))


def test_case_memory_known_from_the_header(copy, tmp_path):
    """A validation case whose header says 1000 mm voxels: the 3D path would resample it
    to ~1e12 voxels; refused from its header before any case is read."""
    data, run = copy
    case = _split_case(run, "val")
    for folder in ("imagesTr", "labelsTr"):
        _rescaled(data / folder / f"{case}.nii.gz", 1000.0)
    before = snapshot(data, run)
    result = cli(f"--workdir={tmp_path / 'new'}", overrides={
        "data.root": data, "model.spatial_dims": 3, "data.image_size": "(16,16,4)"})
    line = error_line(result)
    assert line.startswith(f"medseg_jax: error: {data / 'imagesTr' / case}.nii.gz: case "
                           f"SynthMRI/{case} of shape 16x16x4 at ")
    assert " GiB allowed per case; check the header's voxel size, or raise " \
        "config.data.max_case_gib" in line and "resampled to " in line
    assert snapshot(data, run) == before


def test_header_declaring_more_than_the_file(copy, tmp_path):
    """A 91-byte .nii.gz declaring 1500^3 voxels: refused before its data is allocated."""
    from test_decathlon import _raw_nifti

    data, run = copy
    path = data / "imagesTr" / f"{_split_case(run, 'train')}.nii.gz"
    _raw_nifti(path, np.zeros(1, np.float32), shape=(1500, 1500, 1500))
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={tmp_path / 'new'}", overrides={"data.root": data}))
    assert line.startswith(f"medseg_jax: error: {path}: header declares shape "
                           "(1500, 1500, 1500) of float32 (12.6 GiB) but a ")
    assert snapshot(data, run) == before


def test_huge_intensities_predict_as_the_original(copy, tmp_path):
    """Intensities x 1e20 (float32) once normalised to all zeros and predicted all
    background, exit 0; float64 values beyond float32 became inf. The scaled case now
    gives the original's probabilities; the float64 one is skipped, named, exit 1."""
    import nibabel as nib

    data, run = copy
    case = data / "imagesTr" / f"{_split_case(run, 'test')}.nii.gz"
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(case, inputs / "orig.nii.gz")
    image = np.asanyarray(nib.load(str(case)).dataobj).astype(np.float32)
    affine = nib.load(str(case)).affine
    nib.save(nib.Nifti1Image(image * np.float32(1e20), affine), str(inputs / "scaled.nii.gz"))
    wide = image.astype(np.float64)
    wide.flat[0] = 1e39
    nib.save(nib.Nifti1Image(wide, affine), str(inputs / "wide.nii.gz"))
    before = snapshot(data, run, inputs)
    result = cli("--mode=predict", f"--workdir={run}", f"--input={inputs}", f"--output={out}",
                 "--save_probabilities", overrides={"data.root": data})
    line = error_line(result)
    assert line.startswith("medseg_jax: error: 1 of 3 input case(s) were skipped")
    assert f"wide (wide.nii.gz): {inputs / 'wide.nii.gz'}: intensities up to 1e+39 (float64) " \
        "exceed the float32 range" in line
    probs = [np.asanyarray(nib.load(str(out / f"{n}_probabilities.nii.gz")).dataobj)
             for n in ("orig", "scaled")]
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-4)
    assert not (out / "wide.nii.gz").exists()
    assert snapshot(data, run, inputs) == before


def test_nan_in_the_label_affine(copy, tmp_path):
    """NaN in a label's translation once passed the image/label grid check (check_data
    said OK)."""
    import nibabel as nib
    from test_decathlon import _raw_nifti

    data, run = copy
    label = data / "labelsTr" / f"{_split_case(run, 'train')}.nii.gz"
    img = nib.load(str(label))
    affine = img.affine.copy()
    affine[0, 3] = np.nan
    _raw_nifti(label, np.asanyarray(img.dataobj), affine)
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={tmp_path / 'new'}", overrides={"data.root": data}))
    assert line.startswith(f"medseg_jax: error: {label}: the header's affine (sform/qform) "
                           "holds NaN or inf: ")
    checked = subprocess.run([sys.executable, "-m", "medseg_jax.tools.check_data",
                              f"--root={data}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 1 and "FAILED" in checked.stdout
    assert f"{label}: the header's affine (sform/qform) holds NaN or inf" in checked.stdout
    assert snapshot(data, run) == before


def test_file_name_not_utf8(copy, tmp_path):
    """Such a case once trained, then evaluation failed writing *_per_case.csv."""
    data, run = copy
    stem = _split_case(run, "test")
    bad = os.fsdecode(f"{stem}_\xff".encode("latin-1")) + ".nii.gz"
    for folder in ("imagesTr", "labelsTr"):
        os.rename(data / folder / f"{stem}.nii.gz", data / folder / bad)
    meta = json.loads((data / "dataset.json").read_text())
    for entry in meta["training"]:
        for key in ("image", "label"):
            entry[key] = entry[key].replace(f"{stem}.nii.gz", bad)
    (data / "dataset.json").write_text(json.dumps(meta))
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={tmp_path / 'new'}", overrides={"data.root": data}))
    assert line.startswith("medseg_jax: error: b'") and f"/imagesTr/{stem}_\\xff.nii.gz': file " \
        "name is not valid UTF-8 text; rename it" in line
    assert snapshot(data, run) == before


DEEP = '{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("change, expected", [
    ({"file_ending": ""}, "field 'file_ending' must be a file name ending such as '.nii.gz', "
                          "got ''"),
    ({"labels": {"0": "background", "1": "lesion", "-0": "air"}},
     "field 'labels' key '-0' is not a non-negative integer"),
    (DEEP, "arrays or objects nested deeper than 100 levels"),
    (b'{"name": "caf\xe9"}', "not UTF-8 text (byte 13)"),
], ids=["empty-file-ending", "label-key-minus-zero", "nested", "not-utf8"])
def test_dataset_json_faults(copy, tmp_path, change, expected):
    """Each once gave a wrong result or a traceback (main and check_data)."""
    data, run = copy
    path = data / "dataset.json"
    if isinstance(change, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    elif isinstance(change, bytes):
        path.write_bytes(change)
    else:
        path.write_text(change)
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={tmp_path / 'new'}", overrides={"data.root": data}))
    assert line.startswith(f"medseg_jax: error: {path}: ") and expected in line
    if change is DEEP:
        checked = subprocess.run([sys.executable, "-m", "medseg_jax.tools.check_data",
                                  f"--root={data}"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120)
        assert checked.returncode == 1 and "Traceback" not in checked.stderr
        assert f"{path}: {expected}" in checked.stdout
    assert snapshot(data, run) == before


def test_fifo_as_splits_file_and_as_config_json(copy, tmp_path):
    """A FIFO once hung the run forever: it is refused, never opened for reading."""
    data, run = copy
    fifo = tmp_path / "splits.json"
    os.mkfifo(fifo)
    line = error_line(cli(f"--workdir={tmp_path / 'new'}", timeout=120,
                          overrides={"data.root": data, "data.splits_file": fifo}))
    assert line == f"medseg_jax: error: {fifo}: cannot read (config.data.splits_file): not a " \
        "regular file (a FIFO); fix the file"
    (run / "config.json").unlink()
    os.mkfifo(run / "config.json")
    before = snapshot(data, run)
    line = error_line(cli("--mode=eval", f"--workdir={run}", timeout=120,
                          overrides={"data.root": data}))
    assert line.startswith(f"medseg_jax: error: {run / 'config.json'}: cannot read (the run's "
                           "config): not a regular file (a FIFO)")
    assert snapshot(data, run) == before


# --------------------------------------------------------------------------- #
# The workdir: lock, durable records, disk full
# --------------------------------------------------------------------------- #


def _faulty_cli(fault: str, *args, overrides: dict | None = None):
    """``cli`` through tests/fault_runner.py with ``MEDSEG_DISK_FULL=fault``."""
    fields = {**TINY_ARGS, "train.compilation_cache_dir": os.environ["JAX_COMPILATION_CACHE_DIR"],
              **(overrides or {})}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(MEDSEG_DISK_FULL=fault, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "tests" / "fault_runner.py"),
               f"--config={ROOT / 'configs/unet.py'}", *map(str, args),
               *(f"--config.{k}={v}" for k, v in fields.items())]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _last_line(result) -> str:
    """The error line, checked to be the last thing the run printed."""
    line = error_line(result)
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr[-3000:]
    assert "never retrieved" not in result.stderr, result.stderr[-3000:]
    return line


def test_lock_file_deleted_a_second_run_is_still_refused(copy):
    from medseg_jax import workdir

    data, run = copy
    with workdir.lock(str(run)):  # the first run, alive
        os.unlink(run / ".lock")
        before = snapshot(data, run)
        result = cli(f"--workdir={run}", overrides={"data.root": data, "train.num_epochs": 2})
        line = error_line(result)
        assert line.startswith(f"medseg_jax: error: --workdir {run} is in use by another run")
        if os.path.exists("/proc/locks"):  # the holder named although its .lock is gone
            assert f"(pid {os.getpid()} on this host: its .lock was removed;" in line
        assert "wait for it to end or use another --workdir" in line
        assert snapshot(data, run) == before and not (run / ".lock").exists()


def test_disk_full_at_config_json_names_it_and_keeps_the_old_one(copy):
    data, run = copy
    before = snapshot(data, run)
    result = _faulty_cli("file:config.json", f"--workdir={run}",
                         overrides={"data.root": data, "train.num_epochs": 2})
    line = _last_line(result)
    assert line.startswith(f"medseg_jax: error: {run}/config.json: no space left on device; ")
    assert (f"the complete checkpoints are intact (steps [2] in {run}/checkpoints); free "
            "space and run the same command to resume from the latest") in line
    after = snapshot(data, run)  # (a new cache entry for the copied data aside)
    assert {k: after.get(k) for k in before} == before


def test_disk_full_at_the_start_of_a_new_run_names_the_file_and_leaves_nothing(trained,
                                                                                tmp_path):
    data, _ = trained
    before = snapshot(data)
    run = tmp_path / "new_run"
    line = _last_line(_faulty_cli("file:splits.json", f"--workdir={run}",
                                  overrides={"data.root": data}))
    assert line == (f"medseg_jax: error: {run}/splits.json: no space left on device; files "
                    "written before are intact; free space and run the same command")
    assert not run.exists() and snapshot(data) == before


@pytest.mark.parametrize("fault", ["checkpoint", "tensorstore"])
def test_disk_full_at_a_checkpoint_save_says_what_is_intact(copy, fault):
    """A full disk while saving step 4 (an OSError, or TensorStore's ValueError): one last
    line naming the checkpoint, the steps on disk and how to resume; earlier outputs
    unchanged; the same command resumes once there is space."""
    data, run = copy
    before = snapshot(data, run / "checkpoints" / "2")
    args = (f"--workdir={run}",)
    overrides = {"data.root": data, "train.num_epochs": 2}
    line = _last_line(_faulty_cli(f"{fault}:4", *args, overrides=overrides))
    assert line == (f"medseg_jax: error: {run}/checkpoints/4: no space left on device "
                    "(checkpoint save failed); files written before are intact; the "
                    f"complete checkpoints are intact (steps [2] in "
                    f"{run}/checkpoints); free space and run the same command to resume "
                    "from the latest")
    assert snapshot(data, run / "checkpoints" / "2") == before
    if fault == "checkpoint":
        result = cli(*args, overrides=overrides)  # space freed
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


def test_a_failed_start_leaves_no_workdir_behind(trained, tmp_path):
    data, _ = trained
    before = snapshot(data)
    kept = tmp_path / "kept"
    kept.mkdir()  # made by the user: stays
    for overrides, status, field in (
            ({"data.root": tmp_path / "no_data"}, 1, "config.data.root"),
            ({"data.root": data, "model.name": "unet3"}, 1, "config.model.name")):
        for folder in (tmp_path / "new", kept):
            line = error_line(cli(f"--workdir={folder}", overrides=overrides), status)
            assert line.startswith(f"medseg_jax: error: {field}: ")
        assert not (tmp_path / "new").exists()
        assert kept.is_dir()
    assert snapshot(data) == before


# --------------------------------------------------------------------------- #
# The command line: flags, overrides, usage errors
# --------------------------------------------------------------------------- #


def test_cli_a_mistyped_override_on_a_trained_run_is_one_line(copy):
    """A typo in a field: "did you mean", exit 2, before anything is read or written."""
    data, run = copy
    before = snapshot(data, run)
    result = cli(f"--workdir={run}", "--mode=eval",
                 overrides={"data.root": data, "eval.tta": True, "train.learnig_rate": 3e-4})
    assert error_line(result, 2) == (
        "medseg_jax: error: --config.train.learnig_rate: config.train has no field "
        "'learnig_rate'; did you mean 'learning_rate'?")
    assert snapshot(data, run) == before


def test_cli_predict_without_output_is_one_line_and_writes_nothing(copy, tmp_path):
    """No usage text: the whole of stderr is the one line."""
    data, run = copy
    before = snapshot(data, run)
    result = cli(f"--workdir={run}", "--mode=predict", f"--input={data / 'imagesTr'}",
                 overrides={"data.root": data})
    assert error_line(result, 2) == (
        "medseg_jax: error: --mode=predict needs --input=DIR_OR_FILE and --output=DIR")
    assert result.stderr.count("\n") == 1 and not result.stdout
    assert snapshot(data, run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]


def test_cli_a_tuple_override_given_twice_takes_the_last(tmp_path):
    """It was concatenated ((32, 32, 64, 64)); --show_config runs no JAX and no workdir."""
    command = [sys.executable, "-m", "medseg_jax.main", f"--config={ROOT / 'configs/unet.py'}",
               "--show_config", "--config.data.image_size=(32,32)",
               "--config.data.image_size=(64,64)"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [l for l in result.stdout.splitlines() if l.startswith("data.image_size =")]
    assert len(lines) == 1 and lines[0].split("#")[0].split("=", 1)[1].strip() == "(64, 64)", \
        lines
    assert list(tmp_path.iterdir()) == []


def test_cli_a_misspelled_field_in_a_config_file_is_refused(tmp_path):
    """A config file that sets a field the package does not define: one line, the closest
    name, exit 1, no workdir."""
    config = tmp_path / "typo.py"
    config.write_text("from medseg_jax.config import default_config\n\n\n"
                      "def get_config():\n    c = default_config()\n"
                      "    c.train.learnig_rate = 1e-4\n    return c\n")
    result = cli(f"--workdir={tmp_path / 'run'}", config=str(config), tiny=False)
    assert error_line(result, 1) == (
        "medseg_jax: error: config.train.learnig_rate: config.train has no field "
        "'learnig_rate'; did you mean 'learning_rate'?")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- #
# The moving average of the params (train.ema_decay)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("overrides,message", [
    ({"train.ema_decay": 1.0}, "config.train.ema_decay: must be in [0, 1) (0: off), got 1.0"),
    ({"train.evals": "dice,dice_raw"},
     "config.train.evals: 'dice_raw' scores the raw weights beside their average, but "
     "config.train.ema_decay is 0 (no average); set config.train.ema_decay (e.g. 0.999) or "
     "drop dice_raw"),
])
def test_ema_bad_settings_are_named_before_the_workdir_is_made(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    line = error_line(cli(f"--workdir={workdir}", overrides=overrides), 1)
    assert line == f"medseg_jax: error: {message}"
    assert not workdir.exists()


def test_ema_eval_of_a_run_trained_without_it_names_the_field(copy):
    """Its checkpoints hold no average: evaluating with one is refused, naming the field
    (not a checkpoint structure mismatch)."""
    data, run = copy
    before = snapshot(data, run)
    line = error_line(cli(f"--workdir={run}", "--mode=eval",
                          overrides={"data.root": data, "train.ema_decay": 0.999}))
    assert f"{run} holds a run with a different config (train.ema_decay: 0.0 -> 0.999; " \
           f"recorded in {run}/config.json)" in line, line
    assert f"evaluate it with the recorded values (--config=configs/run.py:{run})" in line
    assert snapshot(data, run) == before


# Letting the program choose (configs/auto.py)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("field, value, line", [
    ("choose.configurations", "2d,4d", "config.choose.configurations: unknown configuration "
     "'4d' in '2d,4d'; valid: 2d, 3d"),
    ("choose.budget_minutes", 0, "config.choose.budget_minutes: must be > 0, got 0.0"),
])
def test_cli_choose_refuses_a_bad_field_before_the_workdir_is_made(trained, tmp_path, field,
                                                                    value, line):
    data, _ = trained
    before = snapshot(data)
    result = cli(f"--workdir={tmp_path / 'run'}", config="configs/auto.py", tiny=False,
                 overrides={"data.root": data, field: value})
    assert error_line(result) == f"medseg_jax: error: {line}"
    assert not (tmp_path / "run").exists() and snapshot(data) == before


def test_cli_choose_eval_and_predict_before_training_say_to_train_first(trained, tmp_path):
    data, _ = trained
    (tmp_path / "run").mkdir()
    before = snapshot(data, tmp_path)
    for mode in ("eval", "predict"):
        result = cli(f"--workdir={tmp_path / 'run'}", f"--mode={mode}",
                     f"--input={data / 'imagesTr'}", f"--output={tmp_path / 'out'}",
                     config="configs/auto.py", tiny=False)
        assert error_line(result) == (
            f"medseg_jax: error: {tmp_path / 'run' / 'choice.json'}: not found (no "
            "configuration chosen yet); train first: the same command without --mode")
    assert snapshot(data, tmp_path) == before and not (tmp_path / "out").exists()
