"""Bad input and bad config against a workdir that already holds a run: each gives a
one-line error naming the file, case or field and the fault, and nothing already
written changes. docs/troubleshooting.md lists these messages."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import copy_run, snapshot, tiny_config, tiny_trained_run
from medseg_jax import evaluate, main, train

ROOT = Path(__file__).resolve().parents[1]


def _config(data_root, **overrides):
    return tiny_config(**{"data.root": str(data_root), "train.num_epochs": 1, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One task of 4 cases and a workdir trained on it for one epoch (checkpoint: step 2)."""
    return tiny_trained_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the data and of the trained workdir (config.json pointing at the copy)."""
    return copy_run(*trained, tmp_path)


def _train_case(run):
    key = json.loads((run / "splits.json").read_text())["train"][0]
    return key.split("/")[1]


def _edit_label(path, change):
    img = nib.load(path)
    data, affine = change(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _truncate(data, run):
    path = data / "imagesTr" / f"{_train_case(run)}.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return {}, [str(path), "cannot read NIfTI data"]


def _garbage(data, run):
    path = data / "imagesTr" / f"{_train_case(run)}.nii.gz"
    path.write_bytes(b"not a NIfTI file" * 10)
    return {}, [str(path), "cannot read NIfTI header"]


def _shape(data, run):
    path = data / "labelsTr" / f"{_train_case(run)}.nii.gz"
    _edit_label(path, lambda d, a: (d[:-1], a))
    return {}, [f"{data}/imagesTr/{_train_case(run)}.nii.gz", str(path),
                "spatial shapes differ"]


def _affine(data, run):
    path = data / "labelsTr" / f"{_train_case(run)}.nii.gz"

    def shift(d, a):
        a[0, 3] += 5.0
        return d, a

    _edit_label(path, shift)
    return {}, [str(path), "affines differ by 5"]


def _undeclared(data, run):
    path = data / "labelsTr" / f"{_train_case(run)}.nii.gz"

    def add_seven(d, a):
        d.flat[0] = 7
        return d, a

    _edit_label(path, add_seven)
    return {}, [str(path), "label values [7] are not declared in dataset.json 'labels' [0, 1]"]


def _nan(data, run):
    path = data / "imagesTr" / f"{_train_case(run)}.nii.gz"
    img = nib.load(path)
    image = np.asarray(img.dataobj, np.float32).copy()
    image.flat[:3] = np.nan
    nib.save(nib.Nifti1Image(image, img.affine), path)
    return {}, [str(path), "image holds 3 non-finite (NaN/inf) voxels"]


def _empty(data, run):
    for folder in ("imagesTr", "labelsTr"):
        for f in (data / folder).iterdir():
            f.unlink()
    meta = json.loads((data / "dataset.json").read_text())
    meta["training"], meta["numTraining"] = [], 0
    (data / "dataset.json").write_text(json.dumps(meta))
    return {}, [f"{data}/dataset.json", "no cases found"]


def _empty_split(data, run):
    splits = json.loads((run / "splits.json").read_text())
    splits["train"] += splits["val"]
    splits["val"] = []
    (run / "splits.json").write_text(json.dumps(splits))
    return {}, [f"{run}/splits.json", "split 'val' has no cases"]


def _batch(data, run):
    return {"train.batch_size": 12}, ["config.train.batch_size=12",
                                      "not divisible by the 8 devices"]


def _model(data, run):
    return {"model.name": "resnet"}, ["config.model.name", "unknown model 'resnet'",
                                      "valid models: attention_unet, fcn, resenc_unet, unet"]


def _other_run(data, run):
    return {"model.base_features": 8, "data.image_size": (32, 32)}, [
        str(run), "holds a run with a different config",
        "model.base_features: 4 -> 8", "data.image_size: [16, 16] -> [32, 32]"]


def _in_plane(data, run):
    return {"data.in_plane": "crop"}, ["config.data.in_plane", "'crop' is not one of resize, spacing"]


def _overlap(data, run):
    return {"eval.sw_overlap": 1.0}, ["config.eval.sw_overlap", "must be in [0, 1), got 1.0"]


def _window(data, run):
    return {"eval.sw_window": "full"}, ["config.eval.sw_window", "'full' is not one of patch, whole"]


def _val_subset(data, run):
    return {"train.val_max_samples": -1}, ["config.train.val_max_samples", "must be >= 0"]


CASES = {
    "truncated NIfTI": _truncate, "unreadable NIfTI": _garbage,
    "image/label shape mismatch": _shape, "image/label affine mismatch": _affine,
    "undeclared label value": _undeclared, "NaN in an image": _nan, "empty data set": _empty,
    "split with no cases": _empty_split, "batch size vs devices": _batch,
    "unknown model": _model, "workdir of another config": _other_run,
    "unknown in-plane mode": _in_plane, "sliding-window overlap": _overlap,
    "negative validation subset": _val_subset, "sliding-window size": _window,
}


def _one_line_error(call, expected):
    with pytest.raises(main.USER_ERRORS) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, message
    print(f"\n{type(error.value).__name__}: {message}")
    return message


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_nothing_written_changes(copy, case):
    data, run = copy
    overrides, expected = CASES[case](data, run)
    before = snapshot(data, run)
    _one_line_error(lambda: train.train_and_evaluate(_config(data, **overrides), str(run)),
                    expected)
    assert snapshot(data, run) == before


@pytest.mark.parametrize("which, overrides, expected", [
    ("2", {}, None),
    ("99", {}, ["checkpoints: no checkpoint for step 99; kept steps: [2]"]),
    ("best", {"model.name": "fcn"}, ["holds a run with a different config",
                                     "model.name: 'unet' -> 'fcn'"]),
])
def test_eval_names_a_kept_step_or_says_what_differs(copy, which, overrides, expected):
    data, run = copy
    config = _config(data, **{"eval.checkpoint": which, **overrides})
    before = snapshot(data, run)
    if expected is None:
        assert evaluate.evaluate(config, str(run))["step"] == 2
        return
    _one_line_error(lambda: evaluate.evaluate(config, str(run)), expected)
    assert snapshot(data, run) == before


def test_command_line_reports_a_bad_file_in_one_line(copy):
    data, run = copy
    _, expected = _truncate(data, run)
    before = snapshot(data, run)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [f"--config.{k}={v}" for k, v in [
        ("data.root", data), ("data.synthetic_cases", 4), ("data.image_size", "(16,16)"),
        ("model.base_features", 4), ("model.depth", 3), ("train.batch_size", 8),
        ("train.num_epochs", 1), ("train.steps_per_epoch", 2), ("eval.batch_size", 8),
        ("train.log_every_steps", 1), ("data.synthetic_size", 16), ("data.synthetic_depth", 4),
        ("train.compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])]]
    result = subprocess.run(
        [sys.executable, "-m", "medseg_jax.main", f"--config={ROOT / 'configs' / 'unet.py'}",
         f"--workdir={run}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("medseg_jax: error:")]
    assert len(lines) == 1 and all(part in lines[0] for part in expected), result.stderr[-3000:]
    assert snapshot(data, run) == before


@pytest.mark.parametrize("config, expected", [
    ("configs/nope.py", ["--config=configs/nope.py", "No such file or directory"]),
    ("configs/run.py:{tmp}", ["{tmp}/config.json: not found", "is this a run's workdir?"]),
])
def test_a_config_file_that_cannot_be_loaded_is_one_line(tmp_path, config, expected):
    config = config.format(tmp=tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "medseg_jax.main", f"--config={config}",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("medseg_jax: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert all(part.format(tmp=tmp_path) in lines[0] for part in expected), lines[0]
    assert not (tmp_path / "run").exists()
