"""Shared building blocks of the 2D/3D segmentation networks (channels-last).

Geometry per level: ``pool_sizes`` (the down-sampling factor of each axis between two
levels, 1 or more) and ``kernel_sizes`` (the convolution kernel of each axis at each
level), so anisotropic data (3 mm CT slices, 1 mm pixels) are pooled and convolved per
axis, as nnU-Net plans them. Empty means the classic network: factor 2 and kernel 3 on
every axis.

Three layers have two formulations with the same parameters and results
(``layer_impl``): the transposed convolution, max pooling and the 3D convolution.
``"reshape"`` (a matmul + depth-to-space; a reshape with a one-hot gradient; a 3D
convolution as a sum of 2D convolutions over the first axis's kernel taps) is what
XLA's CPU backend runs fastest; ``"lax"`` is ``lax.conv_transpose`` /
``reduce_window`` / the native 3D convolution (cuDNN's kernels on a GPU); ``"auto"``
picks per backend from ``AUTO_IMPL``.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The levels' pooling factors and kernel sizes: arithmetic, shared with the config checks.
from medseg_jax.geometry import level_geometry, per_axis as _per_axis, total_stride  # noqa: F401

NORMS = ("batch", "instance", "none")
LAYER_IMPLS = ("auto", "reshape", "lax")
# What "auto" picks, per backend and layer. CPU: measured (docs/results/cpu_parity.md: the
# reshape forms are 4-9x / ~10x faster in the backward pass on XLA:CPU). GPU: the
# matmul form avoids cuDNN's slow transposed-convolution gradients (jax#8537,
# jax#31662) and turns the layer into a tensor-core matmul; max pooling uses XLA's
# native reduce_window / select-and-scatter kernels. `benchmarks/gpu_suite.py` times
# both forms on a GPU and records which wins.
# 3D convolutions: XLA:CPU runs a 3x3x3 convolution and its gradients at 10-20 GFLOP/s
# on two cores, three 2D 3x3 convolutions at 35-55 (3.5x faster for forward + backward,
# measured 2026-12-01, B=2, 40x56x40, 32 -> 32 features); GPUs keep cuDNN's 3D kernels.
AUTO_IMPL = {
    "cpu": {"up_conv": "reshape", "max_pool": "reshape", "conv3d": "reshape"},
    "gpu": {"up_conv": "reshape", "max_pool": "lax", "conv3d": "lax"},
    "tpu": {"up_conv": "lax", "max_pool": "lax", "conv3d": "lax"},
}


def resolve_impl(impl: str, layer: str) -> str:
    """``"reshape"`` or ``"lax"`` for ``layer`` ("up_conv" | "max_pool" | "conv3d")."""
    if impl not in LAYER_IMPLS:
        raise ValueError(f"layer_impl must be one of {', '.join(LAYER_IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    return AUTO_IMPL.get(jax.default_backend(), AUTO_IMPL["gpu"])[layer]


def check_config(name: str, spatial_dims: int, depth: int, norm: str, min_depth: int = 1) -> None:
    """Raises ValueError for an invalid architecture configuration."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims}")
    if depth < min_depth:
        raise ValueError(f"{name} needs depth >= {min_depth}, got depth={depth}")
    if norm not in NORMS:
        raise ValueError(f"{name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")


def check_input(name: str, x: jax.Array, spatial_dims: int, depth: int,
                pools: Sequence[tuple[int, ...]] | None = None) -> None:
    """Checks rank and that every spatial size is divisible by the total pooling factor."""
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} with spatial_dims={spatial_dims} expects inputs of shape "
            f"(B, {', '.join('S' * spatial_dims)}, C), got {tuple(x.shape)}"
        )
    if pools is None:
        pools = [(2,) * spatial_dims] * (depth - 1)
    divisor = total_stride(pools, spatial_dims)
    spatial = tuple(x.shape[1:-1])
    if any(s % d for s, d in zip(spatial, divisor)):
        shown = divisor[0] if len(set(divisor)) == 1 else divisor
        raise ValueError(
            f"{name} with depth={depth} needs spatial sizes divisible by {shown}, got {spatial}"
        )


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    spatial_dims: int,
    dtype: Any,
    use_bias: bool = True,
    strides: int | Sequence[int] = 1,
    name: str | None = None,
    kernel_init: Callable | None = None,
    impl: str = "lax",
) -> nn.Module:
    """n-d convolution, 'SAME' padding; kernel size and stride: one int or one per axis.

    A 3D convolution with a kernel wider than 1 on the first axis and stride 1 runs as
    ``Conv`` (2D convolutions summed over that axis's taps) when ``impl`` resolves to
    "reshape"; otherwise, and in 2D, it is ``nn.Conv`` (same parameters either way)."""
    kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
    kernel = _per_axis(kernel_size, spatial_dims, "kernel size")
    strides = _per_axis(strides, spatial_dims, "strides")
    if (spatial_dims == 3 and kernel[0] > 1 and all(s == 1 for s in strides)
            and resolve_impl(impl, "conv3d") == "reshape"):
        return Conv(features, kernel, use_bias=use_bias, dtype=dtype, name=name, **kwargs)
    return nn.Conv(features, kernel, strides=strides, padding="SAME", use_bias=use_bias,
                   dtype=dtype, name=name, **kwargs)


