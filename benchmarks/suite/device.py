"""The stages that measure the device alone, on random inputs: ``env`` (versions,
devices, the package's imports), ``layers`` (transposed conv and max pool alone, per U-Net
level, layer_impl reshape vs lax) and ``throughput`` (the package's train step, measured
by ``medseg_jax.tools.throughput``). Worker side: jax is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import sys
import time

from suite.common import log
from suite.configs import throughput_config

VERSIONS_OF = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
               "orbax-checkpoint", "grain", "array-record", "nibabel", "ml-collections",
               "numpy", "scipy", "torch", "absl-py")


def run_env(item: dict, opts: dict, scratch: str) -> dict:
    """Versions, the device and its peaks; imports the training module (grain, orbax,
    nibabel, ml_collections) so a missing dependency fails here first."""
    import importlib.metadata as md  # noqa: PLC0415

    versions = {}
    for name in VERSIONS_OF:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    import jax  # noqa: PLC0415

    from medseg_jax import train  # noqa: F401, PLC0415 (grain, orbax, nibabel, ml_collections)
    from medseg_jax.tools import throughput  # noqa: PLC0415

    dev = jax.devices()[0]
    try:
        mem = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001
        mem = {}
    out = {"python": sys.version.split()[0], "versions": versions,
           "backend": jax.default_backend(), "device_kind": dev.device_kind,
           "devices": jax.device_count(), "device_memory_gib": (
               mem.get("bytes_limit", 0) / 2**30 or None),
           "peak_tflops_bf16": (throughput.peak_flops(dev.device_kind, "bfloat16") or 0) / 1e12
           or None,
           "peak_tflops_fp32": (throughput.peak_flops(dev.device_kind, "float32") or 0) / 1e12
           or None,
           "jax_default_matmul_precision": str(getattr(jax.config,
                                                       "jax_default_matmul_precision", None)),
           "compilation_cache_dir": str(getattr(jax.config, "jax_compilation_cache_dir", None))}
    log(json.dumps(out, indent=1))
    return out


def _time_calls(fn, args, reps: int) -> float:
    """Seconds per call: ``reps`` calls queued back to back, then one wait (3 tries, min).
    (Not ``timing.StepTimer.time``, which waits after every call: a layer alone is
    short enough that the wait would be most of what is timed.)"""
    import jax  # noqa: PLC0415

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def _layer_fn(layer: str, impl: str, features: int, dims: int, dtype, key, x):
    """The layer as a function, its arguments and the ones to differentiate."""
    from medseg_jax.models import layers  # noqa: PLC0415

    if layer == "up_conv":
        mod = layers.UpConv(features, dims, dtype, impl=impl)
        params = mod.init(key, x)

        def f(p, x):
            """The transposed convolution."""
            return mod.apply(p, x)
        return f, (params, x), (0, 1)

    def g(x):
        """The max pool."""
        return layers.max_pool(x, dims, None, impl)
    return g, (x,), (0,)


def _layer_row(layer: str, level: int, shape: tuple, features: int, item: dict, dtype,
               reps: int) -> dict:
    """One layer at one level: compile time, forward and forward + backward ms per
    layer_impl, how far the two outputs differ, the faster one."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    key = jax.random.key(0)
    x = jax.random.normal(key, shape, jnp.float32).astype(dtype)
    row = {"layer": layer, "level": level, "input": list(shape)}
    outs = {}
    for impl in ("reshape", "lax"):
        f, args, argnums = _layer_fn(layer, impl, features, item["dims"], dtype, key, x)
        ct = jax.random.normal(jax.random.key(1), jax.eval_shape(f, *args).shape,
                               jnp.float32).astype(dtype)

        def loss(*a, f=f, ct=ct):
            """A weighted sum of the output: its gradient is the backward pass."""
            return jnp.sum(f(*a).astype(jnp.float32) * ct.astype(jnp.float32))

        t = time.perf_counter()
        fwd = jax.jit(f).lower(*args).compile()
        both = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()
        row[f"{impl}_compile_s"] = time.perf_counter() - t
        row[f"{impl}_fwd_ms"] = 1e3 * _time_calls(fwd, args, reps)
        row[f"{impl}_fwd_bwd_ms"] = 1e3 * _time_calls(both, args, reps)
        outs[impl] = np.asarray(fwd(*args), np.float32)
    scale = max(float(np.abs(outs["lax"]).max()), 1e-12)
    row["max_rel_diff"] = float(np.abs(outs["reshape"] - outs["lax"]).max() / scale)
    row["winner"] = min(("reshape", "lax"), key=lambda i: row[f"{i}_fwd_bwd_ms"])
    log(f"  {layer} level {level} {tuple(shape)} {item['dtype']}: fwd+bwd reshape "
        f"{row['reshape_fwd_bwd_ms']:.3f} ms, lax {row['lax_fwd_bwd_ms']:.3f} ms -> "
        f"{row['winner']} (outputs differ by {row['max_rel_diff']:.1e})")
    return row


