"""U-Net (Ronneberger et al., 2015) for 2D and 3D, with padded convolutions."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models import layers


class UNet(nn.Module):
    """U-Net: double-conv encoder/decoder with skip concatenation.

    Level i has ``base_features * 2**i`` features; the net pools ``depth - 1`` times.
    Input ``(B, *spatial, C_in)``, output float32 logits ``(B, *spatial, num_classes)``.
    """

    num_classes: int
    spatial_dims: int = 2
    base_features: int = 32
    depth: int = 4
    norm: str = "batch"
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise encoder blocks (memory for compute)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers.check_config("unet", self.spatial_dims, self.depth, self.norm)
        layers.check_input("unet", x, self.spatial_dims, self.depth)
        dims, dtype = self.spatial_dims, self.dtype
        features = [self.base_features * 2**i for i in range(self.depth)]
        skips = layers.encoder(x, train, features, dims, self.norm, dtype, self.remat)
        x = skips[-1]
        for i in reversed(range(self.depth - 1)):
            x = layers.up_conv(features[i], dims, dtype, name=f"up_{i}")(x)
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = layers.ConvBlock(features[i], dims, self.norm, dtype, name=f"dec_{i}")(x, train)
        x = layers.conv(self.num_classes, 1, dims, dtype, name="head")(x)
        return x.astype(jnp.float32)
