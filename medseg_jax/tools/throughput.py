"""Throughput of a config: ``python -m medseg_jax.tools.throughput --config=configs/unet.py``.

Any config and override works (``--config.model.base_features=32
--config.data.image_size='(128,128)'``). For the training step and for inference
(``state_lib.make_predict_fn``, the function evaluation runs, flip TTA included when
``eval.tta``, at ``eval.batch_size``) it prints the compile time, the steady-state
step time (median of ``--steps`` device-synchronised steps after ``--warmup``:
``timing.StepTimer``), images/s
(and per device), FLOPs per step from XLA's cost analysis, the achieved TFLOP/s, the MFU
on a device whose peak it knows, and the peak device memory (the backend's figure where it
reports one, else XLA's compiled-buffer estimate). ``--parts=data,loop`` add the input
pipeline alone and the full loop (pipeline + prefetch + step, the loss fetched every
``train.log_every_steps``), so the share of time spent waiting for data shows.

The batches are the run's real ones (``cache.prepare`` on ``data.root`` or the embedded
synthetic set, written to ``--workdir``, a temporary folder by default).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
PARTS = ("train", "infer", "data", "loop")


def define_flags() -> None:
    """The command's flags (defined on demand: `main.py` has its own --config)."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/unet.py.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "Where the data are prepared; empty: a temporary folder.")
    flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_list("parts", list(PARTS), "What to time: train, infer, data (input pipeline "
                      "alone), loop (full training loop).")
    flags.mark_flags_as_required(["config"])


