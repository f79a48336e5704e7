"""A finished run's own settings, read from its config.json: evaluate, predict with or
resume any run (one of a study's included) without repeating its config and overrides.

python -m medseg_jax.main --config=configs/run.py:runs/study_real/openkbp/unet \
    --workdir=runs/study_real/openkbp/unet --mode=eval --config.eval.split=val

The text after ':' is the run's workdir (give it to --workdir too). Path fields (data.root,
...) are the real paths the run recorded, so this works from any directory; fields added
to the package since the run take their defaults; any field can still be overridden
(--config.eval.sw_window=whole).
"""

import os

import ml_collections

from medseg_jax import fileio
from medseg_jax import workdir as workdir_lib
from medseg_jax.config import default_config


def _tuples(value):
    """JSON lists back to the tuples the config fields hold (image_size, pool_sizes, ...)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _merge(base: dict, recorded: dict) -> dict:
    for key, value in recorded.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def get_config(workdir: str = ""):
    if not workdir:
        raise ValueError("configs/run.py needs the run's workdir: --config=configs/run.py:WORKDIR")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{path}: not found (configs/run.py reads the config.json "
                         "that a run writes in its workdir; is this a run's workdir?)")
    recorded = fileio.read_json(path, "the run's config", workdir_lib.CONFIG_RECOVER)
    if not isinstance(recorded.get("model"), dict):
        raise ValueError(f"{path}: not a config record (no model section); "
                         f"{workdir_lib.CONFIG_RECOVER}")
    paths = recorded.pop("paths", {}) or {}
    recorded.pop("versions", None)
    values = default_config().to_dict()
    values["model"] = {}  # the architecture's own fields, as recorded
    values = _merge(values, _tuples(recorded))
    for dotted, real in paths.items():  # the folders the run used, from any directory
        section, _, field = dotted.partition(".")
        if section in values and field in values[section]:
            values[section][field] = real
    return ml_collections.ConfigDict(values)
