"""The config layer: reading, checking and listing a config import no JAX or Flax, and a
config file's field that the package does not define is refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_jax import architectures, config_fields
from medseg_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "run.py")
JAX_FREE = """
import sys
from medseg_jax import config, config_fields
c = config.default_config()
config.validate(c)
c.model.pool_sizes = ((2, 2), (2, 1), (2, 2))
config.validate(c)  # the divisor of per-axis pooling: arithmetic
config_fields.listing(c)
b = config.default_config()
b.benchmark = config.study_section()
config.check_fields(b)
config.check_numbers(b)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax")))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reading_checking_and_listing_a_config_import_no_jax():
    result = _python(JAX_FREE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flags", [["--help"], ["--config=configs/unet.py", "--show_config"]])
def test_help_and_show_config_import_no_jax(flags):
    code = ("import runpy, sys\n"
            f"sys.argv = ['medseg-jax', *{flags!r}]\n"
            "try:\n"
            "    runpy.run_module('medseg_jax.main', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')),"
            " file=sys.stderr)\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "[]"
    assert ("train.learning_rate = 0.001" if "--show_config" in flags else
            "--workdir") in result.stdout


def test_the_architectures_fields_read_from_the_sources_are_the_models():
    from medseg_jax import models

    assert set(architectures.fields()) == set(models.MODELS)
    for name in models.MODELS:
        assert set(architectures.fields()[name]) == set(models.model_fields(name)), name
        assert architectures.extras()[name] == models.extra_fields(name), name
    assert config_fields.model_extras() == architectures.extras()


def test_the_input_divisor_is_the_models():
    from medseg_jax.models import layers

    config = config_lib.default_config()
    config.model.depth = 3
    config.model.pool_sizes = ((2, 1), (2, 2))
    assert config_lib.input_divisor(config) == (4, 2)
    assert layers.total_stride(layers.level_geometry("m", 2, 3, ((2, 1), (2, 2)))[0], 2) == (
        4, 2)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_has_only_known_fields(name):
    module = {}
    exec((ROOT / "configs" / name).read_text(), module)  # noqa: S102 (our own files)
    config = module["get_config"]()
    config_lib.check_fields(config)
    if "benchmark" not in config:
        config_lib.check_numbers(config)


@pytest.mark.parametrize("dotted, message", [
    ("train.learnig_rate", "config.train.learnig_rate: config.train has no field "
                           "'learnig_rate'; did you mean 'learning_rate'?"),
    ("augment.p_rotat", "config.augment.p_rotat: config.augment has no field 'p_rotat'; "
                        "did you mean 'p_rotate'?"),
    ("model.base_feature", "config.model.base_feature: config.model has no field "
                           "'base_feature'; did you mean 'base_features'?"),
    ("model.dropout_rate", "config.model.dropout_rate: config.model has no field "
                           "'dropout_rate'; a field of model fcn (configs/fcn.py)"),
    ("trian", "config.trian: config has no field 'trian'; did you mean 'train'?"),
    ("zzz", "config.zzz: config has no field 'zzz'; valid: augment, data, eval, model, "
            "seed, train"),
])
def test_an_unknown_field_is_refused_with_the_closest_name(dotted, message):
    config = config_lib.default_config()
    section, _, field = dotted.rpartition(".")
    (config[section] if section else config)[field] = 1
    with pytest.raises(ValueError) as refused:
        config_lib.validate(config)
    assert str(refused.value) == message


def test_fields_of_the_study_and_of_its_architectures_are_known():
    config = config_lib.default_config()
    config.benchmark = config_lib.study_section()
    config.model.dropout_rate = 0.5  # fcn's: the study keeps it for its fcn runs
    config.model.output_transform = False  # attention_unet's
    config_lib.check_fields(config)
    config.benchmark.sweep.learnig_rates = "1e-3"
    with pytest.raises(ValueError, match=r"^config.benchmark.sweep.learnig_rates: .*did "
                                         r"you mean 'learning_rates'\?$"):
        config_lib.check_fields(config)
    fcn = config_lib.default_config()
    fcn.model.name = "fcn"
    fcn.model.dropout_rate = 0.5
    config_lib.validate(fcn)  # its own field
    fcn.model.output_transform = False
    with pytest.raises(ValueError, match=r"^config.model.output_transform: .*a field of "
                                         r"model attention_unet"):
        config_lib.validate(fcn)


def test_a_config_file_with_a_misspelled_field_is_refused_before_jax(tmp_path):
    config = tmp_path / "typo.py"
    config.write_text("from medseg_jax.config import default_config\n\n\n"
                      "def get_config():\n"
                      "    c = default_config()\n"
                      "    c.train.learnig_rate = 1\n"
                      "    return c\n")
    workdir = tmp_path / "run"
    code = ("import runpy, sys\n"
            f"sys.argv = ['medseg-jax', '--config={config}', '--workdir={workdir}']\n"
            "try:\n"
            "    runpy.run_module('medseg_jax.main', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('jax' in sys.modules, file=sys.stderr)\n"
            "    raise\n")
    result = _python(code)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "medseg_jax: error: config.train.learnig_rate: config.train has no field "
        "'learnig_rate'; did you mean 'learning_rate'?", "False"]
    assert not workdir.exists()


def test_a_runs_record_is_checked_as_a_config_file(tmp_path):
    """configs/run.py: a run's config.json, over the defaults; a field it holds that the
    package does not define (a hand edit) is named as a config file's would be."""
    import json

    from medseg_jax import workdir

    config = config_lib.default_config()
    config.model.name = "fcn"
    config.model.dropout_rate = 0.25
    record = workdir.config_json(config)
    (tmp_path / "config.json").write_text(json.dumps(record))
    read = workdir.read_run_config(str(tmp_path))
    config_lib.validate(read)
    assert read.model.dropout_rate == 0.25
    record["eval"]["sw_windw"] = "whole"
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"^config.eval.sw_windw: config.eval has no field "
                                         r"'sw_windw'; did you mean 'sw_window'\?$"):
        config_lib.validate(workdir.read_run_config(str(tmp_path)))
