"""3D U-Net, planned from the data, trained with nnU-Net's recipe (not the study's protocol).

python -m medseg_jax.main --config=configs/unet_3d.py --workdir=runs/hippocampus_3d \
    --config.data.root=../shared/data/Task04_Hippocampus

The plan (patch, spacing, per-axis pooling, depth, batch) comes from the training cases
and is written to the run's plans.json; any field set here or on the command line wins.
See medseg_jax/config.py `recipe` for what the recipe changes.
"""

from medseg_jax.config import default_config, recipe


def get_config():
    config = default_config()
    config.model.name = "unet"
    config.model.spatial_dims = 3
    recipe(config)
    # Epochs of 250 steps. On two CPU cores a Hippocampus epoch (with validation) takes about
    # 4 minutes, so 12 epochs take about 50 minutes; nnU-Net trains 1000 epochs on a GPU.
    # --config.train.budget_minutes=N fits the epochs to N minutes instead.
    config.train.num_epochs = 12
    config.eval.batch_size = 4  # sliding-window patches per prediction call
    return config
