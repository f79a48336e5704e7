"""Test set-up: CPU backend, 8 fake devices, persistent compilation cache.

The environment variables must be set before the JAX backend starts, so this
module sets them at import time, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "medseg_jax_test_jit"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


def override(config, overrides: dict):
    """``config`` with the dotted fields of ``overrides`` set."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    """A config small enough to train in seconds on the CPU (batch 8 for 8 devices)."""
    from medseg_jax.config import default_config

    config = default_config()
    config.data.synthetic_cases = 4
    config.data.synthetic_size = 16
    config.data.synthetic_depth = 4
    config.data.image_size = (16, 16)
    config.model.base_features = 4
    config.model.depth = 3
    config.train.batch_size = 8
    config.train.num_epochs = 2
    config.train.steps_per_epoch = 2
    config.train.log_every_steps = 1
    config.eval.batch_size = 8
    config.train.compilation_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
    return override(config, overrides)


def tiny_recipe_config(**overrides):
    """``tiny_config`` with nnU-Net's recipe (medseg_jax.config.recipe): a plan from the
    data, deep supervision, poly schedule, class oversampling, nnU-Net's augmentation;
    batch, width and steps stay tiny (explicit fields win over the plan)."""
    from medseg_jax.config import recipe

    config = recipe(tiny_config())
    config.model.base_features = 4
    config.train.batch_size = 8
    config.train.steps_per_epoch = 2
    config.eval.tta = False
    return override(config, overrides)


@pytest.fixture(scope="session", autouse=True)
def quiet_reports():
    """As the entry point does: no report of a failed Orbax read's leftovers."""
    from medseg_jax import checkpoint

    checkpoint.install_quiet_reports()


def tiny_trained_run(base):
    """One task of 4 synthetic cases under ``base`` and a workdir trained on it for one
    epoch (checkpoint: step 2); (data folder, workdir)."""
    from pathlib import Path

    from medseg_jax import train
    from medseg_jax.data import synthetic

    base = Path(base)
    roots = synthetic.make_synthetic(str(base / "data"), seed=0, num_cases=4, size=16, depth=4)
    data = Path(next(r for r in roots if r.endswith("SynthMRI")))
    train.train(tiny_config(**{"data.root": str(data), "train.num_epochs": 1}),
                str(base / "run"))
    return data, base / "run"


def copy_run(data, run, dest):
    """Copies of ``data`` and of the workdir ``run`` in ``dest``, the copy's config.json
    pointing at the copied data; (data, run) of the copies."""
    import json
    import shutil
    from pathlib import Path

    from medseg_jax import fileio

    dest = Path(dest)
    shutil.copytree(data, dest / "data")
    shutil.copytree(run, dest / "run")
    config_json = json.loads((dest / "run" / "config.json").read_text())
    config_json["data"]["root"] = str(dest / "data")
    config_json.get("paths", {}).pop("data.root", None)
    fileio.write_json_atomic(str(dest / "run" / "config.json"), config_json)
    return dest / "data", dest / "run"


def snapshot(*folders) -> dict[str, str]:
    """sha256 of every file under ``folders`` (the lock file aside)."""
    import hashlib
    from pathlib import Path

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def scripted_validation(monkeypatch, val_loss, val_dice):
    """``evaluators.validate`` returns the given values, epoch after epoch (what the early
    stopping and the checkpoints' bookkeeping see)."""
    from medseg_jax import evaluators

    rows = iter(zip(val_loss, val_dice))

    def validate(*args):
        loss, dice = next(rows)
        return {"val_loss": loss, "val_dice": dice, "val_dice_per_class": [dice]}

    monkeypatch.setattr(evaluators, "validate", validate)


@pytest.fixture
def make_tiny_config():
    return tiny_config


@pytest.fixture(params=["study", "recipe"])
def make_run_config(request):
    """The tiny config with the study's protocol, then with nnU-Net's recipe."""
    return tiny_config if request.param == "study" else tiny_recipe_config


def require_data(path, marker: str = ""):
    """``path`` (a real data set, or ``path/marker`` when given) as a Path; the test is
    skipped when it is absent, and fails instead when MEDSEG_REQUIRE_DATA is set (CI: the
    data must be there, a missing set is not a pass)."""
    from pathlib import Path

    path = Path(path)
    if not (path / marker if marker else path).exists():
        what = f"real data not found at {path / marker if marker else path}"
        if os.environ.get("MEDSEG_REQUIRE_DATA"):
            pytest.fail(f"{what} and MEDSEG_REQUIRE_DATA is set")
        pytest.skip(what)
    return path


@pytest.fixture(scope="session")
def shared_data_dir():
    """The real data of ../shared/data (or $MEDSEG_DATA); ``require_data``."""
    from pathlib import Path

    return require_data(os.environ.get(
        "MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def hippocampus_dir(shared_data_dir):
    """Task04_Hippocampus (Medical Segmentation Decathlon) of the real data."""
    return require_data(shared_data_dir / "Task04_Hippocampus", "dataset.json")


@pytest.fixture(scope="session")
def hc18_dir(shared_data_dir):
    """HC18 (fetal head ultrasound) as published: training_set/ beside its CSV."""
    return require_data(shared_data_dir / "HC18", "training_set_pixel_size_and_HC.csv")


@pytest.fixture(scope="session")
def openkbp_dir(shared_data_dir):
    """OpenKBP (head-and-neck CT) as published: train-pats/, validation-pats/."""
    return require_data(shared_data_dir / "OpenKBP", "train-pats")
