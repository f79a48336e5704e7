"""The ``pipeline`` stage: the real loaders (Hippocampus 2D slices and 3D patches, HC18
resampled to a spacing) with 0 and N grain workers against the train step of the same
configuration. Worker side: jax and the package are imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from suite.common import log
from suite.configs import item_config

NO_DATA = ("prepare the data folder with benchmarks/prepare_data_carry.sh or pass "
           "--hippocampus_root / --hc18_root")


def _data_root(item: dict, dry: bool) -> tuple[str, str, str | None]:
    """(root, note, reason to skip): a dry run falls back to the embedded synthetic data."""
    root = item.get("root") or ""
    if root and not os.path.isdir(root):
        if not dry:
            return root, "", f"data not found at {root}: {NO_DATA}"
        return "", f"{root} not found: embedded synthetic data", None
    if not root:
        if not dry:
            return root, "", f"no data root given: {NO_DATA}"
        return "", "embedded synthetic data (no data root given)", None
    return root, "", None


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


def _step_rate(config, dataset, train_s, mesh, item: dict, steps: int) -> tuple[float, float]:
    """(first step s, median step s) of the train step on four batches from the loader."""
    import jax  # noqa: PLC0415

    from medseg_jax import sharding, timing  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.data import loader  # noqa: PLC0415

    setup = state_lib.initialize(config, dataset.num_classes, dataset.num_channels, 1000,
                                 mesh)
    state, train_fn = setup.state, setup.train_fn
    cfg = config.copy_and_resolve_references()
    cfg.data.num_workers = 0
    device_batches = [sharding.to_global(b, mesh) for b in loader.run_batches(train_s, cfg, 4,
                                                                             0, 4)]
    holder = {"state": state, "i": 0}

    def run():
        """One train step on the next of the four batches, waited for."""
        holder["state"], out = train_fn(holder["state"], device_batches[holder["i"] % 4])
        holder["i"] += 1
        jax.block_until_ready(out)

    t = time.perf_counter()
    run()  # compiles
    first_step_s = time.perf_counter() - t
    return first_step_s, timing.StepTimer().time(run, steps)


def run_pipeline(item: dict, opts: dict, scratch: str) -> dict:
    """Prepares the item's data (converting raw HC18 first), then host batches/s for each
    number of grain workers and the train step's images/s on those batches."""
    import jax  # noqa: PLC0415

    from absl import flags  # noqa: PLC0415

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.data import cache  # noqa: PLC0415
    from medseg_jax.data.dataset import SPLITS  # noqa: PLC0415

    dry = opts["dry_run"]
    root, note, skip = _data_root(item, dry)
    if skip:
        return {"status": "skipped", "reason": skip}
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
    first_step_s, step_s = _step_rate(config, dataset, train_s, mesh, item, 3 if dry else 20)
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