class Conv(nn.Module):
    """``nn.Conv(features, kernel_size, padding="SAME")`` for 3D inputs, computed as the sum
    over the first axis's kernel taps of 2D convolutions of the shifted input (its other
    two axes): the same parameters (names, shapes, initialisers: it is named like
    ``nn.Conv`` in the parameter tree) and the same results up to float rounding. XLA's
    CPU backend runs 2D convolutions several times faster than 3D ones (``AUTO_IMPL``)."""

    features: int
    kernel_size: tuple[int, ...]
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, k + (x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        b, n, h, w, c = x.shape
        lo = (k[0] - 1) // 2  # SAME padding on the first axis
        padded = jnp.pad(x, ((0, 0), (lo, k[0] - 1 - lo), (0, 0), (0, 0), (0, 0)))
        out = None
        for tap in range(k[0]):
            planes = padded[:, tap:tap + n].reshape(b * n, h, w, c)
            y = jax.lax.conv_general_dilated(planes, kernel[tap], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            out = y if out is None else out + y
        out = out.reshape(b, n, h, w, self.features)
        return out if bias is None else out + bias


def up_conv(features: int, spatial_dims: int, dtype: Any, name: str | None = None,
            factors: Sequence[int] | None = None, impl: str = "reshape") -> nn.Module:
    """n-d transposed convolution with kernel = stride = ``factors`` (default 2 per axis)."""
    return UpConv(features, spatial_dims, dtype, factors=tuple(factors or ()), impl=impl,
                  name=name)


def _dimension_numbers(dims: int) -> tuple[str, str, str]:
    spatial = "HWD"[:dims]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


class UpConv(nn.Module):
    """``nn.ConvTranspose(features, factors, strides=factors, padding="VALID")``.

    With kernel = stride the windows never overlap: every input pixel times the kernel
    gives its own output block. ``impl="reshape"`` computes it as a matmul to
    ``prod(factors) * features`` channels and a depth-to-space reshape: same parameters
    (names, shapes, initialisers) and outputs as the transposed convolution (whose kernel
    it flips), and XLA's CPU backend runs the matmul and its gradient 4-9x faster
    (docs/results/cpu_parity.md). ``impl="lax"`` is ``lax.conv_transpose`` itself.
    """

    features: int
    spatial_dims: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    factors: tuple[int, ...] = ()
    impl: str = "reshape"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dims, channels = self.spatial_dims, x.shape[-1]
        factors = tuple(self.factors) or (2,) * dims
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            factors + (channels, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if resolve_impl(self.impl, "up_conv") == "lax":
            y = jax.lax.conv_transpose(x, kernel, factors, "VALID",
                                       dimension_numbers=_dimension_numbers(dims))
            return y + bias
        kernel = kernel[(slice(None, None, -1),) * dims]  # lax.conv_transpose flips it
        spatial = "hwd"[:dims]
        offsets = "xyz"[:dims]
        out = "".join(s + o for s, o in zip(spatial, offsets))
        y = jnp.einsum(f"b{spatial}c,{offsets}co->b{out}o", x, kernel)
        shape = (x.shape[0], *(f * n for f, n in zip(factors, x.shape[1:-1])), self.features)
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


def max_pool(x: jax.Array, spatial_dims: int, factors: Sequence[int] | None = None,
             impl: str = "reshape") -> jax.Array:
    """n-d max pooling, window = stride = ``factors`` (default 2 per axis), as
    ``nn.max_pool``; ``impl="reshape"`` is :func:`_pool` (same values and gradients)."""
    factors = tuple(factors or (2,) * spatial_dims)
    if resolve_impl(impl, "max_pool") == "lax":
        return nn.max_pool(x, factors, strides=factors)
    if all(f == 1 for f in factors):
        return x
    return _pool(x, factors)


def _windows(x: jax.Array, factors: tuple[int, ...]) -> jax.Array:
    """(B, *(n*f), C) -> (B, *n, C, prod(f)): each pooling window on the last axis."""
    dims = len(factors)
    b, c, spatial = x.shape[0], x.shape[-1], x.shape[1:-1]
    split = [b] + [m for n, f in zip(spatial, factors) for m in (n // f, f)] + [c]
    order = [0, *range(1, 2 * dims, 2), 2 * dims + 1, *range(2, 2 * dims + 1, 2)]
    return x.reshape(split).transpose(order).reshape(
        b, *(n // f for n, f in zip(spatial, factors)), c, -1)


def _unwindows(w: jax.Array, factors: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_windows`."""
    dims = len(factors)
    b, c, spatial = w.shape[0], w.shape[-2], w.shape[1:-2]
    w = w.reshape(b, *spatial, c, *factors)
    order = [0] + [i for d in range(dims) for i in (1 + d, dims + 2 + d)] + [dims + 1]
    return w.transpose(order).reshape(b, *(f * n for f, n in zip(factors, spatial)), c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool(x: jax.Array, factors: tuple[int, ...]) -> jax.Array:
    """Max over the windows by a reshape. Its gradient goes, like XLA's select-and-scatter
    (nn.max_pool's), to the first maximum of each window; built from a one-hot, it is
    about 10x faster than select-and-scatter on XLA's CPU backend."""
    return _windows(x, factors).max(axis=-1)


def _pool_fwd(x, factors):
    w = _windows(x, factors)
    first = jnp.argmax(w, axis=-1)
    return jnp.take_along_axis(w, first[..., None], axis=-1)[..., 0], first


def _pool_bwd(factors, first, g):
    onehot = jax.nn.one_hot(first, math.prod(factors), dtype=g.dtype)
    return (_unwindows(onehot * g[..., None], factors),)


_pool.defvjp(_pool_fwd, _pool_bwd)


class ConvBlock(nn.Module):
    """Two (conv -> norm -> ReLU) layers; kernel 3 per axis unless ``kernel`` says."""

    features: int
    spatial_dims: int = 2
    norm: str = "batch"
    dtype: Any = jnp.float32
    kernel: tuple[int, ...] = ()
    impl: str = "lax"  # layer_impl: how a 3D convolution is computed

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bias = self.norm == "none"  # a bias just before a normalisation is redundant
        kernel = tuple(self.kernel) or 3
        for _ in range(2):
            x = conv(self.features, kernel, self.spatial_dims, self.dtype, use_bias=bias,
                     impl=self.impl)(x)
            x = make_norm(self.norm, train, self.dtype)(x)
            x = nn.relu(x)
        return x


def encoder(
    x: jax.Array, train: bool, features: Sequence[int], spatial_dims: int, norm: str, dtype: Any,
    remat: bool = False, pools: Sequence[tuple[int, ...]] | None = None,
    kernels: Sequence[tuple[int, ...]] | None = None, impl: str = "reshape",
) -> list[jax.Array]:
    """Runs ConvBlocks with max pooling (``pools[i - 1]`` before level i) between them;
    returns each level's output.

    ``remat``: rematerialise each block in the backward pass (``nn.remat``: its activations
    are recomputed instead of kept), trading compute for memory on large 3D inputs; same
    parameters and results. Must be called from inside a compact method: the blocks bind
    to that module.
    """
    block = nn.remat(ConvBlock, static_argnums=(2,)) if remat else ConvBlock
    outputs = []
    for i, f in enumerate(features):
        if i > 0:
            x = max_pool(x, spatial_dims, pools[i - 1] if pools else None, impl)
        kernel = tuple(kernels[i]) if kernels else ()
        x = block(f, spatial_dims, norm, dtype, kernel, impl, name=f"enc_{i}")(x, train)
        outputs.append(x)
    return outputs


def level_features(base_features: int, depth: int, max_features: int = 0) -> list[int]:
    """Features per level: ``base * 2**i``, capped at ``max_features`` (0: no cap)."""
    features = [base_features * 2**i for i in range(depth)]
    return [min(f, max_features) for f in features] if max_features else features
