"""The package configs of the suite's items, and ``--check_plan``: the GPU plan checked
without a GPU (every config validated, every throughput case's train step traced at full
size). Imports the package (and so its dependencies) inside the functions only.
"""

from __future__ import annotations

import os
import runpy

from suite import plan
from suite.common import REPO, log


def load_config(model: str):
    """The config of ``configs/<model>.py``, as the command line would load it."""
    return runpy.run_path(os.path.join(REPO, "configs", f"{model}.py"))["get_config"]()


def throughput_config(item: dict):
    """The validated config of a throughput case (the model's own config, resized)."""
    from medseg_jax import config as config_lib  # noqa: PLC0415

    config = load_config(item["model"])
    config.model.spatial_dims = item["dims"]
    config.data.image_size = tuple(item["image_size"])
    config.model.base_features, config.model.depth = item["base"], item["depth"]
    config.model.dtype, config.model.layer_impl = item["dtype"], item["impl"]
    config.train.batch_size = config.eval.batch_size = item["batch"]
    config_lib.validate(config)
    return config


def item_config(item: dict, root: str = "", dry: bool = False):
    """The validated config of a pipeline or time-to-accuracy item (on ``root``; toy
    synthetic data with ``dry``)."""
    from medseg_jax import config as config_lib  # noqa: PLC0415

    config = config_lib.default_config()
    config.data.root = root
    if dry:
        config.data.synthetic_cases, config.data.synthetic_size = 4, 32
        config.data.synthetic_depth = 16
    config.model.name = item["model"]
    config.model.spatial_dims = len(item["image_size"])
    config.model.base_features, config.model.depth = item["base"], item["depth"]
    config.model.dtype = item.get("dtype", "float32")
    config.data.image_size = tuple(item["image_size"])
    config.data.in_plane = item.get("in_plane", "resize")
    config.data.target_spacing = tuple(item.get("target_spacing", ()))
    config.train.batch_size = config.eval.batch_size = item["batch"]
    config_lib.validate(config)
    return config


def check_plan(opts: dict) -> None:
    """Checks the GPU plan here, without a GPU: every throughput case's config is valid and
    its train step traces at full size (jax.eval_shape), every pipeline and time-to-accuracy
    config validates. Prints one line per item; exits 1 on the first error."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415

    mesh = sharding.make_mesh(jax.devices()[:1])
    for item in plan.throughput_items(False):
        config = throughput_config(item)
        setup = state_lib.initialize(config, 3, 1, 1000, mesh, abstract=True)
        shape = setup.input_shape
        batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32),
                 "label": jax.ShapeDtypeStruct(shape[:-1], jnp.int32)}
        out = jax.eval_shape(setup.train_fn, setup.state, batch)[1]
        log(f"plan ok: throughput {item['id']}: loss {out['loss'].shape} {out['loss'].dtype}")
    for item in plan.pipeline_items(False, opts) + [
            dict(plan.time_to_accuracy_overrides(opts, False), id="time_to_accuracy",
                 model="unet", workers=[0])]:
        config = item_config(item)
        log(f"plan ok: {item['id']}: {config.model.spatial_dims}D {tuple(item['image_size'])} "
            f"x {item['batch']}")
    for item in plan.layer_items(False):
        assert all(s % 2 ** (item["depth"] - 1) == 0 for s in item["image_size"]), item
    log(f"plan ok: {len(plan.layer_items(False))} layer items, "
        f"{len(plan.torch_items(False))} torch items")
