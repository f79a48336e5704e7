"""Segmentation networks by name; building one from its config section; what it exposes.

To add an architecture: write a ``SegmentationNet`` subclass (``models/base.py`` lists
the conventions) and register it in ``MODELS``; every field it declares can then be set
as ``--config.model.<field>``.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.models.attention_unet import AttentionUNet, attention_maps
from medseg_jax.models.base import SegmentationNet
from medseg_jax.models.fcn import FCN
from medseg_jax.models.resenc_unet import ResEncUNet
from medseg_jax.models.unet import UNet

MODELS: dict[str, type[SegmentationNet]] = {"unet": UNet, "fcn": FCN,
                                            "attention_unet": AttentionUNet,
                                            "resenc_unet": ResEncUNet}

__all__ = [
    "MODELS", "UNet", "FCN", "AttentionUNet", "ResEncUNet", "SegmentationNet", "attention_maps",
    "create_model", "from_config", "model_fields", "extra_fields", "figure_maps",
    "count_params", "init_model",
]

_NOT_CONFIG = ("num_classes", "parent", "name")  # set by the run or by Flax, not the config


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered under ``name`` with the given fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def model_fields(name: str) -> dict[str, Any]:
    """The configurable fields of model ``name`` and their defaults."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return {f.name: f.default for f in dataclasses.fields(MODELS[name])
            if f.init and f.name not in _NOT_CONFIG}


def extra_fields(name: str) -> dict[str, Any]:
    """The fields of model ``name`` that not every architecture has (e.g. FCN's
    ``dropout_rate``), with their defaults."""
    shared = set(model_fields("unet")) & set(model_fields("fcn")) & set(
        model_fields("attention_unet"))
    return {k: v for k, v in model_fields(name).items() if k not in shared}


def _plain(value: Any) -> Any:
    """Config values as the modules take them: lists -> tuples (nested)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def from_config(section: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``Model(**config.model)``: the network named by ``section["name"]`` with every other
    entry of the section as a field; an entry the model does not have is refused with
    the valid names."""
    fields = dict(section)
    name = fields.pop("name")
    valid = model_fields(name)  # also refuses an unknown name
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"config.model.{unknown[0]}: {name} has no field {unknown[0]!r}; "
                         f"valid: name, {', '.join(sorted(valid))}")
    kwargs = {k: _plain(v) for k, v in fields.items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return MODELS[name](num_classes=num_classes, **kwargs)


def figure_maps(model: nn.Module, variables: Any, x: jax.Array) -> dict[str, np.ndarray]:
    """The maps the model shows beside its predictions (``FIGURE_MAPS``), ``{title: (B,
    *spatial, 1) float32}``; empty (and nothing is run) for a model that has none."""
    wanted = getattr(type(model), "FIGURE_MAPS", {})
    if not wanted:
        return {}
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    inter = state.get("intermediates", {})
    out = {}
    for key, title in wanted.items():
        value = inter.get(key)
        if value is not None:
            out[title] = np.asarray(value[0] if isinstance(value, tuple) else value, np.float32)
    return out


def count_params(params: Any) -> int:
    """Number of scalars in a params pytree (a full variables dict counts its "params" only)."""
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))


def init_model(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """Initialises ``model`` (train=False, jitted) on zeros of batch size 1: its
    ``params`` (and ``batch_stats``).

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
    # Values sown during init (intermediates, deep-supervision logits) are not variables.
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
