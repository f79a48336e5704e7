"""A worker process (``gpu_suite.py --worker=STAGE --items=...``): runs its stage's items
one by one, each in a try, and writes one result file per item under the scratch folder;
``progress/STAGE.json`` says which item runs, so the driver can time it and name it when
the process dies. It stops at the end of its group of items (the next group gets a fresh
process).
"""

from __future__ import annotations

import os
import time
import traceback

from suite import commands, device, pipeline
from suite.common import log, read_json, write_json

RUNNERS = {"env": device.run_env, "layers": device.run_layers,
           "throughput": device.run_throughput, "torch_compare": commands.run_torch_compare,
           "pipeline": pipeline.run_pipeline,
           "time_to_accuracy": commands.run_time_to_accuracy}


def run_item(stage: str, item: dict, opts: dict, scratch: str) -> dict:
    """One item's result: the stage's own, or ``failed`` with the error in one line."""
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
    return result


def worker_main(stage: str, scratch: str, ids: list[str]) -> None:
    """Runs the items ``ids`` of ``stage`` that share the first one's group."""
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
        result = run_item(stage, item, opts, scratch)
        result["seconds"] = time.time() - t
        write_json(os.path.join(scratch, "results", stage, f"{item_id}.json"), result)
        log(f"[{stage}] {item_id}: {result['status']} in {result['seconds']:.1f} s"
            + (f" ({result['reason']})" if result.get("reason") else ""))
    write_json(progress, {"item": None})
