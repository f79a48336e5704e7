"""The command line, end to end, as a user runs it (a subprocess, one CPU device)."""

import importlib
import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from medseg_jax import config_fields
from medseg_jax.config import default_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config.data.synthetic_cases=3", "--config.data.synthetic_size=16",
    "--config.data.synthetic_depth=4", "--config.data.image_size=(16,16)",
    "--config.model.base_features=4", "--config.model.depth=3",
    "--config.train.batch_size=4", "--config.train.num_epochs=1",
    "--config.train.steps_per_epoch=2", "--config.eval.batch_size=4",
    f"--config.train.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
]


def _run(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "medseg_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_then_eval_reproduces_the_test_table(tmp_path):
    workdir = tmp_path / "run"
    config = str(ROOT / "configs" / "attention_unet.py")
    first = _run(f"--config={config}", f"--workdir={workdir}", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| data | class |" in first.stdout
    assert "parameters" in first.stderr  # the parameter count is logged at start-up
    with open(workdir / "test_metrics.json") as f:
        trained = json.load(f)
    second = _run(f"--config={config}", f"--workdir={workdir}", "--mode=eval", *TINY)
    assert second.returncode == 0, second.stderr[-3000:]
    with open(workdir / "test_metrics.json") as f:
        evaluated = json.load(f)
    # json.dumps: nan (undefined metrics) compares unequal to itself.
    assert json.dumps(evaluated["per_case"]) == json.dumps(trained["per_case"])
    assert json.dumps(evaluated["aggregate"]) == json.dumps(trained["aggregate"])
    config_json = json.loads((workdir / "config.json").read_text())
    assert config_json["model"]["name"] == "attention_unet"

    inputs = workdir / "synthetic_data" / "SynthUS" / "imagesTr"
    third = _run(f"--config={config}", f"--workdir={workdir}", "--mode=predict",
                 f"--input={inputs}", f"--output={tmp_path / 'pred'}", "--task=SynthUS", *TINY)
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "pred")) == sorted(os.listdir(inputs)
                                                            + [".medseg_predict.json"])
    missing = _run(f"--config={config}", f"--workdir={workdir}", "--mode=predict", *TINY)
    assert missing.returncode != 0
    assert "--mode=predict needs --input=DIR_OR_FILE and --output=DIR" in missing.stderr


@pytest.mark.parametrize("args, expected", [
    (["--config.train.learning_rat=3e-4"],
     "--config.train.learning_rat: config.train has no field 'learning_rat'; "
     "did you mean 'learning_rate'?"),
    (["--config.model.name=resnet"],
     "unknown model 'resnet'; valid models: attention_unet, fcn, resenc_unet, unet"),
    (["--config.data.image_size=(30,30)"], "multiples of 2**(depth-1) = 8"),
])
def test_bad_config_is_a_one_line_error(tmp_path, args, expected):
    result = _run(f"--config={ROOT / 'configs' / 'unet.py'}", f"--workdir={tmp_path}", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("medseg_jax: error:")]
    assert len(line) == 1 and expected in line[0], result.stderr[-2000:]


def _one_line(result, status=2) -> str:
    """The whole of stderr: one ``medseg_jax: error:`` line (no usage text)."""
    assert result.returncode == status, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("medseg_jax: error: "), result.stderr[-3000:]
    return lines[0]


def test_help_exits_0_with_the_flags_and_how_to_list_the_fields():
    result = _run("--help")
    assert result.returncode == 0, result.stderr[-3000:]
    for text in ("--workdir:", "--mode:", "--show_config", "--version",
                 "--config.train.learning_rate=3e-4", "--config=configs/unet.py --show_config",
                 "use only config files you trust"):
        assert text in result.stdout, text


def test_version_names_the_versions_and_the_backend():
    result = _run("--version")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:4] == [f"medseg_jax {importlib.import_module('medseg_jax').__version__}",
                         f"jax {metadata.version('jax')}", f"jaxlib {metadata.version('jaxlib')}",
                         f"flax {metadata.version('flax')}"]
    assert lines[4].startswith("backend cpu (")


