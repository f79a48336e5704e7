"""The careless or hostile user, through the command line: every case gives the exit
status and the one line (file or field named) that docs/troubleshooting.md lists, and
the user's inputs, labels and earlier outputs are byte-identical afterwards.

Tiny data and a tiny run trained once per module; each case works on copies of them.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from medseg_jax import fileio, train
from medseg_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]

# The tiny config of conftest.tiny_config as command-line overrides.
TINY_ARGS = {
    "data.synthetic_cases": 4, "data.synthetic_size": 16, "data.synthetic_depth": 4,
    "data.image_size": "(16,16)", "model.base_features": 4, "model.depth": 3,
    "train.batch_size": 8, "train.num_epochs": 1, "train.steps_per_epoch": 2,
    "train.log_every_steps": 1, "eval.batch_size": 8,
}


def _config(data_root, **overrides):
    return tiny_config(**{"data.root": str(data_root), "train.num_epochs": 1, **overrides})


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


def snapshot(*folders) -> dict[str, str]:
    """sha256 of every file under ``folders`` (the lock file aside)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One task of 4 cases and a workdir trained on it for one epoch (checkpoint: step 2)."""
    base = tmp_path_factory.mktemp("trained")
    roots = synthetic.make_synthetic(str(base / "data"), seed=0, num_cases=4, size=16, depth=4)
    data = Path(next(r for r in roots if r.endswith("SynthMRI")))
    train.train(_config(data), str(base / "run"))
    return data, base / "run"


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the data and of the trained workdir (config.json pointing at the copy)."""
    data, run = trained
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(run, tmp_path / "run")
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    config_json["data"]["root"] = str(tmp_path / "data")
    config_json.get("paths", {}).pop("data.root", None)
    fileio.write_json_atomic(str(tmp_path / "run" / "config.json"), config_json)
    return tmp_path / "data", tmp_path / "run"


# --------------------------------------------------------------------------- #
# Predict writes only where it may
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# The workdir: lock, durable records, disk full
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# The command line: flags, overrides, usage errors
# --------------------------------------------------------------------------- #

