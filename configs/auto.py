"""Letting the program choose: the planned 2D and 3D U-Nets (and their ensemble) trained
within one time budget on one split, the best by validation Dice kept, as nnU-Net's
nnUNetv2_find_best_configuration.

python -m medseg_jax.main --config=configs/auto.py --workdir=runs/hippocampus \
    --config.data.root=../shared/data/Task04_Hippocampus --config.choose.budget_minutes=60

Trains <workdir>/2d and <workdir>/3d (configs/unet_2d_planned.py, configs/unet_3d.py;
every override applies to both), writes <workdir>/choice.json and evaluates the choice on
the test split; --mode=eval and --mode=predict with this config and workdir use the
choice. See medseg_jax/choose.py.
"""

from medseg_jax.config import auto_config


def get_config():
    # nnU-Net's recipe, each configuration's own plan (2D, 3D) when it trains, and the
    # choose section (medseg_jax/config.py choose_section).
    return auto_config()
