"""Shared building blocks for the 2D/3D segmentation networks (channels-last)."""

import functools
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


def up_conv(features: int, spatial_dims: int, dtype: Any, name: str | None = None) -> nn.Module:
    """n-d transposed convolution, kernel 2 stride 2 (doubles every spatial size)."""
    return UpConv(features, spatial_dims, dtype, name=name)


class UpConv(nn.Module):
    """``nn.ConvTranspose(features, 2, strides=2, padding="VALID")``, computed as one matmul.

    Kernel 2 with stride 2 never overlaps: every input pixel times the kernel gives its own
    2x2(x2) output block. So the layer is a matmul to ``2**dims * features`` channels and a
    depth-to-space reshape: same parameters (names, shapes, initialisers) and same outputs as
    the transposed convolution (whose kernel it flips), but XLA's CPU backend runs the
    matmul and its gradient 4-9x faster than the transposed convolution's
    (``python -m medseg_jax.tools.throughput``, README "Performance").
    """

    features: int
    spatial_dims: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dims, channels = self.spatial_dims, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2,) * dims + (channels, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        kernel = kernel[(slice(None, None, -1),) * dims]  # lax.conv_transpose flips it
        spatial = "hwd"[:dims]
        offsets = "xyz"[:dims]
        out = "".join(s + o for s, o in zip(spatial, offsets))
        y = jnp.einsum(f"b{spatial}c,{offsets}co->b{out}o", x, kernel)
        shape = (x.shape[0], *(2 * n for n in x.shape[1:-1]), self.features)
        return y.reshape(shape) + bias


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
    """n-d max pooling, window 2 stride 2 (as ``nn.max_pool``; see :func:`_pool2`)."""
    return _pool2(x, spatial_dims)


def _windows(x: jax.Array, dims: int) -> jax.Array:
    """(B, *2n, C) -> (B, *n, C, 2**dims): each 2x2(x2) window on the last axis."""
    b, c, spatial = x.shape[0], x.shape[-1], x.shape[1:-1]
    split = [b] + [m for n in spatial for m in (n // 2, 2)] + [c]
    order = [0, *range(1, 2 * dims, 2), 2 * dims + 1, *range(2, 2 * dims + 1, 2)]
    return x.reshape(split).transpose(order).reshape(b, *(n // 2 for n in spatial), c, -1)


def _unwindows(w: jax.Array, dims: int) -> jax.Array:
    """Inverse of :func:`_windows`."""
    b, c, spatial = w.shape[0], w.shape[-2], w.shape[1:-2]
    w = w.reshape(b, *spatial, c, *(2,) * dims)
    order = [0] + [i for d in range(dims) for i in (1 + d, dims + 2 + d)] + [dims + 1]
    return w.transpose(order).reshape(b, *(2 * n for n in spatial), c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool2(x: jax.Array, dims: int) -> jax.Array:
    """Max over 2x2(x2) windows by a reshape. Its gradient goes, like XLA's
    select-and-scatter (nn.max_pool's), to the first maximum of each window; built from a
    one-hot, it is about 10x faster than select-and-scatter on XLA's CPU backend."""
    return _windows(x, dims).max(axis=-1)


def _pool2_fwd(x, dims):
    w = _windows(x, dims)
    first = jnp.argmax(w, axis=-1)
    return jnp.take_along_axis(w, first[..., None], axis=-1)[..., 0], first


def _pool2_bwd(dims, first, g):
    onehot = jax.nn.one_hot(first, 2**dims, dtype=g.dtype)
    return (_unwindows(onehot * g[..., None], dims),)


_pool2.defvjp(_pool2_fwd, _pool2_bwd)


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
    x: jax.Array, train: bool, features: Sequence[int], spatial_dims: int, norm: str, dtype: Any,
    remat: bool = False,
) -> list[jax.Array]:
    """Runs ConvBlocks with max pooling between them; returns each level's output.

    ``remat``: rematerialise each block in the backward pass (``nn.remat``: its activations
    are recomputed instead of kept), trading compute for memory on large 3D inputs; same
    parameters and results. Must be called from inside a compact method: the blocks bind
    to that module.
    """
    block = nn.remat(ConvBlock, static_argnums=(2,)) if remat else ConvBlock
    outputs = []
    for i, f in enumerate(features):
        if i > 0:
            x = max_pool(x, spatial_dims)
        x = block(f, spatial_dims, norm, dtype, name=f"enc_{i}")(x, train)
        outputs.append(x)
    return outputs
