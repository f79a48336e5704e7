"""Throughput of the host input pipeline against the training step that consumes it.

Measures, on real data (``--data_root``) or the embedded synthetic default:

1. preprocessing (``cache.prepare``) cold (fresh cache) and cached;
2. host batches/s and slices/s of ``loader.run_batches`` + ``sharding.to_global`` (the
   functions training uses), per ``--num_workers`` value; ``--in_plane=spacing`` measures
   the patches of resampled cases instead of resized slices;
3. jitted ``augment.augment_batch`` alone, slices/s;
4. the jitted ``train_step`` of the configured model, images/s, and the share of a step
   spent waiting for data if loading were not overlapped;

then (``--profile``; by default only when the host path is below the 9,000 slices/s
target) a breakdown of where its time goes, a cProfile, and prototypes of other loaders
(batch-level records, no read-ahead threads; labelled as such: the package is not changed).

Usage:
  python benchmarks/pipeline_throughput.py --data_root=/work/shared/data/Task04_Hippocampus
  python benchmarks/pipeline_throughput.py            # embedded synthetic data
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import itertools
import shutil
import sys
import tempfile
from typing import Callable, Iterator

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data_root", "", "Decathlon folder(s); empty: embedded synthetic data.")
flags.DEFINE_string("workdir", "", "Scratch directory; empty: a temporary one, removed at exit.")
flags.DEFINE_list("image_size", ["64", "64"], "config.data.image_size, e.g. 64,64.")
flags.DEFINE_enum("in_plane", "resize", ["resize", "spacing"], "config.data.in_plane.")
flags.DEFINE_list("target_spacing", [], "config.data.target_spacing (mm), e.g. 0.75,0.75.")
flags.DEFINE_integer("batch_size", 16, "config.train.batch_size (global batch).")
flags.DEFINE_list("num_workers", ["0", "1", "2"], "grain worker counts to sweep.")
flags.DEFINE_integer("num_batches", 1000,
                     "Timed host batches per num_workers value (more than grain's read-ahead).")
flags.DEFINE_integer("warmup_batches", 20, "Untimed host batches first (worker start-up).")
flags.DEFINE_integer("repeats", 3, "Host-rate runs per setting (median shown, range too).")
flags.DEFINE_integer("train_steps", 20, "Timed train / augmentation steps (median).")
flags.DEFINE_enum("profile", "auto", ["auto", "always", "never"],
                  "Breakdown + prototype: auto = only when below the target.")

# nnU-Net's data path on an A100 moves about 9,000 2D Hippocampus slices/s; the issue asks
# the host pipeline to deliver at least 3x what the training step consumes on a GPU.
TARGET_SLICES_PER_S = 9000.0


def log(msg: str = "") -> None:
    print(msg, flush=True)


def loadavg() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def table(rows: list[tuple], header: tuple) -> None:
    """Prints rows as a plain, column-aligned table."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        log("  " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            log("  " + "-+-".join("-" * w for w in widths))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    from medseg_jax import timing  # noqa: PLC0415

    return timing.timed(fn)


def close(it: Iterator) -> None:
    """Stops grain worker processes, if any."""
    if hasattr(it, "close"):
        it.close()


# --------------------------------------------------------------------------
# PROTOTYPE (not the package's code path): one grain record per batch, read with a
# single fancy-indexed gather from the memmap instead of batch_size records + np.stack.


class PrototypeBatchLookup:
    """Picklable step -> batch map: ``images[order[step]]`` in one gather (prototype)."""

    def __init__(self, samples, order):
        self.samples, self.order = samples, order

    def __call__(self, step) -> dict:
        rows = self.order[int(step)]
        return {"image": self.samples.images[rows], "label": self.samples.labels[rows]}


