"""fcn, trained with the study's protocol on the embedded default data."""

from medseg_jax.config import default_config


def get_config():
    config = default_config()
    config.model.name = "fcn"
    config.model.dropout_rate = 0.0  # dropout after fc6 and fc7 (training only)
    return config
