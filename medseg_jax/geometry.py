"""The networks' geometry per level: pooling factors and kernel sizes per axis, and the
total pooling that input sizes must be multiples of. Arithmetic only (no JAX): the models
(``models/layers.py``), the config checks and evaluation share it."""

from collections.abc import Sequence


def per_axis(value, dims: int, what: str) -> tuple[int, ...]:
    """An int, or one int per axis -> a tuple of ``dims`` ints."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"{what} {value} has {len(value)} entries for {dims} spatial axes")
    return value


def level_geometry(name: str, spatial_dims: int, depth: int, pool_sizes: Sequence = (),
                   kernel_sizes: Sequence = ()) -> tuple[list[tuple[int, ...]],
                                                         list[tuple[int, ...]]]:
    """(pools: ``depth - 1`` per-axis factors, kernels: ``depth`` per-axis sizes), with the
    defaults (2 and 3 on every axis) for empty ``pool_sizes`` / ``kernel_sizes``."""
    pools = ([(2,) * spatial_dims] * (depth - 1) if not len(pool_sizes) else
             [per_axis(p, spatial_dims, f"{name}: pool_sizes entry") for p in pool_sizes])
    kernels = ([(3,) * spatial_dims] * depth if not len(kernel_sizes) else
               [per_axis(k, spatial_dims, f"{name}: kernel_sizes entry") for k in kernel_sizes])
    if len(pools) != depth - 1:
        raise ValueError(f"{name}: pool_sizes has {len(pools)} levels; depth={depth} needs "
                         f"{depth - 1} (one per down-sampling)")
    if len(kernels) != depth:
        raise ValueError(f"{name}: kernel_sizes has {len(kernels)} levels; depth={depth} "
                         f"needs {depth}")
    if any(f < 1 for p in pools for f in p) or any(k < 1 or k % 2 == 0 for ks in kernels
                                                   for k in ks):
        raise ValueError(f"{name}: pool factors must be >= 1 and kernel sizes odd, got "
                         f"pool_sizes={pools}, kernel_sizes={kernels}")
    return pools, kernels


def total_stride(pools: Sequence[tuple[int, ...]], spatial_dims: int) -> tuple[int, ...]:
    """The product of the pooling factors per axis: input sizes must be multiples of it."""
    out = [1] * spatial_dims
    for p in pools:
        out = [a * b for a, b in zip(out, p)]
    return tuple(out)
