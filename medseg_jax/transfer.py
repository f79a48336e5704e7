"""Transfer learning: start from another run's best checkpoint, optionally with the
encoder frozen for the first epochs.

``train.init_from=OTHER_WORKDIR`` copies every parameter (the averaged ones of a run
with ``train.ema_decay``) and BatchNorm statistic of the other run's best checkpoint
whose path and shape match the new model: the same architecture trained on another
modality or data set transfers everything but, when the number of classes differs,
the output layer, which keeps its fresh initialisation. The optimizer state starts fresh.
``train.freeze_encoder_epochs=N`` keeps the encoder (the ``enc_*`` blocks, the
contracting path of all three architectures) fixed for the first N epochs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import sharding

ENCODER_PREFIX = "enc_"


def _restore_as_saved(directory: str, step: int) -> dict:
    """The ``state`` item of a checkpoint, restored with its own shapes onto one device."""
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree)
    restored = checkpointer.restore(path, abstract)
    checkpointer.close()
    return restored


def _name(path) -> str:
    """``enc_0/Conv_0/kernel`` for a pytree key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat(tree) -> dict[str, object]:
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_pretrained(state, source_workdir: str, mesh):
    """``state`` with the matching params / batch_stats of ``source_workdir``'s best checkpoint.

    Returns ``(state, summary)``. Raises ValueError naming the folder when it
    holds no checkpoint, or when fewer than half of the parameter arrays match
    (another architecture, width or depth).
    """
    directory = os.path.join(source_workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"config.train.init_from: {directory} not found: "
                                f"{source_workdir} holds no training run")
    with ckpt_lib.Checkpointer(directory, read_only=True) as reader:
        step = reader.resolve("best")
        reader.verify(step)  # its files as saved (CheckpointDamaged naming it otherwise)
    source = _restore_as_saved(directory, step)
    repl = sharding.replicated(mesh)
    copied, kept, total = [], [], 0
    new = {}
    for collection in ("params", "batch_stats"):
        # The averaged weights of a run with train.ema_decay: those it evaluates.
        saved = "ema_params" if collection == "params" and source.get("ema_params") else collection
        src = _flat(source.get(saved, {}))

        def take(path, leaf, src=src, collection=collection):
            nonlocal total
            name = _name(path)
            total += 1
            other = src.get(name)
            if other is not None and tuple(other.shape) == tuple(leaf.shape):
                copied.append(f"{collection}/{name}")
                return jax.device_put(np.asarray(other, dtype=leaf.dtype), repl)
            why = "absent" if other is None else f"shape {tuple(other.shape)} != {leaf.shape}"
            kept.append(f"{collection}/{name} ({why})")
            return leaf

        new[collection] = jax.tree_util.tree_map_with_path(take, getattr(state, collection))
    n_params = len(jax.tree.leaves(state.params))
    n_copied = sum(c.startswith("params/") for c in copied)
    if n_copied * 2 < n_params:
        raise ValueError(f"config.train.init_from: only {n_copied} of {n_params} parameter "
                         f"arrays of {source_workdir} (step {step}) match this model by name "
                         "and shape: another architecture, width or depth?")
    summary = {"source": source_workdir, "step": int(step), "copied": len(copied),
               "total": total, "kept_fresh": kept}
    logging.info("Initialised %d of %d arrays from %s (best checkpoint, step %d)%s",
                 len(copied), total, source_workdir, step,
                 f"; kept fresh: {', '.join(kept)}" if kept else "")
    return state.replace(params=new["params"], batch_stats=new["batch_stats"]), summary


def freeze_encoder(old, new, frozen):
    """``new`` with its top-level ``enc_*`` entries taken from ``old`` where ``frozen``."""
    return {k: (jax.tree.map(lambda a, b: jnp.where(frozen, a, b), old[k], v)
                if k.startswith(ENCODER_PREFIX) else v)
            for k, v in new.items()}


def zero_encoder(grads, frozen):
    """``grads`` with the encoder's entries zeroed where ``frozen`` (no Adam moments build up)."""
    return freeze_encoder(jax.tree.map(jnp.zeros_like, grads), grads, frozen)
