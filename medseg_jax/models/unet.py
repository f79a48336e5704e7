"""U-Net (Ronneberger et al., 2015) for 2D and 3D, with padded convolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models import layers
from medseg_jax.models.base import SegmentationNet


class UNet(SegmentationNet):
    """U-Net: double-conv encoder/decoder with skip concatenation (fields: ``SegmentationNet``)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pools, kernels, features = self.geometry(x, "unet")
        dims, dtype, impl = self.spatial_dims, self.dtype, self.layer_impl
        skips = layers.encoder(x, train, features, dims, self.norm, dtype, self.remat, pools,
                               kernels, impl)
        x = skips[-1]
        for i in reversed(range(self.depth - 1)):
            x = layers.up_conv(features[i], dims, dtype, f"up_{i}", pools[i], impl)(x)
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = layers.ConvBlock(features[i], dims, self.norm, dtype, kernels[i], impl,
                                 name=f"dec_{i}")(x, train)
            if i > 0:
                self.aux_logits(x, i)
        x = layers.conv(self.num_classes, 1, dims, dtype, name="head")(x)
        return x.astype(jnp.float32)
