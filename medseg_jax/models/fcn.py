"""FCN-8s (Long et al., 2015) scaled by ``depth``/``base_features``, for 2D and 3D."""

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.models import layers
from medseg_jax.models.base import SegmentationNet


def _bilinear_1d(factor: int) -> np.ndarray:
    if factor == 1:  # no upsampling on this axis: the identity
        return np.ones(1)
    size = 2 * factor
    center = factor - 0.5
    return 1.0 - np.abs(np.arange(size) - center) / factor


def bilinear_kernel(factor: int | Sequence[int], spatial_dims: int, channels: int) -> np.ndarray:
    """Transposed-conv kernel doing (bi/tri)linear upsampling by ``factor`` (one int, or one
    per axis): size ``2 * factor`` per axis (1 where the factor is 1).

    Channel-diagonal: each channel is upsampled on its own. Shape ``(*k, channels, channels)``.
    """
    factors = (factor,) * spatial_dims if isinstance(factor, int) else tuple(factor)
    filt = _bilinear_1d(factors[0])
    for f in factors[1:]:
        filt = np.multiply.outer(filt, _bilinear_1d(f))
    kernel = np.zeros(filt.shape + (channels, channels), np.float32)
    for c in range(channels):
        kernel[..., c, c] = filt
    return kernel


class BilinearUpsample(nn.Module):
    """Learned upsampling by ``factor`` (one int, or one per axis): transposed conv (kernel
    2*factor, stride factor), initialised to bilinear (trilinear in 3D) interpolation, as
    in FCN."""

    factor: Any
    spatial_dims: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        factors = ((self.factor,) * self.spatial_dims if isinstance(self.factor, int)
                   else tuple(self.factor))

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
            del key
            kernel = bilinear_kernel(factors, self.spatial_dims, channels)
            assert kernel.shape == tuple(shape), (kernel.shape, shape)
            return jnp.asarray(kernel, dtype)

        return nn.ConvTranspose(
            channels,
            tuple(2 * f if f > 1 else 1 for f in factors),
            strides=factors,
            padding="SAME",  # aligns output pixel centres with bilinear (half-pixel) resizing
            use_bias=False,
            kernel_init=init,
            dtype=self.dtype,
        )(x)


class FCN(SegmentationNet):
    """FCN-8s pattern: VGG-like encoder of ``depth`` stages, fc6/fc7 as convolutions,
    score layers at the three coarsest levels fused by learned upsampling, then a learned
    upsampling by the remaining pooling factor to full resolution. Needs ``depth >= 3``.

    Dropout (``dropout_rate > 0``, train only) needs an rng named "dropout". With deep
    supervision, the (fused) score maps of the coarser levels are supervised.
    """

    dropout_rate: float = 0.0  # dropout after fc6 and fc7, training only (0: none)

    MIN_DEPTH: ClassVar[int] = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pools, kernels, features = self.geometry(x, "fcn")
        dims, dtype = self.spatial_dims, self.dtype
        bias = self.norm == "none"  # a bias just before a normalisation is redundant
        stages = layers.encoder(x, train, features, dims, self.norm, dtype, self.remat, pools,
                                kernels, self.layer_impl)

        # fc6 (3x3) and fc7 (1x1) as convolutions at the coarsest level, 2x its width.
        h = stages[-1]
        for name, k in (("fc6", kernels[-1]), ("fc7", 1)):
            h = layers.conv(2 * features[-1], k, dims, dtype, use_bias=bias, name=name,
                            impl=self.layer_impl)(h)
            h = layers.make_norm(self.norm, train, dtype, name=f"{name}_norm")(h)
            h = nn.relu(h)
            if self.dropout_rate > 0:
                h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)

        score = layers.conv(self.num_classes, 1, dims, dtype, name=f"score_{self.depth - 1}")(h)
        self.sow_score(score, self.depth - 1)
        zeros = nn.initializers.zeros
        for level in (self.depth - 2, self.depth - 3):
            score = BilinearUpsample(pools[level], dims, dtype, name=f"upscore_{level}")(score)
            # Skip score layers start at zero (as in the paper): training starts from FCN-32s.
            skip = layers.conv(
                self.num_classes, 1, dims, dtype, name=f"score_{level}", kernel_init=zeros
            )
            score = score + skip(stages[level])
            if level > 0:
                self.sow_score(score, level)
        factor = layers.total_stride(pools[: self.depth - 3], dims)
        if any(f > 1 for f in factor):
            score = BilinearUpsample(factor if len(set(factor)) > 1 else factor[0], dims, dtype,
                                     name="upscore_final")(score)
        return score.astype(jnp.float32)

    def sow_score(self, score: jax.Array, level: int) -> None:
        """Deep supervision of FCN: its score maps already are logits at their level."""
        if self.deep_supervision:
            self.sow("aux", f"level_{level}", score.astype(jnp.float32))
