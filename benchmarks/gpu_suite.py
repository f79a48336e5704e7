"""The GPU benchmark suite: every figure the GPU results page needs, in one run.

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

The data are read from the repository's data_carry/ folder (prepared by
benchmarks/prepare_data_carry.sh) unless --hippocampus_root / --hc18_root say otherwise.
OUTDIR/gpu_suite.json (all figures) and OUTDIR/gpu_suite.md (tables for docs/results) are
rewritten after every item, so a run cut short keeps what it measured. The time limits
add up to --total_s (default 540 s; a stage's unused time passes to the next ones).
``--dry_run``: every stage on the CPU at toy sizes (the embedded synthetic data unless
data roots are given), in about two minutes; ``tests/test_gpu_suite.py`` runs it.

This file parses the flags and hands over to benchmarks/suite/ (``suite/__init__.py``
lists its modules: the plan, the driver, the stages' workers, the report). Worker
processes: ``--worker=STAGE --items=...`` (internal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from suite.common import REPO
from suite.plan import DEFAULT_XLA_FLAGS, DRY_TOTAL_S, STAGES


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The suite's flags (``--worker`` / ``--items``: a worker process's, hidden)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outdir", default="gpu_suite_out", help="gpu_suite.json / .md go here.")
    p.add_argument("--dry_run", action="store_true", help="CPU, toy sizes (a test runs it).")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (env always runs).")
    p.add_argument("--total_s", type=float, default=None,
                   help=f"time for all stages (default 540 GPU, {DRY_TOTAL_S:.0f} dry run).")
    p.add_argument("--scratch", default="", help="work folder (default: a temporary one).")
    p.add_argument("--hippocampus_root", default=os.path.join(REPO, "data_carry",
                                                              "Task04_Hippocampus"),
                   help="Task04_Hippocampus (default: the one in the data folder that "
                        "benchmarks/prepare_data_carry.sh prepares).")
    p.add_argument("--hc18_root", default=os.path.join(REPO, "data_carry", "HC18_decathlon"),
                   help="converted HC18 (python -m medseg_jax.tools.convert_hc18) or the raw "
                        "challenge folder (converted on the fly).")
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


def options(args: argparse.Namespace, argv: list[str]) -> dict:
    """The run's options (the plan's ``options``, as gpu_suite.json records them)."""
    stages = ["env"] + [s.strip() for s in args.stages.split(",") if s.strip() and s != "env"]
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"--stages: unknown {', '.join(sorted(unknown))}; valid: {', '.join(STAGES)}")
    return {
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


def main(argv: list[str]) -> None:
    """A worker process's items, ``--check_plan``, or the whole suite."""
    args = parse_args(argv)
    if args.worker:
        from suite.worker import worker_main  # noqa: PLC0415

        worker_main(args.worker, args.scratch, args.items.split(","))
        return
    opts = options(args, argv)
    if args.check_plan:
        from suite.configs import check_plan  # noqa: PLC0415

        check_plan(opts)
        return
    from suite.driver import Suite  # noqa: PLC0415

    suite = Suite(opts)
    try:
        suite.run()
    finally:
        if not args.scratch:
            shutil.rmtree(opts["scratch"], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