def run_layers(item: dict, opts: dict, scratch: str) -> dict:
    """UpConv and max_pool alone at each U-Net level: forward and forward + backward."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    depth, batch = item["depth"], item["batch"]
    dtype = jnp.bfloat16 if item["dtype"] == "bfloat16" else jnp.float32
    feats = [item["base"] * 2**i for i in range(depth)]
    sizes = [[s // 2**i for s in item["image_size"]] for i in range(depth)]
    reps = 3 if opts["dry_run"] else 10
    rows = []
    for layer in ("up_conv", "max_pool"):
        for level in range(depth - 1):
            if layer == "up_conv":  # level+1 -> level, as in the decoder
                shape = (batch, *sizes[level + 1], feats[level + 1])
            else:  # level -> level+1, as in the encoder
                shape = (batch, *sizes[level], feats[level])
            rows.append(_layer_row(layer, level, shape, feats[level], item, dtype, reps))
    totals = {}
    for layer in ("up_conv", "max_pool"):
        t = {impl: sum(r[f"{impl}_fwd_bwd_ms"] for r in rows if r["layer"] == layer)
             for impl in ("reshape", "lax")}
        totals[layer] = dict(t, winner=min(t, key=t.get))
    return {"rows": rows, "totals": totals, "device": jax.devices()[0].device_kind}


def run_throughput(item: dict, opts: dict, scratch: str) -> dict:
    """The package's jitted train step on one random batch (augmentation as configured),
    measured by tools.throughput.measure: the tool's own row."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.models import count_params  # noqa: PLC0415
    from medseg_jax.tools import throughput  # noqa: PLC0415

    config = throughput_config(item)
    num_classes, channels = 3, 1  # Hippocampus-like
    mesh = sharding.make_mesh(jax.devices()[:1])
    t = time.perf_counter()
    setup = state_lib.initialize(config, num_classes, channels, 1000, mesh)
    state, train_fn, shape = setup.state, setup.train_fn, setup.input_shape
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    params = jax.device_get(state.params)  # before the state is donated
    rng = np.random.default_rng(0)
    batch = sharding.to_global(
        {"image": rng.standard_normal(shape).astype(np.float32),
         "label": rng.integers(0, num_classes, shape[:-1]).astype(np.int32)}, mesh)
    holder = {"state": state}

    def run(compiled):
        """One step of the compiled train step, waited for."""
        holder["state"], holder["out"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["out"])

    steps, warmup = (2, 1) if opts["dry_run"] else (10, 2)
    row = throughput.measure("train step", train_fn, (state, batch), item["batch"], run,
                             config, steps, warmup)
    loss = float(jax.device_get(holder["out"]["loss"]))  # (train_fn itself would recompile)
    row.update(init_s=init_s, augment=bool(config.augment.enabled),
               loss_finite=bool(np.isfinite(loss)), params=count_params(params),
               xla_flags=os.environ.get("XLA_FLAGS", ""), device=jax.devices()[0].device_kind)
    log(f"  {item['id']}: compile {row['compile_s']:.1f} s, step {row['step_ms']:.2f} ms, "
        f"{row['images_per_s']:.1f} images/s, MFU "
        f"{'n/a' if row['mfu'] is None else format(100 * row['mfu'], '.1f') + '%'}")
    return {"rows": [row]}