def prototype_batches(samples, order, num_workers: int, batch_records: bool = True,
                      read_threads: int | None = None) -> Iterator[dict]:
    """PROTOTYPE grain pipelines, same batches as train_batches (single process).

    ``batch_records``: one record per batch (``PrototypeBatchLookup``) instead of one per
    sample; ``read_threads``: ``grain.ReadOptions(num_threads=...)`` (None: grain's
    default of 16 read-ahead threads).
    """
    import grain  # noqa: PLC0415

    if batch_records:
        ds = grain.MapDataset.range(order.shape[0]).map(PrototypeBatchLookup(samples, order))
    else:
        ds = same_chain_as_train_batches(samples, order)
    options = None if read_threads is None else grain.ReadOptions(num_threads=read_threads)
    ds = ds.to_iter_dataset(options)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def plain_batches(samples, order) -> Iterator[dict]:
    """PROTOTYPE without grain: one fancy-indexed gather per batch in a plain loop."""
    for rows in order:
        yield {"image": samples.images[rows], "label": samples.labels[rows]}


# --------------------------------------------------------------------------


def host_rate(make_iter: Callable[[int], Iterator[dict]], mesh, batch_size: int,
              num_batches: int, warmup: int, epoch_steps: int) -> dict:
    """Consumes ``warmup + num_batches`` batches, each put on the mesh with to_global.

    Steady rates count the batches after the warm-up; ``epoch_s`` is the time from the
    iterator's creation to batch ``epoch_steps`` (what a new run waits for its first epoch).
    """
    import jax  # noqa: PLC0415

    from medseg_jax import sharding, timing  # noqa: PLC0415

    opened, take, put = timing.StepTimer(), timing.StepTimer(), timing.StepTimer()
    it = opened.call(lambda: make_iter(warmup + num_batches))
    try:
        for _ in range(warmup + num_batches):  # every batch timed; steady: after the warm-up
            host = take.call(lambda: next(it))
            put.call(lambda host=host: jax.block_until_ready(sharding.to_global(host, mesh)))
    finally:
        close(it)
    # Seconds from the iterator's creation to the end of each batch.
    since = list(itertools.accumulate(
        (a + b for (a, _), (b, _) in zip(take.windows, put.windows)), initial=opened.mean()))
    first = since[1]
    epoch = since[epoch_steps] if 0 < epoch_steps < len(since) else None
    t_next = sum(s for s, _ in take.windows[warmup:])
    t_put = sum(s for s, _ in put.windows[warmup:])
    total = t_next + t_put
    return {"batches_per_s": num_batches / total, "slices_per_s": num_batches * batch_size / total,
            "ms_per_batch": 1e3 * total / num_batches, "ms_next": 1e3 * t_next / num_batches,
            "ms_put": 1e3 * t_put / num_batches, "first_s": first, "epoch_s": epoch}


def seconds_or_na(seconds: float | None) -> str:
    """``epoch_s`` is None when fewer batches than an epoch were timed."""
    return "n/a" if seconds is None else f"{seconds:.2f}"