# Dense peak FLOP/s per device (vendor figures), by a substring of `device_kind`:
# (bfloat16, float32). float32 matmuls on these GPUs use TF32 tensor cores by default
# in XLA; TPUs run them as bfloat16 passes: the bfloat16 peak is used for both there.
PEAK_FLOPS = {
    "H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
    "L4": (121e12, 60e12), "A10": (125e12, 62.5e12), "V100": (125e12, 15.7e12),
    "TPU v6": (918e12, 918e12), "TPU v5p": (459e12, 459e12), "TPU v5": (197e12, 197e12),
    "TPU v4": (275e12, 275e12), "TPU v3": (123e12, 123e12),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The dense peak of one device for ``dtype``, or None when unknown (CPUs). A key
    matches a whole name in ``device_kind`` ("NVIDIA L40S" is not an L4)."""
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])",
                     device_kind.lower()):
            return bf16 if dtype == "bfloat16" else fp32
    return None


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compiled_memory(compiled) -> int | None:
    """XLA's estimate of the program's device memory: arguments + outputs + temporaries
    (less donated aliases)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def device_peak_memory() -> int | None:
    """The backend's peak bytes in use on device 0 (GPU/TPU), None where not reported."""
    import jax  # noqa: PLC0415

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure(name: str, jitted, args: tuple, images: int, run_with, config, steps: int,
            warmup: int) -> dict:
    """Compiles ``jitted`` for ``args`` (timed), then times steady-state steps."""
    import jax  # noqa: PLC0415

    from medseg_jax import timing  # noqa: PLC0415

    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t
    seconds = timing.StepTimer(warmup).time(lambda: run_with(compiled), steps)
    flops = _cost(compiled).get("flops")
    n_dev = jax.device_count()
    peak = peak_flops(jax.devices()[0].device_kind, config.model.dtype)
    achieved = flops / seconds if flops else None
    return {
        "what": name, "compile_s": compile_s, "step_ms": 1e3 * seconds,
        "images_per_s": images / seconds, "images_per_s_per_device": images / seconds / n_dev,
        "gflop_per_step": flops / 1e9 if flops else None,
        "tflop_per_s": achieved / 1e12 if achieved else None,
        "mfu": achieved / (peak * n_dev) if achieved and peak else None,
        "device_peak_mib": (device_peak_memory() or 0) / 2**20 or None,
        "compiled_mib": (compiled_memory(compiled) or 0) / 2**20 or None,
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print("| what | compile s | step ms | images/s | images/s/device | GFLOP/step | TFLOP/s "
          "| MFU | peak device MiB | compiled MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
              f"{r['images_per_s']:.1f} | {r['images_per_s_per_device']:.1f} | "
              f"{_fmt(r['gflop_per_step'], '.1f')} | {_fmt(r['tflop_per_s'], '.3f')} | "
              f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
              f"{_fmt(r['device_peak_mib'], '.0f')} | {_fmt(r['compiled_mib'], '.0f')} |")


def time_data(train_samples, config, mesh, steps: int) -> float:
    """Seconds per batch of the input pipeline alone (host batches + device transfer)."""
    import jax  # noqa: PLC0415

    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax.data import loader  # noqa: PLC0415

    batches = loader.epoch_batches(train_samples, config, 1, steps + 1)
    jax.block_until_ready(sharding.to_global(next(iter(batches)), mesh))  # start-up
    t = time.perf_counter()
    for host in batches:
        jax.block_until_ready(sharding.to_global(host, mesh))
    return (time.perf_counter() - t) / steps


def time_loop(train_fn, state, train_samples, config, mesh, steps: int) -> tuple[float, object]:
    """Seconds per step of the training loop as train.py runs it (pipeline, prefetch,
    step, the loss fetched every ``log_every_steps``), after one untimed step."""
    import jax  # noqa: PLC0415

    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax.data import loader  # noqa: PLC0415

    batches = sharding.prefetch_to_device(
        loader.epoch_batches(train_samples, config, 2, steps + 1), mesh, config.train.prefetch)
    state, out = train_fn(state, next(batches))
    jax.block_until_ready(out)
    t = time.perf_counter()
    for i, batch in enumerate(batches):
        state, out = train_fn(state, batch)
        if (i + 1) % config.train.log_every_steps == 0:
            jax.device_get(out["loss"])
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps, state


def run(config, workdir: str, steps: int = 20, warmup: int = 3, parts=PARTS) -> dict:
    """Measures the parts asked for; prints them and returns {"rows": [...], "data_ms",
    "loop_ms", "wait_share"} (the last three when measured)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.data import cache, loader  # noqa: PLC0415

    from medseg_jax import planning  # noqa: PLC0415

    config, _ = planning.resolve(config, workdir)
    config_lib.validate(config)
    state_lib.setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    batch = config.train.batch_size
    sharding.check_batch_size(batch, mesh, "train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    dataset, _, samples = cache.prepare(config, workdir)
    setup = state_lib.initialize(config, dataset.num_classes, dataset.num_channels, 1000,
                                 mesh)
    state, train_fn, shape = setup.state, setup.train_fn, setup.input_shape
    predict_fn = state_lib.make_predict_fn(config, mesh)  # what evaluation runs
    device_batch = sharding.to_global(
        next(iter(loader.epoch_batches(samples["train"], config, 0, 1))), mesh)
    dev = jax.devices()[0]
    print(f"config: {config.model.name} {config.model.spatial_dims}D base "
          f"{config.model.base_features} depth {config.model.depth} norm {config.model.norm} "
          f"dtype {config.model.dtype} remat {config.model.remat}; input {shape}; eval batch "
          f"{config.eval.batch_size}; augmentation {'on' if config.augment.enabled else 'off'}")
    print(f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
          f"{jax.process_count()} process(es); jax {jax.__version__}; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--parts: {', '.join(sorted(unknown))} not among {', '.join(PARTS)}")
    rows, result = [], {}
    holder = {"state": state}

    def train_run(compiled):
        holder["state"], out = compiled(holder["state"], device_batch)
        jax.block_until_ready(out)

    if "train" in parts:
        rows.append(measure("train step", train_fn, (state, device_batch), batch, train_run,
                            config, steps, warmup))
    if "infer" in parts:
        images = jax.device_put(
            jnp.zeros((config.eval.batch_size, *shape[1:]), jnp.float32),
            sharding.batch_sharded(mesh))
        rows.append(measure(
            "inference" + (" (flip TTA)" if config.eval.tta else ""), predict_fn,
            (holder["state"], images),
            config.eval.batch_size,
            lambda c: jax.block_until_ready(c(holder["state"], images)), config, steps, warmup))
    print_table(rows)
    step_s = rows[0]["step_ms"] / 1e3 if "train" in parts else None
    if "data" in parts:
        data_s = time_data(samples["train"], config, mesh, steps)
        result["data_ms"] = 1e3 * data_s
        print(f"input pipeline alone: {1e3 * data_s:.2f} ms/batch, "
              f"{batch / data_s:,.0f} images/s")
    if "loop" in parts:
        loop_s, holder["state"] = time_loop(train_fn, holder["state"], samples["train"], config,
                                            mesh, steps)
        result["loop_ms"] = 1e3 * loop_s
        result["wait_share"] = max(0.0, 1 - step_s / loop_s) if step_s else None
        share = result["wait_share"]
        wait = "n/a" if share is None else f"{100 * share:.1f}%"
        print(f"full loop (pipeline + prefetch + step): {1e3 * loop_s:.1f} ms/step, "
              f"{batch / loop_s:.1f} images/s; time not in the step (data wait, dispatch): "
              f"{wait}")
    return dict(result, rows=rows)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    print("command: " + " ".join([os.path.basename(sys.executable), "-m",
                                  "medseg_jax.tools.throughput"] + sys.argv[1:]))
    from medseg_jax import sharding  # noqa: PLC0415

    if sharding.set_cpu_flags(FLAGS.config):  # as a training run would, before the backend
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']} (train.xla_cpu_ynn=False)")
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="throughput_")
    try:
        run(FLAGS.config, workdir, FLAGS.steps, FLAGS.warmup, FLAGS.parts)
    except (ValueError, OSError) as e:
        print(f"medseg_jax: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
