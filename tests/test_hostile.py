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