def repeated(run: Callable[[], dict], repeats: int) -> dict:
    """The run with the median slices/s of ``repeats``, with the range of all."""
    runs = sorted((run() for _ in range(repeats)), key=lambda r: r["slices_per_s"])
    out = dict(runs[len(runs) // 2])
    out["range"] = f"{runs[0]['slices_per_s']:,.0f}-{runs[-1]['slices_per_s']:,.0f}"
    return out


def median_seconds(fn: Callable[[int], object], steps: int, warmup: int = 3) -> float:
    """The median of ``steps`` calls ``fn(i)`` after ``warmup`` untimed ones (i counts
    every call)."""
    import jax  # noqa: PLC0415

    from medseg_jax import timing  # noqa: PLC0415

    count = itertools.count()
    return timing.StepTimer(warmup).time(lambda: jax.block_until_ready(fn(next(count))), steps)


class _PerSample:
    """The previous loader's record function: one grain record per sample."""

    def __init__(self, samples):
        self.samples = samples

    def __call__(self, index) -> dict:
        return self.samples[int(index)]


def same_chain_as_train_batches(samples, order):
    """The previous per-sample MapDataset chain (source, _PerSample, batch), un-iterated.

    Indexing it (``ds[k]``) runs the record reads, grain's per-record machinery and the
    batching in the calling thread, without grain's read-ahead threads, so each piece can
    be timed and profiled.
    """
    import grain  # noqa: PLC0415


    return grain.MapDataset.source(order.reshape(-1).tolist()).map(
        _PerSample(samples)).batch(order.shape[1], drop_remainder=True)


def breakdown(samples, order, mesh, batch_size: int, rounds: int = 5) -> list[tuple]:
    """Times each piece of the num_workers=0 path alone, on the same batches.

    The pieces are timed in interleaved rounds and the shortest time of each is kept,
    so that the load of a shared CPU hits them alike. Each result is dropped before the
    next is made, as in a training loop (keeping 1000 fresh batches would time page
    faults of new memory instead).
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from medseg_jax import sharding, timing  # noqa: PLC0415
    from medseg_jax.data import loader  # noqa: PLC0415

    n = order.shape[0]
    lookup = _PerSample(samples)  # the record function grain calls
    rows = [r.tolist() for r in order]
    recs = [[lookup(i) for i in r] for r in rows]
    batches = [{"image": np.stack([x["image"] for x in b]),  # 20, cycled below
                "label": np.stack([x["label"] for x in b])} for b in recs[:20]]
    ds = same_chain_as_train_batches(samples, order)
    sharded = sharding.batch_sharded(mesh)
    in_ram = (np.array(samples.images), np.array(samples.labels))  # copies into RAM

    def iterate(it):
        for _ in range(n):
            next(it)
        close(it)

    def each(fn: Callable, items) -> None:
        for item in items:
            fn(item)

    def put():
        for k in range(n):
            jax.block_until_ready(sharding.to_global(batches[k % len(batches)], mesh))

    def device_put():
        for k in range(n):
            jax.block_until_ready(jax.device_put(batches[k % len(batches)], sharded))

    pieces = {
        "train_batches iterator (the package loader: batch records), next() only":
            lambda: iterate(loader.train_batches(samples, order, 0, 1, 0)),
        "previous per-sample chain, ReadOptions(num_threads=0), next() only":
            lambda: iterate(prototype_batches(samples, order, 0, False, 0)),
        "previous per-sample chain indexed in this thread, ds[k]":
            lambda: each(ds.__getitem__, range(n)),
        f"  {batch_size} x _PerSample(i): memmap[i] -> np.asarray view":
            lambda: each(lambda r: [lookup(i) for i in r], rows),
        f"  np.stack of the {batch_size} views (the page-cache copy)": lambda: each(
            lambda b: (np.stack([x["image"] for x in b]), np.stack([x["label"] for x in b])),
            recs),
        "to_global (2 x make_array_from_process_local_data)": put,
        "  alternative: one jax.device_put(dict, sharding)": device_put,
        "PROTOTYPE gather: memmap[rows] per batch (no grain)":
            lambda: each(lambda r: (samples.images[r], samples.labels[r]), order),
        "PROTOTYPE gather: in-RAM array[rows] per batch":
            lambda: each(lambda r: (in_ram[0][r], in_ram[1][r]), order),
    }
    timers = {name: timing.StepTimer() for name in pieces}
    for _ in range(rounds):
        for name, fn in pieces.items():
            timers[name].call(fn)
    best = {name: timer.min() for name, timer in timers.items()}
    out = [(name, f"{1e3 * t / n:.3f}", f"{n * batch_size / t:,.0f}") for name, t in best.items()]
    rest = (best["previous per-sample chain indexed in this thread, ds[k]"]
            - best[f"  {batch_size} x _PerSample(i): memmap[i] -> np.asarray view"]
            - best[f"  np.stack of the {batch_size} views (the page-cache copy)"])
    out.insert(5, ("  grain per-record/batch machinery (remainder)", f"{1e3 * rest / n:.3f}", "-"))
    return out


def profile_top(samples, order, mesh, limit: int = 16) -> str:
    """cProfile, by own time, of the same grain chain indexed in this thread + to_global.

    (Profiling the iterator itself would only show the main thread waiting on a lock:
    cProfile does not see grain's read-ahead threads.)
    """
    import jax  # noqa: PLC0415

    from medseg_jax import sharding  # noqa: PLC0415

    ds = same_chain_as_train_batches(samples, order)
    prof = cProfile.Profile()
    prof.enable()
    for k in range(order.shape[0]):
        jax.block_until_ready(sharding.to_global(ds[k], mesh))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    for prefix in (sys.prefix + "/lib/python3.11/site-packages/", os.getcwd() + "/",
                   sys.base_prefix + "/lib/python3.11/"):
        text = text.replace(prefix, "")
    lines = text.splitlines()
    head = [ln.strip() for ln in lines if "function calls" in ln]
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), len(lines))
    body = [ln.rstrip()[:160] for ln in lines[start:] if ln.strip()]
    return "\n".join("    " + ln for ln in head + body)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import grain  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax.data import augment  # noqa: PLC0415
    from medseg_jax.data import cache  # noqa: PLC0415
    from medseg_jax.data import dataset as dataset_lib  # noqa: PLC0415
    from medseg_jax.data import loader  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax import workdir as workdir_lib  # noqa: PLC0415

    batch_size = FLAGS.batch_size
    workers = [int(w) for w in FLAGS.num_workers]
    config = config_lib.default_config()
    config.data.root = FLAGS.data_root
    config.data.image_size = tuple(int(s) for s in FLAGS.image_size)
    config.data.in_plane = FLAGS.in_plane
    config.data.target_spacing = tuple(float(s) for s in FLAGS.target_spacing)
    config.train.batch_size = batch_size
    config_lib.validate(config)
    state_lib.setup_compilation_cache(config)

    scratch = FLAGS.workdir or tempfile.mkdtemp(prefix="pipeline_throughput_")
    first_root = FLAGS.data_root.split(",")[0].strip()
    name = os.path.basename(os.path.normpath(first_root)) if first_root else "synthetic"
    workdir = os.path.join(scratch, name)  # one splits.json per data set
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh()
    dev = jax.devices()[0]

    log("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    log(f"machine: {os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable), "
        f"{workdir_lib.cpu_model()}; jax {jax.__version__} {dev.platform} x{jax.device_count()} "
        f"({dev.device_kind}); grain {getattr(grain, '__version__', '?')}; numpy {np.__version__}")
    log(f"start: {loadavg()} (a shared CPU: figures vary with other jobs)")
    log(f"data: {FLAGS.data_root or 'embedded synthetic (SynthMRI + SynthCT + SynthUS)'}; "
        f"image_size {config.data.image_size}, in_plane {config.data.in_plane}, batch "
        f"{batch_size}; workdir {workdir}")

    # 1. Preprocessing.
    log("\n[1] preprocessing: cache.prepare(config, workdir)")
    dataset, t_open = timed(lambda: dataset_lib.open_dataset(config, workdir))
    config.data.cache_dir = tempfile.mkdtemp(dir=workdir, prefix="cache_")  # fresh: cold
    (_, _, samples), t_cold = timed(lambda: cache.prepare(config, workdir))
    (_, plans, samples), t_warm = timed(lambda: cache.prepare(config, workdir))
    train_s, val_s = samples["train"], samples["val"]
    n_cases = {s: len(dataset.splits[s]) for s in dataset_lib.SPLITS}
    rows = [("open data set" + ("" if FLAGS.data_root else " (+ synthetic generation)"),
             f"{t_open:.2f}", ""),
            ("prepare, cold (fresh cache dir)", f"{t_cold:.2f}",
             f"{(n_cases['train'] + n_cases['val']) / t_cold:.1f} cases/s, "
             f"{(len(train_s) + len(val_s)) / t_cold:,.0f} samples/s"),
            ("prepare, cached (second call)", f"{t_warm:.3f}", "")]
    table(rows, ("step", "seconds", "rate"))
    resampled = isinstance(train_s, cache.Volumes)
    if resampled:
        size = tuple(config.data.image_size)
        epoch_steps = max(1, train_s.patches_per_pass(size, config.data.slice_axis) // batch_size)
        what = (f"{len(train_s)} train cases resampled to {plans['target_spacing']} mm "
                f"(patches of {size}) / {len(val_s)} val tiles")
    else:
        epoch_steps = max(1, len(train_s) // batch_size)
        what = (f"{len(train_s)} train / {len(val_s)} val 2D slices of "
                f"{tuple(train_s.images.shape[1:])} {train_s.images.dtype}, cache "
                f"{train_s.images.nbytes / 2**20:.1f} MiB train images")
    log(f"  cases: {len(dataset.refs)} ({n_cases['train']} train / {n_cases['val']} val / "
        f"{n_cases['test']} test); samples: {what}; {epoch_steps} batches per epoch")

    # 2. Host batches.
    log(f"\n[2] host batches: run_batches (the training loader) + to_global, "
        f"{FLAGS.num_batches} batches after {FLAGS.warmup_batches} warm-up")

    def order_for(steps: int) -> np.ndarray:
        return loader.epoch_indices(train_s, batch_size, steps, config.seed, 0,
                                      config.data.foreground_fraction)

    def batches(steps: int, num_workers: int = 0):
        """What training iterates: one pipeline over ``steps`` steps (one 'epoch')."""
        cfg = config.copy_and_resolve_references()
        cfg.data.num_workers = num_workers
        return loader.run_batches(train_s, cfg, steps, 0, steps)

    host = {}
    for w in workers:
        host[w] = repeated(lambda w=w: host_rate(
            lambda steps: batches(steps, w), mesh, batch_size, FLAGS.num_batches,
            FLAGS.warmup_batches, epoch_steps), FLAGS.repeats)
    table([(w, f"{r['batches_per_s']:,.0f}", f"{r['slices_per_s']:,.0f}", r["range"],
            f"{r['ms_per_batch']:.2f}", f"{r['ms_next']:.2f}", f"{r['ms_put']:.2f}",
            f"{r['first_s']:.2f}", seconds_or_na(r["epoch_s"]),
            f"{r['slices_per_s'] / TARGET_SLICES_PER_S:.2f}x")
           for w, r in host.items()],
          ("num_workers", "batches/s", "slices/s", "slices/s range", "ms/batch", "ms next()",
           "ms to_global", "1st batch s", f"epoch s ({epoch_steps} b)", "vs 9,000/s"))
    log(f"  median of {FLAGS.repeats} runs (range: all runs); batches/s, slices/s, ms: steady "
        "state after the warm-up; 1st batch, epoch: from the run_batches call (training "
        "makes one iterator, and starts its workers, once per run)")

    # 3. Augmentation alone.
    log(f"\n[3] on-device augmentation alone: jit(augment.augment_batch), batch {batch_size}, "
        f"median of {FLAGS.train_steps}")
    device_batch = sharding.to_global(list(batches(1))[0], mesh)
    aug = jax.jit(lambda key, im, lb: augment.augment_batch(key, im, lb, config.augment))
    key = jax.random.key(0)
    t_aug = median_seconds(lambda i: aug(jax.random.fold_in(key, i), device_batch["image"],
                                         device_batch["label"]), FLAGS.train_steps)
    table([(f"augment_batch on {dev.device_kind}", f"{1e3 * t_aug:.2f}",
            f"{batch_size / t_aug:,.0f}")], ("step", "ms/batch", "slices/s"))

    # 4. Training step.
    log(f"\n[4] training step: jit(train_step), {config.model.name} base "
        f"{config.model.base_features} depth {config.model.depth}, batch {batch_size}, "
        f"median of {FLAGS.train_steps} after 3 warm-up")
    setup = state_lib.initialize(config, dataset.num_classes, dataset.num_channels, 1000,
                                 mesh)
    state, train_fn = setup.state, setup.train_fn
    device_batches = [sharding.to_global(b, mesh) for b in batches(4)]
    holder = {"state": state}

    def step(i: int):
        holder["state"], out = train_fn(holder["state"], device_batches[i % len(device_batches)])
        return out["loss"]

    t_step = median_seconds(step, FLAGS.train_steps)
    ips = batch_size / t_step
    table([(f"train_step on {dev.device_kind}", f"{1e3 * t_step:.1f}", f"{ips:,.0f}")],
          ("step", "ms/step", "images/s"))
    log("  data wait if loading were not overlapped = load / (load + step):")
    table([(w, f"{r['ms_per_batch']:.2f}", f"{1e3 * t_step:.1f}",
            f"{100 * r['ms_per_batch'] / (r['ms_per_batch'] + 1e3 * t_step):.1f}%",
            f"{r['slices_per_s'] / ips:.1f}x")
           for w, r in host.items()],
          ("num_workers", "load ms/batch", "step ms", "wait share", "host / step rate"))

    best_w = max(host, key=lambda w: host[w]["slices_per_s"])
    best = host[best_w]["slices_per_s"]
    log(f"\n[target] best host rate {best:,.0f} slices/s (num_workers={best_w}) against "
        f"{TARGET_SLICES_PER_S:,.0f} slices/s (nnU-Net data path, A100): "
        f"{best / TARGET_SLICES_PER_S:.2f}x -> "
        f"{'met' if best >= TARGET_SLICES_PER_S else 'NOT MET'}")
    log(f"         against 3 x 9,000 = {3 * TARGET_SLICES_PER_S:,.0f} slices/s (3x, should a GPU "
        f"step consume what nnU-Net's data path delivers): {best / (3 * TARGET_SLICES_PER_S):.2f}x"
        f" -> {'met' if best >= 3 * TARGET_SLICES_PER_S else 'NOT MET'}")
    log(f"         on this CPU: {best / ips:.1f}x the train step's {ips:,.0f} images/s "
        f"(3x wanted: {'met' if best >= 3 * ips else 'NOT MET'})")

    # 5. Breakdown and prototype.
    if resampled and FLAGS.profile != "never":
        log("\n[profile] only for --in_plane=resize (the breakdown indexes cached slices)")
    elif FLAGS.profile == "always" or (FLAGS.profile == "auto" and best < TARGET_SLICES_PER_S):
        n = FLAGS.num_batches
        order = order_for(n)
        log(f"\n[profile] where the num_workers=0 path spends its time "
            f"({n} batches, the same rows for every line, each piece alone)")
        table(breakdown(train_s, order, mesh, batch_size), ("piece", "ms/batch", "slices/s"))
        log(f"\n[profile] cProfile of the train_batches grain chain indexed in this thread "
            f"+ to_global, {n} batches, by own time:")
        log(profile_top(train_s, order, mesh))
        log("\n[PROTOTYPE, not the package] other loaders, same batches, + to_global, "
            f"{n} batches after {FLAGS.warmup_batches} warm-up, median of {FLAGS.repeats}:")
        variants = {
            "per-sample records (previous loader), ReadOptions(num_threads=0)": (0, False, 0),
            **{f"batch records, num_workers={w}": (w, True, None) for w in workers},
            "batch records, ReadOptions(num_threads=0)": (0, True, 0),
        }
        proto = {}
        for name, (w, batch_records, threads) in variants.items():
            proto[name] = (w, repeated(lambda w=w, b=batch_records, t=threads: host_rate(
                lambda steps: prototype_batches(train_s, order_for(steps), w, b, t),
                mesh, batch_size, n, FLAGS.warmup_batches, epoch_steps), FLAGS.repeats))
        proto["batch gather in a plain loop, no grain"] = (0, repeated(lambda: host_rate(
            lambda steps: plain_batches(train_s, order_for(steps)),
            mesh, batch_size, n, FLAGS.warmup_batches, epoch_steps), FLAGS.repeats))
        ref_rate = lambda w: host[w if w in host else best_w]["slices_per_s"]  # noqa: E731
        table([(name, f"{p['slices_per_s']:,.0f}", p["range"], f"{ref_rate(w):,.0f}",
                f"{p['slices_per_s'] / ref_rate(w):.1f}x",
                f"{p['ms_next']:.3f}", f"{p['ms_put']:.3f}", seconds_or_na(p["epoch_s"]),
                f"{p['slices_per_s'] / TARGET_SLICES_PER_S:.2f}x")
               for name, (w, p) in proto.items()],
              ("prototype", "slices/s", "range", "now, same workers", "speed-up", "ms next()",
               "ms to_global", f"epoch s ({epoch_steps} b)", "vs 9,000/s"))
        check = order_for(20)
        same = all(np.array_equal(a[k], b[k]) for a, b in zip(
            prototype_batches(train_s, check, 0), loader.train_batches(train_s, check, 0, 1, 0))
            for k in ("image", "label"))
        log(f"  prototype batches equal the current ones (20 batches): {same}")

    log(f"\nend: {loadavg()}")
    if not FLAGS.workdir:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
