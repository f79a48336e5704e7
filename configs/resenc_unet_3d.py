"""3D residual-encoder U-Net (nnU-Net's ResEnc), planned from the data, trained with
nnU-Net's recipe (not the study's protocol).

python -m medseg_jax.main --config=configs/resenc_unet_3d.py --workdir=runs/hippocampus_resenc \
    --config.data.root=../shared/data/Task04_Hippocampus

The plan (patch, spacing, per-axis pooling, depth, batch) comes from the training cases,
as for configs/unet_3d.py, and is written to the run's plans.json; any field set here or
on the command line wins. See medseg_jax/config.py `recipe` for what the recipe changes.
"""

from medseg_jax.config import default_config, recipe


def get_config():
    config = default_config()
    config.model.name = "resenc_unet"
    config.model.spatial_dims = 3
    # Residual blocks per encoder level; (): nnU-Net's (1, 3, 4, 6, 6, ...) for the
    # plan's depth.
    config.model.blocks_per_stage = ()
    config.model.decoder_convs = 1  # conv -> norm -> ReLU layers per decoder level
    recipe(config)
    # Epochs of 250 steps; nnU-Net trains 1000 epochs on a GPU.
    # --config.train.budget_minutes=N fits the epochs to N minutes instead.
    config.train.num_epochs = 12
    config.eval.batch_size = 4  # sliding-window patches per prediction call
    return config
