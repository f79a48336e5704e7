"""Segmentation networks by name, plus helpers to create, initialise and size them."""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models.attention_unet import AttentionUNet, attention_maps
from medseg_jax.models.fcn import FCN
from medseg_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "fcn": FCN, "attention_unet": AttentionUNet}

__all__ = [
    "MODELS", "UNet", "FCN", "AttentionUNet", "attention_maps", "create_model", "count_params",
    "init_model",
]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered under ``name`` with the given fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def count_params(params: Any) -> int:
    """Number of scalars in a params pytree (a full variables dict counts its "params" only)."""
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))


def init_model(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """Initialises ``model`` (train=False, jitted) on zeros of batch size 1.

    ``input_shape`` is ``(B, *spatial, C)`` (B is replaced by 1) or ``(*spatial, C)``.
    """
    shape = tuple(input_shape)
    if len(shape) == model.spatial_dims + 2:
        shape = (1,) + shape[1:]
    elif len(shape) == model.spatial_dims + 1:
        shape = (1,) + shape
    else:
        raise ValueError(
            f"input_shape {shape} does not fit spatial_dims={model.spatial_dims}: "
            "expected (B, *spatial, C) or (*spatial, C)"
        )
    x = jnp.zeros(shape, jnp.float32)
    variables = jax.jit(lambda r, inp: model.init(r, inp, train=False))(rng, x)
    return dict(variables)
