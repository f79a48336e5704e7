"""The GPU benchmark suite (issue 15): every figure the README's GPU rows need, in one run.

  benchmarks/gpu_suite.sh OUTDIR [--dry_run] [flags below]     # set-up, then this script
  python benchmarks/gpu_suite.py --outdir=OUTDIR [--dry_run]    # when the set-up is done

Stages, in this order, each in its own worker process with its own time limit (an error,
a crash or a timeout of one item is recorded and the rest go on):

  env               versions, devices, the package's imports (grain, nibabel, ml_collections)
  layers            transposed conv and max pool alone (forward + backward, each U-Net level),
                    layer_impl reshape vs lax: the faster one per layer and level
  throughput        train step of U-Net / FCN / Attention U-Net, 2D (base 32, 256x256, batch 32)
                    and 3D (base 32, 128^3, batch 2), float32 / bfloat16, layer_impl auto /
                    reshape / lax (random batches; compile time, step time, images/s,
                    TFLOP/s, MFU, peak memory), in priority order until the stage's time is up
  torch_compare     benchmarks/torch_compare.py --device=cuda: the same U-Net in PyTorch (eager
                    float32, channels-last bf16 autocast, torch.compile) against JAX float32 /
                    bfloat16; skipped, with the reason, when PyTorch is absent
  pipeline          the real Hippocampus (2D slices and 3D patches) and HC18 loaders with 0 and
                    N grain workers against the train step that consumes them
  time_to_accuracy  a 3D U-Net trained on Hippocampus (python -m medseg_jax.main) until the
                    validation Dice reaches --target_dice or the time budget ends: Dice vs time

OUTDIR/gpu_suite.json (all figures) and OUTDIR/gpu_suite.md (tables for the README) are
rewritten after every item, so a run cut short keeps what it measured. The time limits
add up to --total_s (default 540 s; a stage's unused time passes to the next ones).
``--dry_run``: every stage on the CPU at toy sizes (the embedded synthetic data unless data
roots are given), in about two minutes; ``tests/test_gpu_suite.py`` runs it.

Worker processes: ``--worker=STAGE --items=...`` (internal).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "layers", "throughput", "torch_compare", "pipeline", "time_to_accuracy")
# XLA's fusion autotuner has taken minutes (and crashed) on 3D grids (anchors.md,
# tue-bmd/zea#599); a flag this XLA does not know would abort every process, so each is
# probed first and dropped if refused.
DEFAULT_XLA_FLAGS = "--xla_gpu_experimental_enable_fusion_autotuner=false"


# ======================================================================================
# The plan: what each stage runs, at GPU sizes or dry-run sizes.

# The dry run checks that every stage works, not how fast: its limits are generous, so a
# slow or loaded CI machine (seen: four times slower than this one) does not turn a
# working stage into a timeout. It takes about two minutes here.
DRY_TOTAL_S, DRY_ENV_S, DRY_ITEM_S = 3000.0, 300.0, 600.0


def throughput_items(dry: bool) -> list[dict]:
    """Priority order: the stage runs them until its time is up."""
    if dry:
        d2 = {"dims": 2, "image_size": [32, 32], "batch": 2, "base": 4, "depth": 3}
        d3 = {"dims": 3, "image_size": [16, 16, 16], "batch": 1, "base": 4, "depth": 3}
    else:
        d2 = {"dims": 2, "image_size": [256, 256], "batch": 32, "base": 32, "depth": 4}
        d3 = {"dims": 3, "image_size": [128, 128, 128], "batch": 2, "base": 32, "depth": 4}
    order = [  # (model, dims, dtype, layer_impl)
        ("unet", d2, "bfloat16", "auto"), ("unet", d3, "bfloat16", "auto"),
        ("unet", d2, "bfloat16", "lax"), ("unet", d2, "bfloat16", "reshape"),
        ("unet", d3, "bfloat16", "lax"), ("unet", d3, "bfloat16", "reshape"),
        ("unet", d2, "float32", "auto"), ("fcn", d2, "bfloat16", "auto"),
        ("attention_unet", d2, "bfloat16", "auto"), ("unet", d3, "float32", "auto"),
        ("fcn", d3, "bfloat16", "auto"), ("attention_unet", d3, "bfloat16", "auto"),
    ]
    if dry:  # every model, both dims, both dtypes and all three layer_impl values
        order = [order[i] for i in (0, 3, 2, 8)] + [("fcn", d3, "float32", "auto")]
    items = []
    for model, geo, dtype, impl in order:
        item_id = f"{model}-{geo['dims']}d-{'bf16' if dtype == 'bfloat16' else 'fp32'}-{impl}"
        items.append(dict(geo, id=item_id, model=model, dtype=dtype, impl=impl,
                          limit_s=(DRY_ITEM_S if dry else (100 if geo["dims"] == 2 else 170)),
                          group="all" if dry else item_id))  # GPU: a process per case
    return items


def layer_items(dry: bool) -> list[dict]:
    geo = throughput_items(dry)
    d2 = next(g for g in geo if g["dims"] == 2)
    d3 = next(g for g in geo if g["dims"] == 3)
    items = []
    for geo_, dtype in ((d2, "bfloat16"), (d3, "bfloat16"), (d2, "float32"), (d3, "float32")):
        if dry and dtype == "float32":
            continue
        items.append({"id": f"{geo_['dims']}d-{'bf16' if dtype == 'bfloat16' else 'fp32'}",
                      "dims": geo_["dims"], "dtype": dtype, "image_size": geo_["image_size"],
                      "batch": geo_["batch"], "base": geo_["base"], "depth": geo_["depth"],
                      "limit_s": DRY_ITEM_S if dry else 60, "group": "all"})
    return items


def torch_items(dry: bool) -> list[dict]:
    if dry:
        net = ["--base_features=4", "--depth=3", "--image_size=32", "--batch_size=2",
               "--rounds=1", "--steps=1", "--warmup=0", "--device=cpu"]
        backend = "--torch_compile_backend=aot_eager"  # the path, without C++ code generation
    else:
        net = ["--base_features=32", "--depth=4", "--image_size=256", "--batch_size=32",
               "--rounds=3", "--steps=5", "--warmup=2", "--device=cuda"]
        backend = "--torch_compile_backend=inductor"
    return [
        {"id": "eager", "limit_s": DRY_ITEM_S if dry else 100, "group": "all",
         "args": net + ["--jax_variants=float32,bfloat16",
                        "--torch_variants=eager,channels_last,channels_last_bf16"]},
        # torch.compile apart: its compilation can be long; JAX bf16 again (from the
        # persistent compilation cache) for a ratio measured in the same process.
        {"id": "compile", "limit_s": DRY_ITEM_S if dry else 120, "group": "all",
         "args": net + ["--jax_variants=bfloat16", "--torch_variants=compile_bf16", backend]},
    ]


def pipeline_items(dry: bool, opts: dict) -> list[dict]:
    workers = [0, 2] if dry else [0, max(1, min(8, (os.cpu_count() or 2) // 2))]
    hip, hc18 = opts["hippocampus_root"], opts["hc18_root"]
    if dry:
        return [
            {"id": "hippocampus-2d", "root": hip, "image_size": [32, 32], "batch": 4,
             "in_plane": "resize", "workers": workers, "model": "unet", "base": 4, "depth": 3},
            {"id": "hippocampus-3d", "root": hip, "image_size": [16, 16, 16], "batch": 2,
             "workers": workers[:1], "model": "unet", "base": 4, "depth": 3},
            {"id": "hc18-2d-spacing", "root": hc18, "image_size": [32, 32], "batch": 4,
             "in_plane": "spacing", "target_spacing": [3.0, 3.0], "workers": workers[:1],
             "model": "unet", "base": 4, "depth": 3},
        ]
    tta = time_to_accuracy_overrides(opts, dry)
    return [  # the README's configurations: Hippocampus 2D, the 3D run below, HC18 spacing
        {"id": "hippocampus-2d", "root": hip, "image_size": [64, 64], "batch": 16,
         "in_plane": "resize", "workers": workers, "model": "unet", "base": 16, "depth": 4},
        {"id": "hippocampus-3d", "root": hip, "image_size": list(tta["image_size"]),
         "batch": tta["batch"], "workers": workers, "model": "unet", "base": tta["base"],
         "depth": 4, "dtype": tta["dtype"]},
        {"id": "hc18-2d-spacing", "root": hc18, "image_size": [128, 128], "batch": 16,
         "in_plane": "spacing", "target_spacing": [0.75, 0.75], "workers": workers,
         "model": "unet", "base": 16, "depth": 4},
    ]


def time_to_accuracy_overrides(opts: dict, dry: bool) -> dict:
    if dry:
        return {"image_size": (16, 16, 16), "batch": 2, "base": 4, "depth": 3,
                "dtype": "float32", "steps_per_epoch": 3}
    # nnU-Net's Hippocampus 3D patch (40, 56, 40); batch 8 (nnU-Net: 9), bf16.
    return {"image_size": (40, 56, 40), "batch": 8, "base": 32, "depth": 4,
            "dtype": "bfloat16", "steps_per_epoch": 100}


def make_plan(opts: dict) -> dict:
    """Stages, their items and time limits: env a fixed 30 s on a GPU (``DRY_ENV_S`` in a
    dry run), the selected others their nominal shares scaled to what is left of
    ``total_s``."""
    dry = opts["dry_run"]
    env_limit = DRY_ENV_S if dry else 30.0
    nominal = dict(zip(STAGES[1:], (40, 120, 120, 90, 90) if dry else (40, 170, 110, 70, 120)))
    items = {
        "env": [{"id": "versions", "limit_s": env_limit, "group": "all"}],
        "layers": layer_items(dry),
        "throughput": throughput_items(dry),
        "torch_compare": torch_items(dry),
        "pipeline": [dict(it, limit_s=DRY_ITEM_S if dry else 70, group="all")
                     for it in pipeline_items(dry, opts)],
        "time_to_accuracy": [{"id": "unet-3d-hippocampus", "limit_s": 10_000, "group": "all",
                              **time_to_accuracy_overrides(opts, dry)}],
    }
    selected = [s for s in STAGES[1:] if s in opts["stages"]]
    scale = max(0.0, opts["total_s"] - env_limit) / max(1, sum(nominal[s] for s in selected))
    limits = {"env": env_limit, **{s: nominal[s] * scale for s in selected}}
    return {"options": opts,
            "stages": {s: {"limit_s": limits[s], "items": items[s]}
                       for s in STAGES if s in opts["stages"]}}


# ======================================================================================
# Worker side: the stages' measurements (jax and the package imported here only).


def write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def log(msg: str) -> None:
    print(msg, flush=True)


def load_config(model: str):
    import runpy  # noqa: PLC0415

    return runpy.run_path(os.path.join(REPO, "configs", f"{model}.py"))["get_config"]()


def run_env(item: dict, opts: dict, scratch: str) -> dict:
    import importlib.metadata as md  # noqa: PLC0415

    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                 "orbax-checkpoint", "grain", "array-record", "nibabel", "ml-collections",
                 "numpy", "scipy", "torch", "absl-py"):
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
    """Seconds per call: ``reps`` calls queued back to back, then one wait (3 tries, min)."""
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


def run_layers(item: dict, opts: dict, scratch: str) -> dict:
    """UpConv and max_pool alone at each U-Net level: forward and forward + backward."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from medseg_jax.models import layers  # noqa: PLC0415

    dims, depth, batch = item["dims"], item["depth"], item["batch"]
    dtype = jnp.bfloat16 if item["dtype"] == "bfloat16" else jnp.float32
    feats = [item["base"] * 2**i for i in range(depth)]
    sizes = [[s // 2**i for s in item["image_size"]] for i in range(depth)]
    reps = 3 if opts["dry_run"] else 10
    key = jax.random.key(0)
    rows = []
    for layer in ("up_conv", "max_pool"):
        for level in range(depth - 1):
            if layer == "up_conv":  # level+1 -> level, as in the decoder
                shape = (batch, *sizes[level + 1], feats[level + 1])
            else:  # level -> level+1, as in the encoder
                shape = (batch, *sizes[level], feats[level])
            x = jax.random.normal(key, shape, jnp.float32).astype(dtype)
            row = {"layer": layer, "level": level, "input": list(shape)}
            outs = {}
            for impl in ("reshape", "lax"):
                if layer == "up_conv":
                    mod = layers.UpConv(feats[level], dims, dtype, impl=impl)
                    params = mod.init(key, x)

                    def f(p, x, mod=mod):
                        return mod.apply(p, x)
                    args = (params, x)
                    argnums = (0, 1)
                else:
                    def f(x, impl=impl):
                        return layers.max_pool(x, dims, None, impl)
                    args = (x,)
                    argnums = (0,)
                ct = jax.random.normal(jax.random.key(1), jax.eval_shape(f, *args).shape,
                                       jnp.float32).astype(dtype)

                def loss(*a, f=f, ct=ct):
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
            rows.append(row)
            log(f"  {layer} level {level} {tuple(shape)} {item['dtype']}: fwd+bwd reshape "
                f"{row['reshape_fwd_bwd_ms']:.3f} ms, lax {row['lax_fwd_bwd_ms']:.3f} ms -> "
                f"{row['winner']} (outputs differ by {row['max_rel_diff']:.1e})")
    totals = {}
    for layer in ("up_conv", "max_pool"):
        t = {impl: sum(r[f"{impl}_fwd_bwd_ms"] for r in rows if r["layer"] == layer)
             for impl in ("reshape", "lax")}
        totals[layer] = dict(t, winner=min(t, key=t.get))
    return {"rows": rows, "totals": totals, "device": jax.devices()[0].device_kind}


def throughput_config(item: dict):
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

    from medseg_jax import sharding, train  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415

    mesh = sharding.make_mesh(jax.devices()[:1])
    for item in throughput_items(False):
        config = throughput_config(item)
        model = state_lib.build_model(config, 3)
        shape = (item["batch"], *item["image_size"], 1)
        state = state_lib.abstract_state(config, model, shape, 1000, mesh)
        train_fn, _ = train.jit_steps(config, mesh, 3)
        batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32),
                 "label": jax.ShapeDtypeStruct(shape[:-1], jnp.int32)}
        out = jax.eval_shape(train_fn, state, batch)[1]
        log(f"plan ok: throughput {item['id']}: loss {out['loss'].shape} {out['loss'].dtype}")
    for item in pipeline_items(False, opts) + [
            dict(time_to_accuracy_overrides(opts, False), id="time_to_accuracy",
                 model="unet", workers=[0])]:
        config = item_config(item)
        log(f"plan ok: {item['id']}: {config.model.spatial_dims}D {tuple(item['image_size'])} "
            f"x {item['batch']}")
    for item in layer_items(False):
        assert all(s % 2 ** (item["depth"] - 1) == 0 for s in item["image_size"]), item
    log(f"plan ok: {len(layer_items(False))} layer items, {len(torch_items(False))} torch items")


