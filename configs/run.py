"""A finished run's own settings, read from its config.json: evaluate, predict with or
resume any run (one of a study's included) without repeating its config and overrides.

python -m medseg_jax.main --config=configs/run.py:runs/study_real/openkbp/unet \
    --workdir=runs/study_real/openkbp/unet --mode=eval --config.eval.split=val

The text after ':' is the run's workdir (give it to --workdir too). Path fields (data.root,
...) are the real paths the run recorded, so this works from any directory; fields added
to the package since the run take their defaults; any field can still be overridden
(--config.eval.sw_window=whole). See medseg_jax/workdir.py `read_run_config`.
"""

from medseg_jax.workdir import read_run_config


def get_config(workdir: str = ""):
    if not workdir:
        raise ValueError("configs/run.py needs the run's workdir: --config=configs/run.py:WORKDIR")
    return read_run_config(workdir)
