"""FCN-8s (Long et al., 2015) scaled by ``depth``/``base_features``, for 2D and 3D."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.models import layers


def bilinear_kernel(factor: int, spatial_dims: int, channels: int) -> np.ndarray:
    """Transposed-conv kernel of size 2*factor doing (bi/tri)linear upsampling by ``factor``.

    Channel-diagonal: each channel is upsampled on its own. Shape ``(*k, channels, channels)``.
    """
    size = 2 * factor
    center = factor - 0.5
    filt1d = 1.0 - np.abs(np.arange(size) - center) / factor
    filt = filt1d
    for _ in range(spatial_dims - 1):
        filt = np.multiply.outer(filt, filt1d)
    kernel = np.zeros((size,) * spatial_dims + (channels, channels), np.float32)
    for c in range(channels):
        kernel[..., c, c] = filt
    return kernel


class BilinearUpsample(nn.Module):
    """Learned upsampling by ``factor``: transposed conv (kernel 2*factor, stride factor),
    initialised to bilinear (trilinear in 3D) interpolation, as in FCN."""

    factor: int
    spatial_dims: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
            del key
            kernel = bilinear_kernel(self.factor, self.spatial_dims, channels)
            assert kernel.shape == tuple(shape), (kernel.shape, shape)
            return jnp.asarray(kernel, dtype)

        return nn.ConvTranspose(
            channels,
            (2 * self.factor,) * self.spatial_dims,
            strides=(self.factor,) * self.spatial_dims,
            padding="SAME",  # aligns output pixel centres with bilinear (half-pixel) resizing
            use_bias=False,
            kernel_init=init,
            dtype=self.dtype,
        )(x)


class FCN(nn.Module):
    """FCN-8s pattern: VGG-like encoder of ``depth`` stages, fc6/fc7 as convolutions,
    score layers at the three coarsest levels fused by learned 2x upsampling, then a
    learned upsampling by ``2**(depth-3)`` to full resolution. Needs ``depth >= 3``.

    Input ``(B, *spatial, C_in)``, output float32 logits ``(B, *spatial, num_classes)``.
    Dropout (``dropout_rate > 0``, train only) needs an rng named "dropout".
    """

    num_classes: int
    spatial_dims: int = 2
    base_features: int = 32
    depth: int = 4
    norm: str = "batch"
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    remat: bool = False  # rematerialise encoder blocks (memory for compute)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers.check_config("fcn", self.spatial_dims, self.depth, self.norm, min_depth=3)
        layers.check_input("fcn", x, self.spatial_dims, self.depth)
        dims, dtype = self.spatial_dims, self.dtype
        bias = self.norm == "none"  # a bias just before a normalisation is redundant
        features = [self.base_features * 2**i for i in range(self.depth)]
        stages = layers.encoder(x, train, features, dims, self.norm, dtype, self.remat)

        # fc6 (3x3) and fc7 (1x1) as convolutions at the coarsest level, 2x its width.
        h = stages[-1]
        for name, k in (("fc6", 3), ("fc7", 1)):
            h = layers.conv(2 * features[-1], k, dims, dtype, use_bias=bias, name=name)(h)
            h = layers.make_norm(self.norm, train, dtype, name=f"{name}_norm")(h)
            h = nn.relu(h)
            if self.dropout_rate > 0:
                h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)

        score = layers.conv(self.num_classes, 1, dims, dtype, name=f"score_{self.depth - 1}")(h)
        zeros = nn.initializers.zeros
        for level in (self.depth - 2, self.depth - 3):
            score = BilinearUpsample(2, dims, dtype, name=f"upscore_{level}")(score)
            # Skip score layers start at zero (as in the paper): training starts from FCN-32s.
            skip = layers.conv(
                self.num_classes, 1, dims, dtype, name=f"score_{level}", kernel_init=zeros
            )
            score = score + skip(stages[level])
        factor = 2 ** (self.depth - 3)
        if factor > 1:
            score = BilinearUpsample(factor, dims, dtype, name="upscore_final")(score)
        return score.astype(jnp.float32)