def run_throughput(item: dict, opts: dict, scratch: str) -> dict:
    """The package's jitted train step on one random batch (augmentation as configured),
    measured by tools.throughput.measure: the tool's own row."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from medseg_jax import sharding, train  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.models import count_params  # noqa: PLC0415
    from medseg_jax.tools import throughput  # noqa: PLC0415

    config = throughput_config(item)
    num_classes, channels = 3, 1  # Hippocampus-like
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = state_lib.build_model(config, num_classes)
    shape = (item["batch"], *item["image_size"], channels)
    t = time.perf_counter()
    state = state_lib.init_state(config, model, shape, 1000, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    params = jax.device_get(state.params)  # before the state is donated
    train_fn, _ = train.jit_steps(config, mesh, num_classes)
    rng = np.random.default_rng(0)
    batch = sharding.to_global(
        {"image": rng.standard_normal(shape).astype(np.float32),
         "label": rng.integers(0, num_classes, shape[:-1]).astype(np.int32)}, mesh)
    holder = {"state": state}

    def run(compiled):
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


def run_torch_compare(item: dict, opts: dict, scratch: str) -> dict:
    try:
        have_torch = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        have_torch = False
    if not have_torch:
        return {"status": "skipped", "reason": "PyTorch is not installed (pip install -e "
                "'.[torch]'; on the GPU machine the image's torch is used)"}
    out = os.path.join(scratch, "partial", "torch_compare", f"{item['id']}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "torch_compare.py"),
           *item["args"], f"--json_out={out}"]
    log("  $ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT, check=False)
    report = read_json(out, {})
    if proc.returncode != 0:
        if report.get("skipped"):
            return {"status": "skipped", "reason": report["skipped"]}
        return {"status": "failed", "reason": f"torch_compare.py exited {proc.returncode}",
                "partial": report}
    return report


def _host_rate(train_s, config, mesh, workers: int, batches: int, warmup: int,
               seconds: float) -> dict:
    """Host batches (+ transfer to the device) per second from the training loader."""
    import jax  # noqa: PLC0415

    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax.data import loader  # noqa: PLC0415

    cfg = config.copy_and_resolve_references()
    cfg.data.num_workers = workers
    t0 = time.perf_counter()
    it = loader.run_batches(train_s, cfg, warmup + batches, 0, warmup + batches)
    n, first = 0, None
    try:
        for i in range(warmup + batches):
            host = next(it)
            jax.block_until_ready(sharding.to_global(host, mesh))
            if first is None:
                first = time.perf_counter() - t0
            if i + 1 == warmup:
                start = time.perf_counter()
            elif i + 1 > warmup:
                n += 1
                if time.perf_counter() - start > seconds:
                    break
        total = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    b = config.train.batch_size
    return {"workers": workers, "batches": n, "ms_per_batch": 1e3 * total / n,
            "images_per_s": n * b / total, "first_batch_s": first}


def run_pipeline(item: dict, opts: dict, scratch: str) -> dict:
    import jax  # noqa: PLC0415

    from absl import flags  # noqa: PLC0415

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    from medseg_jax import sharding, train  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.data import cache, loader  # noqa: PLC0415
    from medseg_jax.data.dataset import SPLITS  # noqa: PLC0415

    dry, root, note = opts["dry_run"], item.get("root") or "", ""
    if root and not os.path.isdir(root):
        if not dry:
            return {"status": "skipped", "reason": f"data not found at {root}: carry "
                    "data_carry/ (benchmarks/prepare_data_carry.sh) or pass the root flag"}
        note, root = f"{root} not found: embedded synthetic data", ""
    elif not root:
        if not dry:
            return {"status": "skipped", "reason": "no data root given: carry data_carry/ "
                    "(benchmarks/prepare_data_carry.sh) or pass --hippocampus_root / "
                    "--hc18_root"}
        note = "embedded synthetic data (no data root given)"
    work = os.path.join(scratch, "pipeline", item["id"])
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    convert_s = None
    if root and os.path.isdir(os.path.join(root, "training_set")):  # raw HC18: convert
        dst = os.path.join(work, "hc18_decathlon")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medseg_jax.tools.convert_hc18", f"--src={root}",
                        f"--dst={dst}"], check=True, stdout=subprocess.DEVNULL)
        convert_s, root = time.perf_counter() - t, dst
    config = item_config(item, root, dry)
    state_lib.setup_compilation_cache(config)  # the 3D step is shared with time_to_accuracy
    mesh = sharding.make_mesh(jax.devices()[:1])
    t = time.perf_counter()
    dataset, _, samples = cache.prepare(config, work)
    prepare_s = time.perf_counter() - t
    train_s = samples["train"]
    batches, seconds = (20, 1.0) if dry else (2000, 2.0)
    host = [_host_rate(train_s, config, mesh, w, batches, 5 if dry else 20, seconds)
            for w in item["workers"]]
    for h in host:
        log(f"  {item['id']}: {h['workers']} workers: {h['images_per_s']:,.0f} images/s "
            f"({h['ms_per_batch']:.2f} ms/batch, first batch {h['first_batch_s']:.2f} s)")
    # The train step of this configuration, on batches from the loader.
    model = state_lib.build_model(config, dataset.num_classes)
    shape = (item["batch"], *item["image_size"], dataset.num_channels)
    state = state_lib.init_state(config, model, shape, 1000, mesh)
    train_fn, _ = train.jit_steps(config, mesh, dataset.num_classes)
    cfg = config.copy_and_resolve_references()
    cfg.data.num_workers = 0
    it = loader.run_batches(train_s, cfg, 4, 0, 4)
    device_batches = [sharding.to_global(b, mesh) for b in it]
    holder = {"state": state}
    t = time.perf_counter()
    holder["state"], out = train_fn(holder["state"], device_batches[0])
    jax.block_until_ready(out)
    first_step_s = time.perf_counter() - t
    steps = 3 if dry else 20
    times = []
    for i in range(steps):
        t = time.perf_counter()
        holder["state"], out = train_fn(holder["state"], device_batches[i % 4])
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    step_ips = item["batch"] / step_s
    for h in host:
        h["host_over_step"] = h["images_per_s"] / step_ips
    best = max(host, key=lambda h: h["images_per_s"])
    log(f"  {item['id']}: train step {1e3 * step_s:.2f} ms = {step_ips:,.0f} images/s; best "
        f"host rate {best['host_over_step']:.1f}x that")
    return {"data": root or "synthetic", "note": note, "convert_s": convert_s,
            "prepare_s": prepare_s, "cases": {s: len(dataset.splits[s]) for s in SPLITS},
            "config": {"model": item["model"], "base": item["base"], "dtype":
                       config.model.dtype, "image_size": item["image_size"],
                       "batch": item["batch"], "in_plane": config.data.in_plane,
                       "spatial_dims": config.model.spatial_dims},
            "host": host, "step_ms": 1e3 * step_s, "step_images_per_s": step_ips,
            "step_first_s": first_step_s, "device": jax.devices()[0].device_kind}


def run_time_to_accuracy(item: dict, opts: dict, scratch: str) -> dict:
    """python -m medseg_jax.main on Hippocampus 3D, stopped (SIGTERM: the package saves a
    checkpoint and exits 143) when the validation Dice reaches the target or the budget
    ends; the Dice of every validation against the wall time since the command started."""
    dry, root, note = opts["dry_run"], opts["hippocampus_root"], ""
    budget, target = opts["tta_budget_s"], opts["target_dice"]
    if not (root and os.path.isdir(root)):
        if not dry:
            return {"status": "skipped", "reason": f"Hippocampus not found at {root!r}: carry "
                    "data_carry/ (benchmarks/prepare_data_carry.sh)"}
        note, root = "embedded synthetic data (no Hippocampus root)", ""
    work = os.path.join(scratch, "time_to_accuracy")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    size = ",".join(str(s) for s in item["image_size"])
    overrides = {
        "model.spatial_dims": 3, "data.image_size": f"({size})", "data.root": root,
        "model.base_features": item["base"], "model.depth": item["depth"],
        "model.dtype": item["dtype"], "train.batch_size": item["batch"],
        "eval.batch_size": item["batch"], "train.steps_per_epoch": item["steps_per_epoch"],
        "train.num_epochs": 100_000, "train.patience": 0, "train.log_every_steps": 50,
        "eval.figures": False, "train.tensorboard": False,
    }
    if dry:
        overrides.update({"data.synthetic_cases": 4, "data.synthetic_size": 32,
                          "data.synthetic_depth": 16, "train.log_every_steps": 1})
    cmd = [sys.executable, "-m", "medseg_jax.main", "--config=" + os.path.join(
        REPO, "configs", "unet.py"), f"--workdir={os.path.join(work, 'run')}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    log("  $ " + " ".join(shlex.quote(c) for c in cmd))
    log_path = os.path.join(work, "main.log")
    metrics = os.path.join(work, "run", "metrics.jsonl")
    t0 = time.time()
    curve, seen, reached, stop_reason = [], 0, None, None
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                rows = []
                try:
                    with open(metrics) as f:
                        rows = [json.loads(line) for line in f if line.strip()]
                except (OSError, ValueError):
                    pass
                for r in rows[seen:]:
                    if "val_dice" in r:
                        curve.append({"wall_s": time.time() - t0, "step": r["step"],
                                      "epoch": r["epoch"], "val_dice": r["val_dice"],
                                      "val_dice_per_class": r.get("val_dice_per_class"),
                                      "train_loss": r.get("train_loss"),
                                      "epoch_s": r.get("epoch_seconds")})
                        log(f"  {curve[-1]['wall_s']:6.1f} s step {r['step']}: val Dice "
                            f"{r['val_dice']:.4f}")
                        if reached is None and r["val_dice"] >= target:
                            reached = curve[-1]
                seen = len(rows)
                if reached and not stop_reason:
                    stop_reason = f"validation Dice {reached['val_dice']:.4f} >= {target}"
                elif time.time() - t0 > budget and not stop_reason:
                    stop_reason = f"time budget {budget:.0f} s"
                if stop_reason:
                    proc.send_signal(signal.SIGTERM)  # saves a checkpoint, exits 143
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.time() - t0
    with open(log_path) as f:
        text = f.read()
    first_step = next((line.split("took", 1)[1].split("s,")[0].strip()
                       for line in text.splitlines() if "First step" in line), None)
    if not curve and not stop_reason:
        return {"status": "failed", "reason": f"medseg_jax.main exited {proc.returncode} "
                "before any validation", "log_tail": text.splitlines()[-15:]}
    best = max((c["val_dice"] for c in curve), default=None)
    return {"data": root or "synthetic", "note": note, "command": " ".join(
                shlex.quote(c) for c in cmd), "target_dice": target, "budget_s": budget,
            "reached": reached is not None,
            "time_to_target_s": reached["wall_s"] if reached else None,
            "steps_to_target": reached["step"] if reached else None,
            "best_val_dice": best, "stop": stop_reason or f"exited {proc.returncode}",
            "exit_code": proc.returncode, "wall_s": wall,
            "first_step_s": float(first_step) if first_step else None, "curve": curve}


RUNNERS = {"env": run_env, "layers": run_layers, "throughput": run_throughput,
           "torch_compare": run_torch_compare, "pipeline": run_pipeline,
           "time_to_accuracy": run_time_to_accuracy}


def worker_main(stage: str, scratch: str, ids: list[str]) -> None:
    plan = read_json(os.path.join(scratch, "plan.json"))
    opts = plan["options"]
    items = {it["id"]: it for it in plan["stages"][stage]["items"]}
    group = items[ids[0]].get("group")
    progress = os.path.join(scratch, "progress", f"{stage}.json")
    for item_id in ids:
        item = items[item_id]
        if item.get("group") != group:
            break  # the next group gets a fresh process
        write_json(progress, {"item": item_id, "started": time.time()})
        log(f"[{stage}] {item_id}: start")
        t = time.time()
        slow = os.environ.get("GPU_SUITE_SLOW_STAGE", "")  # tests: "STAGE:SECONDS" per item
        if slow.partition(":")[0] == stage:
            time.sleep(float(slow.partition(":")[2]))
        try:
            result = RUNNERS[stage](item, opts, scratch) or {}
            result.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 (recorded; the next item runs)
            traceback.print_exc()
            result = {"status": "failed", "reason": f"{type(e).__name__}: "
                      f"{' '.join(str(e).split())[:500]}"}
        result["seconds"] = time.time() - t
        write_json(os.path.join(scratch, "results", stage, f"{item_id}.json"), result)
        log(f"[{stage}] {item_id}: {result['status']} in {result['seconds']:.1f} s"
            + (f" ({result['reason']})" if result.get("reason") else ""))
    write_json(progress, {"item": None})


# ======================================================================================
# Driver side: processes, limits, reports (no jax here).


class Suite:
    def __init__(self, opts: dict):
        self.opts = opts
        self.outdir = opts["outdir"]
        self.scratch = opts["scratch"]
        self.plan = make_plan(opts)
        self.t0 = time.time()
        self.report = {"suite": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "dry_run": opts["dry_run"], "command": opts["command"],
                                 "total_s": opts["total_s"]},
                       "setup": {}, "stages": {}}

    # -- reports -------------------------------------------------------------------
    def save(self) -> None:
        self.report["suite"]["elapsed_s"] = time.time() - self.t0
        self.report["summary"] = summarise(self.report)
        write_json(os.path.join(self.outdir, "gpu_suite.json"), self.report)
        text = markdown(self.report)
        path = os.path.join(self.outdir, "gpu_suite.md")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    # -- set-up ----------------------------------------------------------------------
    def setup(self) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        # One device is what the suite measures: drop fake CPU devices from a caller's flags.
        flags_in = [f for f in env.get("XLA_FLAGS", "").split()
                    if "xla_force_host_platform_device_count" not in f]
        if self.opts["dry_run"]:
            env["JAX_PLATFORMS"] = "cpu"
        def starts(flags: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-c", "import jax; print(jax.devices())"], capture_output=True,
                text=True, env=dict(env, XLA_FLAGS=" ".join(flags)), timeout=180, check=False)

        kept, dropped, start_error = [], [], None
        base = starts(flags_in)
        if base.returncode != 0:  # every stage will fail and say why; flags untested
            start_error = " | ".join((base.stdout + base.stderr).strip().splitlines()[-3:])
            log(f"set-up: JAX DOES NOT START: {start_error}")
            kept = self.opts["xla_flags"].split()
        else:
            log(f"set-up: jax devices: {base.stdout.strip()}")
            for flag in self.opts["xla_flags"].split():  # an unknown flag aborts XLA
                ok = starts(flags_in + kept + [flag]).returncode == 0
                (kept if ok else dropped).append(flag)
        env["XLA_FLAGS"] = " ".join(flags_in + kept)
        self.env = env
        info = {"xla_flags": env["XLA_FLAGS"], "xla_flags_dropped": dropped,
                "jax_start_error": start_error,
                "python": sys.version.split()[0], "platform": platform.platform(),
                "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                "load_average_start": list(os.getloadavg()), "nvidia_smi": nvidia_smi(),
                "git": git_commit(), "pythonpath": env["PYTHONPATH"]}
        log(f"set-up: XLA_FLAGS={env['XLA_FLAGS']!r}"
            + (f" (dropped, unknown to this XLA: {' '.join(dropped)})" if dropped else ""))
        log(f"set-up: {info['cpu_count']} CPU cores ({info['cpu']}), load average "
            f"{info['load_average_start']}")
        log("set-up: nvidia-smi:\n" + info["nvidia_smi"])
        self.report["setup"] = info
        return info

    # -- stages ----------------------------------------------------------------------
    def run(self) -> None:
        os.makedirs(self.outdir, exist_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        os.makedirs(self.scratch)
        write_json(os.path.join(self.scratch, "plan.json"), self.plan)
        for name, stage in self.plan["stages"].items():
            self.report["stages"][name] = {
                "status": "pending", "limit_s": stage["limit_s"],
                "items": {it["id"]: {"status": "pending"} for it in stage["items"]}}
        self.setup()
        self.save()
        carry = 0.0
        names = list(self.plan["stages"])
        for i, name in enumerate(names):
            stage = self.plan["stages"][name]
            left = self.opts["total_s"] - (time.time() - self.t0)
            later = sum(self.plan["stages"][n]["limit_s"] for n in names[i + 1:])
            limit = max(0.0, min(stage["limit_s"] + carry, left - 0.5 * later))
            if name == "time_to_accuracy":  # the training budget is what is left
                self.plan["options"]["tta_budget_s"] = self.opts["tta_budget_s"] = min(
                    self.opts["tta_budget_s"] or 1e9, max(10.0, limit - 45))
                write_json(os.path.join(self.scratch, "plan.json"), self.plan)
            t = time.time()
            self.run_stage(name, stage, limit)
            used = time.time() - t
            if name != "env":  # env's fixed minute is not shared out
                carry = max(0.0, stage["limit_s"] + carry - used)
        self.report["suite"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.report["setup"]["load_average_end"] = list(os.getloadavg())
        self.save()
        log(f"\nsuite done in {time.time() - self.t0:.0f} s: "
            + ", ".join(f"{n} {s['status']}" for n, s in self.report["stages"].items()))
        log(f"reports: {os.path.join(self.outdir, 'gpu_suite.json')}, "
            f"{os.path.join(self.outdir, 'gpu_suite.md')}")

    def record(self, stage: str, item_id: str, result: dict) -> None:
        self.report["stages"][stage]["items"][item_id] = result
        self.save()

    def collect(self, stage: str, pending: list[str]) -> list[str]:
        """Records the results written since the last call; returns what is still pending."""
        left = []
        for item_id in pending:
            result = read_json(os.path.join(self.scratch, "results", stage, f"{item_id}.json"))
            if result is None:
                left.append(item_id)
            else:
                self.record(stage, item_id, result)
        return left

    def run_stage(self, name: str, stage: dict, limit: float) -> None:
        items = {it["id"]: it for it in stage["items"]}
        pending = list(items)
        rep = self.report["stages"][name]
        rep.update(status="running", limit_s=limit)
        log(f"\n=== stage {name}: {len(pending)} item(s), limit {limit:.0f} s ===")
        t0 = time.time()
        deadline = t0 + limit
        log_path = os.path.join(self.scratch, "logs", f"{name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        progress = os.path.join(self.scratch, "progress", f"{name}.json")
        env = dict(self.env)
        if name == "torch_compare":  # JAX preallocates 75% of the GPU by default
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")
        while pending:
            if time.time() >= deadline - 2:
                for item_id in pending:
                    self.record(name, item_id, {"status": "skipped",
                                                "reason": "stage time limit reached"})
                break
            if os.path.exists(progress):
                os.remove(progress)
            cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}",
                   f"--scratch={self.scratch}", f"--items={','.join(pending)}"]
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO, start_new_session=True)
            tail = LogTail(log_path)
            killed = None
            while proc.poll() is None:
                time.sleep(0.5)
                tail.pump()
                pending = self.collect(name, pending)
                prog = read_json(progress, {}) or {}
                current = prog.get("item")
                now = time.time()
                if current and now - prog["started"] > items[current]["limit_s"]:
                    killed = (current, f"over its {items[current]['limit_s']} s limit")
                elif now > deadline:
                    killed = (current, "stage time limit reached")
                if killed:
                    stop_group(proc)
                    break
            proc.wait()
            tail.pump()
            pending = self.collect(name, pending)
            prog = read_json(progress, {}) or {}
            current = killed[0] if killed else prog.get("item")
            if current in pending:
                partial = read_json(os.path.join(self.scratch, "partial", name,
                                                 f"{current}.json"))
                if killed:
                    result = {"status": "timeout", "reason": killed[1]}
                else:
                    result = {"status": "failed", "reason": f"worker exited with status "
                              f"{proc.returncode}", "log_tail": tail.last_lines(15)}
                if partial:
                    result["partial"] = partial
                result["seconds"] = time.time() - prog.get("started", time.time())
                self.record(name, current, result)
                pending.remove(current)
            elif proc.returncode != 0 and pending and not killed:
                first = pending.pop(0)  # the worker died before starting it
                self.record(name, first, {"status": "failed", "reason": "worker exited "
                                          f"with status {proc.returncode} before it",
                                          "log_tail": tail.last_lines(15)})
        statuses = [r.get("status") for r in rep["items"].values()]
        rep["status"] = ("ok" if all(s == "ok" for s in statuses) else
                         "skipped" if all(s == "skipped" for s in statuses) else
                         "partial" if "ok" in statuses else "failed")
        rep["seconds"] = time.time() - t0
        self.save()
        log(f"=== stage {name}: {rep['status']} in {rep['seconds']:.0f} s ===")


class LogTail:
    """Copies a worker's log file to this process's stdout as it grows."""

    def __init__(self, path: str):
        self.path, self.pos = path, os.path.getsize(path) if os.path.exists(path) else 0
        self.start = self.pos

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if data:
            self.pos += len(data)
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()

    def last_lines(self, n: int) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                return f.read().decode("utf-8", "replace").splitlines()[-n:]
        except OSError:
            return []


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the worker's process group (its children too), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cpu_model() -> str:
    # As medseg_jax.workdir.cpu_model; this process must run before the package's
    # dependencies are installed (set-up), so it cannot import it.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi: not found (no NVIDIA driver on this machine)"
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ======================================================================================
# Summary and markdown.


def _ok_items(report: dict, stage: str) -> dict:
    items = report["stages"].get(stage, {}).get("items", {})
    return {k: v for k, v in items.items() if v.get("status") == "ok"}


def summarise(report: dict) -> dict:
    """Derived figures: the faster layer_impl per layer and per model, pipeline ratios."""
    out = {}
    layer_win = {}
    for item_id, r in _ok_items(report, "layers").items():
        for layer, t in r["totals"].items():
            layer_win[f"{layer} {item_id}"] = t["winner"]
    out["layer_impl_winner_per_layer"] = layer_win
    rows = {k: v["rows"][0] for k, v in _ok_items(report, "throughput").items()}
    model_win = {}
    for item_id in rows:
        if item_id.endswith("-reshape"):
            base = item_id[: -len("-reshape")]
            other = base + "-lax"
            if other in rows:
                a, b = rows[item_id]["step_ms"], rows[other]["step_ms"]
                model_win[base] = {"reshape_ms": a, "lax_ms": b,
                                   "auto_ms": rows.get(base + "-auto", {}).get("step_ms"),
                                   "winner": "reshape" if a < b else "lax",
                                   "lax_over_reshape": b / a}
    out["layer_impl_winner_per_model"] = model_win
    ref = rows.get("unet-2d-bf16-auto")
    pipe = {}
    for item_id, r in _ok_items(report, "pipeline").items():
        best = max(r["host"], key=lambda h: h["images_per_s"])
        pipe[item_id] = {"best_host_images_per_s": best["images_per_s"],
                         "workers": best["workers"],
                         "host_over_step": best["host_over_step"],
                         "host_over_throughput_unet2d_bf16": (
                             best["images_per_s"] / ref["images_per_s"] if ref else None)}
    out["pipeline"] = pipe
    return out


def _f(value, spec: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _status_line(items: dict) -> list[str]:
    lines = []
    for item_id, r in items.items():
        if r.get("status") not in ("ok", "pending"):
            lines.append(f"- `{item_id}`: {r.get('status')}"
                         + (f": {r['reason']}" if r.get("reason") else ""))
    return lines


def markdown(report: dict) -> str:
    s, setup = report["suite"], report["setup"]
    env = _ok_items(report, "env").get("versions", {})
    v = env.get("versions", {})
    device = env.get("device_kind", "?")
    lines = [f"# GPU suite{' (DRY RUN on the CPU: toy sizes, not figures)' if s['dry_run'] else ''}"
             f": {device}, {s['started'][:10]}", ""]
    lines.append(f"Command: `{s['command']}`; {s.get('elapsed_s', 0):.0f} s of a {s['total_s']:.0f} s "
                 f"budget; {setup.get('cpu_count')} CPU cores ({setup.get('cpu')}), load "
                 f"average {_f((setup.get('load_average_start') or [None])[0], '.2f')} at the "
                 f"start; git {setup.get('git')}.")
    if v:
        lines.append("Versions: python " + env.get("python", "?") + ", " + ", ".join(
            f"{k} {val}" for k, val in v.items() if val) + ".")
    lines.append(f"XLA_FLAGS: `{setup.get('xla_flags', '')}`"
                 + (f" (dropped as unknown: `{' '.join(setup['xla_flags_dropped'])}`)"
                    if setup.get("xla_flags_dropped") else "") + ".")
    lines.append("")
    lines.append("| stage | status | seconds | limit s |")
    lines.append("|---|---|---|---|")
    for name, st in report["stages"].items():
        lines.append(f"| {name} | {st['status']} | {_f(st.get('seconds'), '.0f')} | "
                     f"{_f(st.get('limit_s'), '.0f')} |")

    th = report["stages"].get("throughput")
    if th:
        lines += ["", "## Train step throughput", "",
                  "Random batches, the package's jitted `train_step` (on-device augmentation "
                  "on, Dice + CE, Adam), one device; medians of device-synchronised steps "
                  "after warm-up. Peak MiB: the backend's peak for the process (one process "
                  "per case on a GPU); XLA MiB: the compiled step's buffers.", "",
                  "| model | dims | input x batch | dtype | layer_impl | compile s | step ms "
                  "| images/s | TFLOP/s | MFU | peak MiB | XLA MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        plan_items = {it["id"]: it for it in throughput_items(s["dry_run"])}
        for item_id, r in th["items"].items():
            it = plan_items.get(item_id, {})
            if r.get("status") != "ok":
                continue
            row = r["rows"][0]
            lines.append(
                f"| {it.get('model')} | {it.get('dims')}D | {'x'.join(map(str, it.get('image_size', [])))}"
                f" x {it.get('batch')} | {it.get('dtype')} | {it.get('impl')} | "
                f"{row['compile_s']:.1f} | {row['step_ms']:.2f} | {row['images_per_s']:.1f} | "
                f"{_f(row['tflop_per_s'], '.1f')} | "
                f"{_f(row['mfu'] and 100 * row['mfu'], '.1f')}{'%' if row['mfu'] else ''} | "
                f"{_f(row['device_peak_mib'], '.0f')} | {_f(row['compiled_mib'], '.0f')} |")
        lines += _status_line(th["items"])
        win = report["summary"].get("layer_impl_winner_per_model", {})
        if win:
            lines += ["", "layer_impl, whole train step (`auto` on a GPU: up-conv reshape, "
                      "max pool lax):", "",
                      "| case | auto ms | reshape ms | lax ms | faster | lax / reshape |",
                      "|---|---|---|---|---|---|"]
            for base, w in win.items():
                lines.append(f"| {base} | {_f(w['auto_ms'], '.2f')} | {w['reshape_ms']:.2f} | "
                             f"{w['lax_ms']:.2f} | {w['winner']} | {w['lax_over_reshape']:.2f} |")

    la = report["stages"].get("layers")
    if la:
        lines += ["", "## Layers alone: layer_impl reshape vs lax", "",
                  "Forward + backward of one layer (`jax.grad` of a weighted sum), per U-Net "
                  "level of the throughput shapes; ms per call.", "",
                  "| case | layer | level | input | reshape ms | lax ms | faster | outputs "
                  "differ by |", "|---|---|---|---|---|---|---|---|"]
        for item_id, r in _ok_items(report, "layers").items():
            for row in r["rows"]:
                lines.append(f"| {item_id} | {row['layer']} | {row['level']} | "
                             f"{'x'.join(map(str, row['input']))} | "
                             f"{row['reshape_fwd_bwd_ms']:.3f} | {row['lax_fwd_bwd_ms']:.3f} | "
                             f"{row['winner']} | {row['max_rel_diff']:.1e} |")
            for layer, t in r["totals"].items():
                lines.append(f"| {item_id} | {layer} | all | | {t['reshape']:.3f} | "
                             f"{t['lax']:.3f} | **{t['winner']}** | |")
        lines += _status_line(la["items"])

    tc = report["stages"].get("torch_compare")
    if tc:
        lines += ["", "## Side by side with PyTorch (`benchmarks/torch_compare.py`)", ""]
        for item_id, r in tc["items"].items():
            if r.get("status") != "ok":
                continue
            net = r.get("network", {})
            lines.append(f"`{item_id}`: U-Net 2D base {net.get('base_features')}, "
                         f"{net.get('image_size')}^2, batch {net.get('batch_size')}; "
                         f"{r['machine'].get('jax_device')} / {r['machine'].get('torch_device')}"
                         f"; torch {r['machine'].get('torch')}; checks: " + "; ".join(
                             f"{c['name']} {'ok' if c['ok'] else 'FAIL'} ({c['text']})"
                             for c in r.get("checks", [])))
            lines += ["", f"| implementation | first step s | ms/step | images/s | "
                      f"{r['reference']} / this |", "|---|---|---|---|---|"]
            for row in r["results"]:
                lines.append(f"| {row['name']} | {_f(r['first_step_s'].get(row['name']))} | "
                             f"{row['step_ms']:.1f} | {row['images_per_s']:.1f} | "
                             f"{row['ref_speed_ratio']:.2f} |")
            for name, note in r.get("notes", {}).items():
                lines.append(f"- {name}: {note}")
            lines.append("")
        lines += _status_line(tc["items"])

    pi = report["stages"].get("pipeline")
    if pi:
        lines += ["", "## Input pipeline against the train step", "",
                  "Host batches from the training loader (`loader.run_batches` + transfer "
                  "to the device) with 0 and N grain workers, against the train step of the "
                  "same configuration on the device (images/s).", "",
                  "| data | config | prepare s | workers | host images/s | step images/s | "
                  "host / step | host / U-Net 2D bf16 step (throughput) |",
                  "|---|---|---|---|---|---|---|---|"]
        th_ref = ({k: v["rows"][0] for k, v in _ok_items(report, "throughput").items()}
                  .get("unet-2d-bf16-auto"))
        notes = []
        for item_id, r in _ok_items(report, "pipeline").items():
            c = r["config"]
            mode = "patches" if c["spatial_dims"] == 3 else c["in_plane"]
            for h in r["host"]:
                ratio = h["images_per_s"] / th_ref["images_per_s"] if th_ref else None
                lines.append(
                    f"| {item_id} ({'synthetic' if r['data'] == 'synthetic' else 'real'}) | "
                    f"{c['model']} {c['spatial_dims']}D base {c['base']} {c['dtype']}, "
                    f"{'x'.join(map(str, c['image_size']))} x {c['batch']}, {mode} | "
                    f"{r['prepare_s']:.1f} | {h['workers']} | {h['images_per_s']:,.0f} | "
                    f"{r['step_images_per_s']:,.0f} | {h['host_over_step']:.1f}x | "
                    f"{_f(ratio, '.1f')}{'x' if ratio else ''} |")
            if r.get("note"):
                notes.append(f"- {item_id}: {r['note']}")
        lines += notes
        lines += _status_line(pi["items"])

    tt = report["stages"].get("time_to_accuracy")
    if tt:
        lines += ["", "## Time to accuracy: 3D U-Net on Hippocampus", ""]
        for item_id, r in tt["items"].items():
            if r.get("status") != "ok":
                continue
            lines.append(f"`{r['command']}`")
            lines.append("")
            lines.append(
                f"Target validation Dice {r['target_dice']}: "
                + (f"**reached in {r['time_to_target_s']:.0f} s** (step "
                   f"{r['steps_to_target']}, wall time from the command's start: data "
                   f"preparation and compilation included)" if r["reached"] else
                   f"not reached within {r['budget_s']:.0f} s (best {_f(r['best_val_dice'], '.4f')})")
                + f"; first step (compilation) {_f(r['first_step_s'])} s; stopped: {r['stop']}."
                + (f" Data: {r['note']}." if r.get("note") else ""))
            lines += ["", "| wall s | step | val Dice | per class | train loss |",
                      "|---|---|---|---|---|"]
            for c in r["curve"]:
                per = ", ".join(f"{d:.3f}" for d in (c.get("val_dice_per_class") or []))
                lines.append(f"| {c['wall_s']:.1f} | {c['step']} | {c['val_dice']:.4f} | "
                             f"{per} | {_f(c.get('train_loss'), '.4f')} |")
        lines += _status_line(tt["items"])
    return "\n".join(lines) + "\n"


# ======================================================================================


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outdir", default="gpu_suite_out", help="gpu_suite.json / .md go here.")
    p.add_argument("--dry_run", action="store_true", help="CPU, toy sizes (a test runs it).")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (env always runs).")
    p.add_argument("--total_s", type=float, default=None,
                   help=f"time for all stages (default 540 GPU, {DRY_TOTAL_S:.0f} dry run).")
    p.add_argument("--scratch", default="", help="work folder (default: a temporary one).")
    p.add_argument("--hippocampus_root", default=os.path.join(REPO, "data_carry",
                                                              "Task04_Hippocampus"))
    p.add_argument("--hc18_root", default=os.path.join(REPO, "data_carry", "HC18_decathlon"),
                   help="converted HC18 (python -m medseg_jax.tools.convert_hc18) or the raw challenge "
                        "folder (converted on the fly).")
    p.add_argument("--target_dice", type=float, default=None,
                   help="time_to_accuracy: mean validation Dice to reach (default 0.85; "
                        "dry run 0: stop at the first validation).")
    p.add_argument("--tta_budget_s", type=float, default=0.0,
                   help="time_to_accuracy: training time budget (default: the stage's time).")
    p.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS,
                   help="XLA flags added for every stage (each probed; unknown ones dropped).")
    p.add_argument("--check_plan", action="store_true",
                   help="check the GPU plan's configs here (traces every throughput case at "
                        "full size), then exit.")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--items", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.scratch, args.items.split(","))
        return
    stages = ["env"] + [s.strip() for s in args.stages.split(",") if s.strip() and s != "env"]
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"--stages: unknown {', '.join(sorted(unknown))}; valid: {', '.join(STAGES)}")
    opts = {
        "outdir": os.path.abspath(args.outdir), "dry_run": args.dry_run, "stages": stages,
        "total_s": args.total_s or (DRY_TOTAL_S if args.dry_run else 540.0),
        "scratch": os.path.abspath(args.scratch) if args.scratch else tempfile.mkdtemp(
            prefix="gpu_suite_"),
        "hippocampus_root": args.hippocampus_root, "hc18_root": args.hc18_root,
        "target_dice": args.target_dice if args.target_dice is not None else (
            0.0 if args.dry_run else 0.85),
        "tta_budget_s": args.tta_budget_s, "xla_flags": args.xla_flags,
        "command": " ".join(["python", "benchmarks/gpu_suite.py"] + argv),
    }
    if args.check_plan:
        check_plan(opts)
        return
    suite = Suite(opts)
    try:
        suite.run()
    finally:
        if not args.scratch:
            shutil.rmtree(opts["scratch"], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
