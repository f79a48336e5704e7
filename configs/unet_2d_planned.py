"""2D U-Net, planned from the data, trained with nnU-Net's recipe (not the study's protocol).

python -m medseg_jax.main --config=configs/unet_2d_planned.py --workdir=runs/hc18_planned \
    --config.data.root=/tmp/HC18_decathlon

Volumes are cut into slices along data.slice_axis; every case is resampled in plane to
the planned spacing. See configs/unet_3d.py and medseg_jax/config.py `recipe`.
"""

from medseg_jax.config import default_config, recipe


def get_config():
    config = default_config()
    config.model.name = "unet"
    config.model.spatial_dims = 2
    recipe(config)
    config.train.num_epochs = 20  # of 250 steps; nnU-Net trains 1000 on a GPU
    return config
