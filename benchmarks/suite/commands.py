"""The stages that run another command and read what it writes: ``torch_compare``
(``benchmarks/torch_compare.py``, its JSON) and ``time_to_accuracy``
(``python -m medseg_jax.main``, its ``metrics.jsonl`` followed while it trains).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from suite.common import REPO, log, read_json


def run_torch_compare(item: dict, opts: dict, scratch: str) -> dict:
    """benchmarks/torch_compare.py with the item's flags; its JSON is the result
    (skipped, with the reason, when PyTorch is not installed)."""
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


def _train_command(item: dict, root: str, work: str, dry: bool) -> list[str]:
    """The training command: the 3D U-Net of the item, trained until stopped."""
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
    return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def _curve_rows(metrics: str, seen: int, t0: float) -> tuple[list[dict], int]:
    """The validations logged in ``metrics`` after its first ``seen`` rows, as curve
    points (wall time since ``t0``); and the new number of rows seen."""
    rows = []
    try:
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    points = []
    for r in rows[seen:]:
        if "val_dice" in r:
            points.append({"wall_s": time.time() - t0, "step": r["step"],
                           "epoch": r["epoch"], "val_dice": r["val_dice"],
                           "val_dice_per_class": r.get("val_dice_per_class"),
                           "train_loss": r.get("train_loss"),
                           "epoch_s": r.get("epoch_seconds")})
    return points, len(rows)


def _follow(proc: subprocess.Popen, metrics: str, target: float, budget: float,
            t0: float) -> tuple[list[dict], dict | None, str | None]:
    """Follows the training's validations until the Dice reaches ``target`` or ``budget``
    seconds pass, then stops it (SIGTERM: it saves a checkpoint and exits 143).
    Returns (curve, the point that reached the target, why it was stopped)."""
    curve, seen, reached, stop_reason = [], 0, None, None
    try:
        while proc.poll() is None:
            time.sleep(0.25)
            points, seen = _curve_rows(metrics, seen, t0)
            for point in points:
                curve.append(point)
                log(f"  {point['wall_s']:6.1f} s step {point['step']}: val Dice "
                    f"{point['val_dice']:.4f}")
                if reached is None and point["val_dice"] >= target:
                    reached = point
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
    return curve, reached, stop_reason


def run_time_to_accuracy(item: dict, opts: dict, scratch: str) -> dict:
    """python -m medseg_jax.main on Hippocampus 3D, stopped (SIGTERM: the package saves a
    checkpoint and exits 143) when the validation Dice reaches the target or the budget
    ends; the Dice of every validation against the wall time since the command started."""
    dry, root, note = opts["dry_run"], opts["hippocampus_root"], ""
    budget, target = opts["tta_budget_s"], opts["target_dice"]
    if not (root and os.path.isdir(root)):
        if not dry:
            return {"status": "skipped", "reason": f"Hippocampus not found at {root!r}: "
                    "prepare the data folder with benchmarks/prepare_data_carry.sh or pass "
                    "--hippocampus_root"}
        note, root = "embedded synthetic data (no Hippocampus root)", ""
    work = os.path.join(scratch, "time_to_accuracy")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cmd = _train_command(item, root, work, dry)
    log("  $ " + " ".join(shlex.quote(c) for c in cmd))
    log_path = os.path.join(work, "main.log")
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        curve, reached, stop_reason = _follow(proc, os.path.join(work, "run", "metrics.jsonl"),
                                              target, budget, t0)
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
