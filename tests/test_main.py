"""The command line, end to end, as a user runs it (a subprocess, one CPU device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
     "config.train has no field 'learning_rat'; valid: batch_size"),
    (["--config.model.name=resnet"],
     "unknown model 'resnet'; valid models: attention_unet, fcn, unet"),
    (["--config.data.image_size=(30,30)"], "multiples of 2**(depth-1) = 8"),
])
def test_bad_config_is_a_one_line_error(tmp_path, args, expected):
    result = _run(f"--config={ROOT / 'configs' / 'unet.py'}", f"--workdir={tmp_path}", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("medseg_jax: error:")]
    assert len(line) == 1 and expected in line[0], result.stderr[-2000:]
