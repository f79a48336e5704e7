"""attention_unet, trained with the study's protocol on the embedded default data."""

from medseg_jax.config import default_config


def get_config():
    config = default_config()
    config.model.name = "attention_unet"
    config.model.output_transform = True  # W_y (1x1 conv + norm) after each gate
    return config
