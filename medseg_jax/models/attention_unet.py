"""Attention U-Net (Oktay et al., 2018) for 2D and 3D: U-Net with additive attention gates."""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models import layers
from medseg_jax.models.base import SegmentationNet


class AttentionGate(nn.Module):
    """Additive attention gate; returns ``(alpha * x, alpha)`` with alpha on x's grid.

    ``x`` is the skip feature, ``g`` the gating signal on the next coarser grid (``strides``
    per axis coarser, default 2).
    q = ReLU(W_x x (1x1, strided) + W_g g (1x1) + b); alpha = sigmoid(psi(q)).
    """

    inter_features: int
    spatial_dims: int = 2
    dtype: Any = jnp.float32
    norm: str = "batch"
    output_transform: bool = True
    strides: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, g: jax.Array,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        dims, dtype = self.spatial_dims, self.dtype
        inter = self.inter_features
        strides = tuple(self.strides) or 2
        theta_x = layers.conv(inter, 1, dims, dtype, use_bias=False, strides=strides,
                              name="W_x")(x)
        phi_g = layers.conv(inter, 1, dims, dtype, use_bias=True, name="W_g")(g)
        q = nn.relu(theta_x + phi_g)
        alpha = nn.sigmoid(layers.conv(1, 1, dims, dtype, name="psi")(q))
        alpha = jax.image.resize(alpha, x.shape[:-1] + (1,), method="linear")
        y = alpha * x
        if self.output_transform:  # W_y: 1x1 conv + norm on the gated skip, as in the paper
            y = layers.conv(x.shape[-1], 1, dims, dtype, use_bias=self.norm == "none",
                            name="W_y")(y)
            y = layers.make_norm(self.norm, train, dtype, name="W_y_norm")(y)
        return y, alpha


class AttentionUNet(SegmentationNet):
    """U-Net whose skip connections pass through attention gates, gated by the coarser
    decoder feature. Gate coefficients are sown as ``intermediates/attention_{level}``
    (float32, shape ``(B, *spatial_level, 1)``); see :func:`attention_maps`.
    """

    output_transform: bool = True  # W_y after each gate (Oktay et al.'s implementation)

    FIGURE_MAPS: ClassVar[dict[str, str]] = {"attention_0": "attention: finest gate"}

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pools, kernels, features = self.geometry(x, "attention_unet")
        dims, dtype, impl = self.spatial_dims, self.dtype, self.layer_impl
        skips = layers.encoder(x, train, features, dims, self.norm, dtype, self.remat, pools,
                               kernels, impl)
        x = skips[-1]
        for i in reversed(range(self.depth - 1)):
            gate = AttentionGate(max(features[i] // 2, 1), dims, dtype, self.norm,
                                 self.output_transform, pools[i], name=f"gate_{i}")
            gated, alpha = gate(skips[i], x, train)
            self.sow("intermediates", f"attention_{i}", alpha.astype(jnp.float32))
            x = layers.up_conv(features[i], dims, dtype, f"up_{i}", pools[i], impl)(x)
            x = jnp.concatenate([gated, x], axis=-1)
            x = layers.ConvBlock(features[i], dims, self.norm, dtype, kernels[i], impl,
                                 name=f"dec_{i}")(x, train)
            if i > 0:
                self.aux_logits(x, i)
        x = layers.conv(self.num_classes, 1, dims, dtype, name="head")(x)
        return x.astype(jnp.float32)


def attention_maps(model: nn.Module, variables: Any, x: jax.Array) -> dict[str, jax.Array]:
    """Runs ``model`` in eval mode and returns ``{"attention_{level}": alpha}``."""
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    inter = state.get("intermediates", {})
    return {name: value[0] if isinstance(value, tuple) else value for name, value in inter.items()}