def test_show_config_lists_every_field_and_a_repeated_override_replaces(tmp_path):
    """No --workdir needed; `--config.data.image_size` given twice: the last one (absl
    appended the second tuple to the first)."""
    result = _run(f"--config={ROOT / 'configs' / 'unet.py'}", "--show_config",
                  "--config.data.image_size=(32,32)", "--config.data.image_size=(48,48)",
                  "--config.model.pool_sizes", "((2,2),(2,2),(2,2))",
                  "--config.model.pool_sizes=((2,1),(2,1),(2,1))", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "train.learning_rate = 0.001  # the initial learning rate (lr_schedule decays " \
           "it)" in lines
    assert any(line.startswith("data.image_size = (48, 48)  # Network input size")
               for line in lines)
    assert any(line.startswith("model.pool_sizes = ((2, 1), (2, 1), (2, 1))  #")
               for line in lines)
    assert len(lines) == len(config_fields.flatten(default_config()))
    assert all(" = " in line and "  # " in line for line in lines)
    assert os.listdir(tmp_path) == []


def test_console_script_runs_main():
    """pyproject's `medseg-jax` is main.run (a `pip install -e .` makes the script)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["medseg-jax"]
    assert target == "medseg_jax.main:run"
    module, name = target.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert pyproject["project"]["optional-dependencies"]["tensorboard"] == ["tensorboard>=2.15"]


@pytest.mark.parametrize("args, expected", [
    (["--mode=predict", "--workdir={tmp}"],
     "--mode=predict needs --input=DIR_OR_FILE and --output=DIR"),
    ([], "--workdir: missing; name the run's folder"),
    (["--workdir={tmp}", "stray"], "unexpected arguments: stray; flags are written"),
    (["--workdir={tmp}", "--mode=tain"],
     "--mode=tain: value should be one of <train|eval|predict>; see --help"),
    (["--workdir={tmp}", "--wokdir=x"], "--wokdir: unknown flag; did you mean --workdir?"),
    (["--workdir={tmp}", "--config.train.learning_rate=fast"],
     "--config.train.learning_rate=fast: could not convert string to float: 'fast'"),
])
def test_a_usage_error_is_one_line_and_exit_2(tmp_path, args, expected):
    result = _run(f"--config={ROOT / 'configs' / 'unet.py'}",
                  *[a.format(tmp=tmp_path / "run") for a in args])
    assert expected in _one_line(result)
    assert not (tmp_path / "run").exists()


def test_missing_config_is_one_line(tmp_path):
    assert _one_line(_run(f"--workdir={tmp_path / 'run'}")) == (
        "medseg_jax: error: --config: missing; name a config file, e.g. "
        "--config=configs/unet.py")


def test_a_mistyped_override_runs_the_config_file_once(tmp_path):
    counter = tmp_path / "calls"
    config = tmp_path / "counting.py"
    config.write_text(
        "from medseg_jax.config import default_config\n\n\n"
        "def get_config():\n"
        f"    with open({str(counter)!r}, 'a') as f:\n"
        "        f.write('x')\n"
        "    return default_config()\n")
    result = _run(f"--config={config}", f"--workdir={tmp_path / 'run'}",
                  "--config.train.learnig_rate=3e-4")
    assert _one_line(result) == (
        "medseg_jax: error: --config.train.learnig_rate: config.train has no field "
        "'learnig_rate'; did you mean 'learning_rate'?")
    assert counter.read_text() == "x"


def test_a_config_file_that_raises_is_one_line_with_its_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    return {}['model']\n")
    line = _one_line(_run(f"--config={config}", f"--workdir={tmp_path / 'run'}"))
    assert line == f"medseg_jax: error: --config={config}: KeyError: 'model' (line 2)"
