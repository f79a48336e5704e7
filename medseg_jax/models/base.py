"""The fields every segmentation network here shares, and what they derive from them.

A network is built from its config section (``Model(**config.model)``, see
``models.from_config``): these fields, plus each architecture's own (FCN's
``dropout_rate``, Attention U-Net's ``output_transform``).

Conventions every network follows, so that training and evaluation never need to
know which architecture they run:

- input ``(B, *spatial, C_in)``, output float32 logits ``(B, *spatial, num_classes)``;
- with ``deep_supervision``, the logits of coarser decoder levels are sown into the
  ``"aux"`` collection as ``level_<i>`` (i = how many poolings below the input), for the
  loss to supervise (``losses.supervised_loss``);
- maps worth drawing next to a prediction (attention coefficients) are sown into
  ``"intermediates"``; ``FIGURE_MAPS`` names the ones the figures show.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models import layers


class SegmentationNet(nn.Module):
    """Base of U-Net, FCN, Attention U-Net and ResEnc U-Net: the fields they share.

    Level i has ``base_features * 2**i`` features (capped at ``max_features`` when > 0);
    the network pools ``depth - 1`` times, by ``pool_sizes[i]`` per axis before level
    i + 1 (default 2 everywhere), with convolution kernels ``kernel_sizes[i]`` at level i
    (default 3 everywhere).
    """

    num_classes: int
    spatial_dims: int = 2
    base_features: int = 32
    depth: int = 4
    norm: str = "batch"
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise encoder blocks (memory for compute)
    pool_sizes: tuple = ()  # per level, per axis; () = 2 on every axis
    kernel_sizes: tuple = ()  # per level, per axis; () = 3 on every axis
    max_features: int = 0  # cap on the features of a level (nnU-Net: 320 in 3D); 0 = none
    layer_impl: str = "auto"  # transposed conv / max pool: auto | reshape | lax
    deep_supervision: bool = False  # sow the coarser decoder levels' logits into "aux"

    # {name sown into "intermediates": title of the figure panel}
    FIGURE_MAPS: ClassVar[dict[str, str]] = {}
    MIN_DEPTH: ClassVar[int] = 1

    def geometry(self, x: jax.Array, name: str):
        """Checks the config and the input; returns (pools, kernels, features)."""
        layers.check_config(name, self.spatial_dims, self.depth, self.norm, self.MIN_DEPTH)
        pools, kernels = layers.level_geometry(name, self.spatial_dims, self.depth,
                                               self.pool_sizes, self.kernel_sizes)
        layers.check_input(name, x, self.spatial_dims, self.depth, pools)
        return pools, kernels, layers.level_features(self.base_features, self.depth,
                                                     self.max_features)

    def aux_logits(self, x: jax.Array, level: int) -> None:
        """Deep supervision: a 1x1 head on a coarser level, sown as ``aux/level_<level>``."""
        if self.deep_supervision:
            logits = layers.conv(self.num_classes, 1, self.spatial_dims, self.dtype,
                                 name=f"ds_head_{level}")(x)
            self.sow("aux", f"level_{level}", logits.astype(jnp.float32))
