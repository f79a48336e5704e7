"""medseg_jax: medical image segmentation in JAX/Flax."""

__version__ = "0.1.0"
