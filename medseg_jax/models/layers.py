"""Shared building blocks for the 2D/3D segmentation networks (channels-last)."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "instance", "none")


def check_config(name: str, spatial_dims: int, depth: int, norm: str, min_depth: int = 1) -> None:
    """Raises ValueError for an invalid architecture configuration."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims}")
    if depth < min_depth:
        raise ValueError(f"{name} needs depth >= {min_depth}, got depth={depth}")
    if norm not in NORMS:
        raise ValueError(f"{name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")


def check_input(name: str, x: jax.Array, spatial_dims: int, depth: int) -> None:
    """Checks rank and that every spatial size is divisible by 2**(depth-1)."""
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} with spatial_dims={spatial_dims} expects inputs of shape "
            f"(B, {', '.join('S' * spatial_dims)}, C), got {tuple(x.shape)}"
        )
    divisor = 2 ** (depth - 1)
    spatial = tuple(x.shape[1:-1])
    if any(s % divisor for s in spatial):
        raise ValueError(
            f"{name} with depth={depth} needs spatial sizes divisible by {divisor}, got {spatial}"
        )


def conv(
    features: int,
    kernel_size: int,
    spatial_dims: int,
    dtype: Any,
    use_bias: bool = True,
    strides: int = 1,
    name: str | None = None,
    kernel_init: Callable | None = None,
) -> nn.Conv:
    """n-d convolution with the same kernel size and stride in every dim, 'SAME' padding."""
    kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nn.Conv(
        features,
        (kernel_size,) * spatial_dims,
        strides=(strides,) * spatial_dims,
        padding="SAME",
        use_bias=use_bias,
        dtype=dtype,
        name=name,
        **kwargs,
    )


def up_conv(
    features: int, spatial_dims: int, dtype: Any, name: str | None = None
) -> nn.ConvTranspose:
    """n-d transposed convolution, kernel 2 stride 2 (doubles every spatial size)."""
    return nn.ConvTranspose(
        features, (2,) * spatial_dims, strides=(2,) * spatial_dims, padding="VALID",
        dtype=dtype, name=name,
    )


def make_norm(
    norm: str, train: bool, dtype: Any, name: str | None = None
) -> Callable[[jax.Array], jax.Array]:
    """Returns a normalisation layer: "batch", "instance" or "none" (identity)."""
    if norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype, name=name)
    if norm == "instance":
        return nn.InstanceNorm(dtype=dtype, name=name)
    if norm == "none":
        return lambda x: x
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def max_pool(x: jax.Array, spatial_dims: int) -> jax.Array:
    """n-d max pooling, window 2 stride 2."""
    return nn.max_pool(x, (2,) * spatial_dims, strides=(2,) * spatial_dims)


class ConvBlock(nn.Module):
    """Two (3x3 / 3x3x3 conv -> norm -> ReLU) layers."""

    features: int
    spatial_dims: int = 2
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bias = self.norm == "none"  # a bias just before a normalisation is redundant
        for _ in range(2):
            x = conv(self.features, 3, self.spatial_dims, self.dtype, use_bias=bias)(x)
            x = make_norm(self.norm, train, self.dtype)(x)
            x = nn.relu(x)
        return x


def encoder(
    x: jax.Array, train: bool, features: Sequence[int], spatial_dims: int, norm: str, dtype: Any
) -> list[jax.Array]:
    """Runs ConvBlocks with max pooling between them; returns each level's output.

    Must be called from inside a compact method: the blocks bind to that module.
    """
    outputs = []
    for i, f in enumerate(features):
        if i > 0:
            x = max_pool(x, spatial_dims)
        x = ConvBlock(f, spatial_dims, norm, dtype, name=f"enc_{i}")(x, train)
        outputs.append(x)
    return outputs
