"""Residual-encoder U-Net (nnU-Net ResEnc; Isensee et al., "nnU-Net Revisited", 2024), 2D
and 3D.

The network of nnU-Net's ResEnc presets (``ResidualEncoderUNet`` of
dynamic-network-architectures): a stem convolution, then per level a stack of
residual blocks (ResNet-D ``BasicBlockD``) whose first block down-samples by a strided
convolution, ``(1, 3, 4, 6, 6, ...)`` blocks from the finest level; the decoder is the
plain U-Net decoder with one convolution per level. The plan's geometry (features, pooling
and kernels per level, 320-feature cap in 3D) is the same as the U-Net's: the ResEnc
presets change the network and the memory target, not the topology rules.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models import layers
from medseg_jax.models.base import SegmentationNet

# Residual blocks per level of nnU-Net's ResEnc presets; deeper levels take the last entry.
NNUNET_BLOCKS = (1, 3, 4, 6)


def blocks_per_level(blocks: Sequence[int], depth: int) -> list[int]:
    """Blocks of each of ``depth`` levels: ``blocks[i]`` for level i, the last entry for the
    levels past its end; empty ``blocks``: ``NNUNET_BLOCKS``."""
    blocks = tuple(int(b) for b in blocks) or NNUNET_BLOCKS
    if any(b < 1 for b in blocks):
        raise ValueError(f"resenc_unet: blocks_per_stage entries must be >= 1, got {blocks}")
    return [blocks[min(i, len(blocks) - 1)] for i in range(depth)]


def _norm(norm: str, train: bool, dtype: Any, name: str, zero: bool = False):
    """``layers.make_norm``; ``zero``: its scale starts at 0 (the residual branch starts as
    nothing, so the block starts as its skip path; nnU-Net's init_last_bn_before_add_to_0)."""
    if not zero or norm == "none":
        return layers.make_norm(norm, train, dtype, name=name)
    zeros = nn.initializers.zeros_init()
    if norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype,
                            scale_init=zeros, name=name)
    return nn.InstanceNorm(dtype=dtype, scale_init=zeros, name=name)


class ResBlock(nn.Module):
    """ResNet-D basic block: conv -> norm -> ReLU -> conv -> norm, plus the skip path, ReLU.

    The first convolution has stride ``strides`` (padding kernel // 2 per axis, as
    PyTorch's); the skip path is the identity, or, when the grid or the channels change,
    average pooling by ``strides`` and a 1x1 conv + norm.
    """

    features: int
    spatial_dims: int = 2
    norm: str = "batch"
    dtype: Any = jnp.float32
    kernel: tuple[int, ...] = ()  # per axis; () = 3
    strides: tuple[int, ...] = ()  # per axis; () = 1
    impl: str = "lax"  # layer_impl: how a 3D convolution is computed

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dims, dtype, norm = self.spatial_dims, self.dtype, self.norm
        bias = norm == "none"  # a bias just before a normalisation is redundant
        kernel = tuple(self.kernel) or (3,) * dims
        strides = tuple(self.strides) or (1,) * dims
        strided = any(s > 1 for s in strides)
        if strided:
            y = nn.Conv(self.features, kernel, strides=strides,
                        padding=[(k // 2, k // 2) for k in kernel], use_bias=bias,
                        dtype=dtype, name="conv_1")(x)
        else:
            y = layers.conv(self.features, kernel, dims, dtype, use_bias=bias,
                            impl=self.impl, name="conv_1")(x)
        y = nn.relu(_norm(norm, train, dtype, "norm_1")(y))
        y = layers.conv(self.features, kernel, dims, dtype, use_bias=bias, impl=self.impl,
                        name="conv_2")(y)
        y = _norm(norm, train, dtype, "norm_2", zero=True)(y)
        skip = nn.avg_pool(x, strides, strides=strides) if strided else x
        if x.shape[-1] != self.features:
            skip = layers.conv(self.features, 1, dims, dtype, use_bias=bias,
                               name="skip_conv")(skip)
            skip = _norm(norm, train, dtype, "skip_norm")(skip)
        return nn.relu(y + skip.astype(y.dtype))


class ResStage(nn.Module):
    """One encoder level: ``blocks`` ResBlocks, the first one strided by ``strides``; the
    finest level (``stem``) starts with a conv -> norm -> ReLU."""

    features: int
    blocks: int
    spatial_dims: int = 2
    norm: str = "batch"
    dtype: Any = jnp.float32
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    stem: bool = False
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dims, dtype = self.spatial_dims, self.dtype
        kernel = tuple(self.kernel) or (3,) * dims
        if self.stem:
            x = layers.conv(self.features, kernel, dims, dtype, use_bias=self.norm == "none",
                            impl=self.impl, name="stem")(x)
            x = nn.relu(layers.make_norm(self.norm, train, dtype, name="stem_norm")(x))
        for b in range(self.blocks):
            x = ResBlock(self.features, dims, self.norm, dtype, kernel,
                         tuple(self.strides) if b == 0 else (), self.impl,
                         name=f"block_{b}")(x, train)
        return x


class DecoderStage(nn.Module):
    """``convs`` (conv -> norm -> ReLU) layers: the decoder of the ResEnc U-Net."""

    features: int
    convs: int = 1
    spatial_dims: int = 2
    norm: str = "batch"
    dtype: Any = jnp.float32
    kernel: tuple[int, ...] = ()
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kernel = tuple(self.kernel) or 3
        for _ in range(self.convs):
            x = layers.conv(self.features, kernel, self.spatial_dims, self.dtype,
                            use_bias=self.norm == "none", impl=self.impl)(x)
            x = nn.relu(layers.make_norm(self.norm, train, self.dtype)(x))
        return x


class ResEncUNet(SegmentationNet):
    """U-Net with a residual encoder (nnU-Net's ResEnc M/L network; fields:
    ``SegmentationNet`` and its own). Encoder levels are ``enc_<i>`` (the stem is in
    ``enc_0``), decoder levels ``dec_<i>``, as in the U-Net."""

    # residual blocks per encoder level from the finest; levels past the end take the
    # last entry. Empty: nnU-Net's ResEnc presets, (1, 3, 4, 6, 6, ...).
    blocks_per_stage: tuple = ()
    decoder_convs: int = 1  # conv -> norm -> ReLU layers per decoder level (nnU-Net's: 1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pools, kernels, features = self.geometry(x, "resenc_unet")
        blocks = blocks_per_level(self.blocks_per_stage, self.depth)
        if self.decoder_convs < 1:
            raise ValueError(f"resenc_unet: decoder_convs must be >= 1, got {self.decoder_convs}")
        dims, dtype, impl = self.spatial_dims, self.dtype, self.layer_impl
        stage = nn.remat(ResStage, static_argnums=(2,)) if self.remat else ResStage
        skips = []
        for i, f in enumerate(features):
            x = stage(f, blocks[i], dims, self.norm, dtype, tuple(kernels[i]),
                      tuple(pools[i - 1]) if i else (), i == 0, impl, name=f"enc_{i}")(x, train)
            skips.append(x)
        for i in reversed(range(self.depth - 1)):
            x = layers.up_conv(features[i], dims, dtype, f"up_{i}", pools[i], impl)(x)
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = DecoderStage(features[i], self.decoder_convs, dims, self.norm, dtype,
                             tuple(kernels[i]), impl, name=f"dec_{i}")(x, train)
            if i > 0:
                self.aux_logits(x, i)
        x = layers.conv(self.num_classes, 1, dims, dtype, name="head")(x)
        return x.astype(jnp.float32)
