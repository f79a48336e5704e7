"""Command-line tools: ``python -m medseg_jax.tools.throughput``."""
