"""What syncing a checkpoint to the disk costs per save.

    PYTHONPATH=. python benchmarks/sync_cost.py [--repeats=5] [--dir=/tmp/sync_cost] \
        [--hippocampus=$MEDSEG_DATA/Task04_Hippocampus]

Builds the TrainState of two configs and saves it with ``checkpoint.Checkpointer``
(save, then wait: Orbax's commit, the digest), alternately with the syncs
(``fsync`` of every file of the committed checkpoint, its folder and ``checkpoints/``,
then the digest's atomic write) and without them (``fileio``'s syncs replaced by
no-ops; TensorStore's own syncs of the arrays stay). Prints the median ms per save of
each, the difference and that difference as a share of an epoch:

- ``configs/unet.py`` as is (2D U-Net, base 16, depth 4); its epoch: 85 s
  (docs/results/study.md, the default run on two CPU cores);
- ``configs/unet_3d.py`` with the plan made from Hippocampus (``--hippocampus``; without
  the data: base 16, depth 4, 3 classes); its epoch: 250 steps of 0.8 s and a
  validation, about 240 s on two CPU cores (configs/unet_3d.py).

The figures depend on the disk (and on what else writes to it): say which.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_SECONDS = {"2d": 85.0, "3d": 240.0}


def _state(config, num_classes: int):
    from medseg_jax import sharding
    from medseg_jax import state as state_lib

    mesh = sharding.make_mesh()
    model = state_lib.build_model(config, num_classes)
    shape = (config.train.batch_size or 2, *config.data.image_size, 1)
    return state_lib.init_state(config, model, shape, 1000, mesh)


def _configs(hippocampus: str, scratch: str):
    from medseg_jax import planning

    out = {"2d": (runpy.run_path(os.path.join(ROOT, "configs", "unet.py"))["get_config"](), 2)}
    config = runpy.run_path(os.path.join(ROOT, "configs", "unet_3d.py"))["get_config"]()
    if hippocampus and os.path.isdir(hippocampus):
        config.data.root = hippocampus
        config, _ = planning.resolve(config, os.path.join(scratch, "plan"))
        out["3d (Hippocampus plan)"] = (config, 3)
    else:
        config.data.image_size = (40, 56, 40)
        config.model.base_features, config.model.depth = 16, 4
        config.model.max_features, config.train.batch_size = 256, 2
        config.model.pool_sizes, config.model.kernel_sizes = (), ()
        out["3d (base 16, depth 4)"] = (config, 3)
    return out


def _no_sync(*args, **kwargs):
    return None


def _save_times(state, directory: str, repeats: int) -> dict:
    """The StepTimer of the saves of each mode ("synced", "not synced")."""
    from medseg_jax import checkpoint, fileio, timing

    real = {"_fsync": fileio._fsync, "sync_folder": fileio.sync_folder}
    # The first save of each mode warms up.
    times = {"synced": timing.StepTimer(warmup=1), "not synced": timing.StepTimer(warmup=1)}
    ck = checkpoint.Checkpointer(directory, max_to_keep=2)
    try:
        step = 0
        for i in range(2 * repeats + 2):  # alternate; the first two warm up
            mode = "synced" if i % 2 == 0 else "not synced"
            for name, fn in real.items():
                setattr(fileio, name, fn if mode == "synced" else _no_sync)
            step += 1

            def save(step=step):
                ck.save(step, state, {"epoch": step}, {"val_dice": 0.0})
                ck.wait()  # Orbax's commit, then the syncs and the digest

            times[mode].call(save)
    finally:
        for name, fn in real.items():
            setattr(fileio, name, fn)
        ck.close()
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="", help="where to save (default: a temp folder)")
    parser.add_argument("--hippocampus", default=os.path.join(
        os.environ.get("MEDSEG_DATA", "/work/shared/data"), "Task04_Hippocampus"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from medseg_jax import workdir as workdir_lib
    from medseg_jax.models import count_params

    scratch = args.dir or tempfile.mkdtemp(prefix="sync_cost_")
    os.makedirs(scratch, exist_ok=True)
    print(f"CPU: {workdir_lib.cpu_model()}; saving under {scratch}")
    try:
        for name, (config, classes) in _configs(args.hippocampus, scratch).items():
            state = _state(config, classes)
            directory = os.path.join(scratch, name.split()[0], "checkpoints")
            times = _save_times(state, directory, args.repeats)
            size = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in
                       os.walk(directory) for f in fs) / max(1, len(os.listdir(directory)))
            synced, plain = (1000 * times[k].median()
                             for k in ("synced", "not synced"))
            epoch = EPOCH_SECONDS[name[:2]]
            runs = {k: [round(1000 * t) for t, _ in timer.windows] for k, timer in times.items()}
            print(f"{name}: {count_params(state.params):,} parameters, {size / 1e6:.1f} MB "
                  f"per checkpoint; ms per save (median of {args.repeats}): synced "
                  f"{synced:.0f}, not synced {plain:.0f}, difference {synced - plain:+.0f} ms "
                  f"= {100 * (synced - plain) / 1000 / epoch:+.3f}% of a {epoch:.0f} s epoch "
                  f"(runs: synced {runs['synced']}, not synced {runs['not synced']})")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
