"""The default configuration (U-Net, the study's protocol, embedded synthetic data).

See medseg_jax/config.py for every field and its meaning.
"""

from medseg_jax.config import default_config


def get_config():
    return default_config()
