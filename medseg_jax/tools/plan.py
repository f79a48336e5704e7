"""Command line: plan a data set as nnU-Net does, print the plans and write them.

``python -m medseg_jax.tools.plan --root=../shared/data/Task04_Hippocampus
[--dims=3,2] [--budget=cpu|gpu|auto] [--out=plans.json] [--cost=true] [--time_steps=3]``

For each configuration (3D and 2D; 3D only for 3D data) it prints the plan with the
reason for every decision (``medseg_jax/planning``) and, with ``--cost``, XLA's cost
analysis of one training step of the planned U-Net (compiled at the planned shapes on
this machine's backend), the estimated cost of a run of ``--epochs`` x
``--steps_per_epoch`` steps and, with ``--time_steps``, the measured step time. The
plan is made from the training split that a run with the same seed makes
(``data.split_fractions``), so it is the plan that ``--config.data.plan=auto`` gives.
"""

from __future__ import annotations

import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_multi_string("root", None, "Data folder(s) (dataset.json); comma-separated "
                              "or repeated, as config.data.root.")
    flags.DEFINE_list("dims", ["3", "2"], "Configurations to plan: 3 and/or 2.")
    flags.DEFINE_enum("budget", "auto", ["auto", "cpu", "gpu"], "Budget preset.")
    flags.DEFINE_string("out", "", "Write the plans here as JSON (default: print only).")
    flags.DEFINE_bool("cost", True, "Compile one training step of each plan for XLA's cost "
                      "analysis (FLOPs, memory).")
    flags.DEFINE_integer("time_steps", 0, "Also time this many training steps (0: no).")
    flags.DEFINE_integer("epochs", 12, "Run length for the run-cost estimate: epochs ...")
    flags.DEFINE_integer("steps_per_epoch", 250, "... of this many steps (nnU-Net: 250).")
    flags.DEFINE_integer("seed", 0, "Split seed (as config.seed).")
    flags.mark_flags_as_required(["root"])


def xla_cost(config, num_classes: int, num_channels: int, time_steps: int = 0) -> dict:
    """XLA's figures for one training step of ``config`` (random data, this backend)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from medseg_jax import sharding, timing  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax.tools import throughput  # noqa: PLC0415

    mesh = sharding.make_mesh()
    setup = state_lib.initialize(config, num_classes, num_channels, 1000, mesh)
    state, step, shape = setup.state, setup.train_fn, setup.input_shape
    rng = np.random.default_rng(0)
    host = {"image": rng.standard_normal(shape).astype(np.float32),
            "label": rng.integers(0, num_classes, shape[:-1]).astype(np.uint8)}
    device_batch = sharding.to_global(host, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    out = {"compile_s": time.perf_counter() - t,
           "gflop_per_step": (throughput._cost(compiled).get("flops") or 0) / 1e9,
           "compiled_mib": (throughput.compiled_memory(compiled) or 0) / 2**20,
           "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
    if time_steps:
        holder = {"state": state}

        def one():
            holder["state"], result = compiled(holder["state"], device_batch)
            jax.block_until_ready(result)

        out["step_s"] = timing.StepTimer(warmup=1).time(one, time_steps)
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import fileio, planning  # noqa: PLC0415
    from medseg_jax.data import dataset as dataset_lib  # noqa: PLC0415
    from medseg_jax.data import decathlon  # noqa: PLC0415

    plans = {}
    with tempfile.TemporaryDirectory(prefix="plan_") as scratch:
        try:
            for dims in (int(d) for d in FLAGS.dims):
                config = config_lib.default_config()
                config.data.root = ",".join(decathlon.split_roots(FLAGS.root))
                config.seed = FLAGS.seed
                config.model.spatial_dims = dims
                config.data.image_size = ()
                config.train.batch_size = config.model.base_features = 0
                config.model.depth = config.model.max_features = 0
                config.data.plan, config.data.plan_budget = "auto", FLAGS.budget
                dataset = dataset_lib.open_dataset(config, scratch)
                if dims == 3 and all(info.is_2d for info in dataset.infos):
                    print("3D: skipped (2D data)\n")
                    continue
                resolved, record = planning.resolve(config, scratch)
                print(f"== {dims}D plan ({record['plan']['budget_preset']} budget) ==")
                print(record["summary"])
                for warning in record["warnings"]:
                    print(f"WARNING: {warning}")
                if FLAGS.cost:
                    cost = xla_cost(resolved, dataset.num_classes, dataset.num_channels,
                                    FLAGS.time_steps)
                    steps = FLAGS.epochs * FLAGS.steps_per_epoch
                    cost["run_tflop"] = cost["gflop_per_step"] * steps / 1e3
                    line = (f"XLA ({cost['device']}): {cost['gflop_per_step']:.1f} GFLOP per "
                            f"training step, {cost['compiled_mib']:.0f} MiB compiled; a run of "
                            f"{FLAGS.epochs} x {FLAGS.steps_per_epoch} steps: "
                            f"{cost['run_tflop']:.0f} TFLOP")
                    if "step_s" in cost:
                        cost["run_hours"] = cost["step_s"] * steps / 3600
                        line += (f", {cost['step_s']:.2f} s per step here: about "
                                 f"{cost['run_hours']:.1f} h of training")
                    print(line)
                    record["xla_cost"] = cost
                print()
                plans[f"{dims}d"] = record
        except (ValueError, OSError) as e:
            print(f"medseg_jax: error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(1)
    if FLAGS.out:
        fileio.write_json_atomic(FLAGS.out, plans)
        print(f"wrote {FLAGS.out}")


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
