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


# --------------------------------------------------------------------------- #
# Data files: memory, finite values, headers, names and JSON
# --------------------------------------------------------------------------- #


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

