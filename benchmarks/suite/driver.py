"""The driver: runs the plan's stages in order, each group of items in a fresh worker
process (``gpu_suite.py --worker=STAGE``) with the item's and the stage's time limits,
records every item's result (an error, a crash or a timeout included) and rewrites
gpu_suite.json and gpu_suite.md after each one, so a run cut short keeps what it measured.
A stage's unused time passes to the next ones. No jax here.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time

from suite import machine, report
from suite.common import REPO, fileio, log, read_json, write_json
from suite.plan import make_plan

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.py")


class LogTail:
    """Copies a worker's log file to this process's stdout as it grows."""

    def __init__(self, path: str):
        """Starts at the file's current end."""
        self.path, self.pos = path, os.path.getsize(path) if os.path.exists(path) else 0
        self.start = self.pos

    def pump(self) -> None:
        """Copies what was written since the last call."""
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
        """The last ``n`` lines written since this tail started."""
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


def stage_status(items: dict) -> str:
    """ok (all ok), skipped (all skipped), partial (some ok) or failed."""
    statuses = [r.get("status") for r in items.values()]
    return ("ok" if all(s == "ok" for s in statuses) else
            "skipped" if all(s == "skipped" for s in statuses) else
            "partial" if "ok" in statuses else "failed")


class Suite:
    """One run of the suite: its plan, its report, its worker processes."""

    def __init__(self, opts: dict):
        """The plan of ``opts`` and an empty report."""
        self.opts = opts
        self.outdir = opts["outdir"]
        self.scratch = opts["scratch"]
        self.plan = make_plan(opts)
        self.t0 = time.time()
        self.env = dict(os.environ)
        self.report = {"suite": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "dry_run": opts["dry_run"], "command": opts["command"],
                                 "total_s": opts["total_s"]},
                       "setup": {}, "stages": {}}

    def save(self) -> None:
        """Rewrites gpu_suite.json and gpu_suite.md from the report so far."""
        self.report["suite"]["elapsed_s"] = time.time() - self.t0
        self.report["summary"] = report.summarise(self.report)
        write_json(os.path.join(self.outdir, "gpu_suite.json"), self.report)
        fileio.write_text_atomic(os.path.join(self.outdir, "gpu_suite.md"),
                                 report.markdown(self.report))

    def run(self) -> None:
        """The set-up, then every stage with its share of the time; the reports."""
        os.makedirs(self.outdir, exist_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        os.makedirs(self.scratch)
        write_json(os.path.join(self.scratch, "plan.json"), self.plan)
        for name, stage in self.plan["stages"].items():
            self.report["stages"][name] = {
                "status": "pending", "limit_s": stage["limit_s"],
                "items": {it["id"]: {"status": "pending"} for it in stage["items"]}}
        self.env, self.report["setup"] = machine.worker_env(self.opts)
        self.save()
        spare = 0.0  # time left unused by the stages so far
        names = list(self.plan["stages"])
        for i, name in enumerate(names):
            stage = self.plan["stages"][name]
            left = self.opts["total_s"] - (time.time() - self.t0)
            later = sum(self.plan["stages"][n]["limit_s"] for n in names[i + 1:])
            limit = max(0.0, min(stage["limit_s"] + spare, left - 0.5 * later))
            if name == "time_to_accuracy":  # the training budget is what is left
                self.plan["options"]["tta_budget_s"] = self.opts["tta_budget_s"] = min(
                    self.opts["tta_budget_s"] or 1e9, max(10.0, limit - 45))
                write_json(os.path.join(self.scratch, "plan.json"), self.plan)
            t = time.time()
            self.run_stage(name, stage, limit)
            used = time.time() - t
            if name != "env":  # env's fixed minute is not shared out
                spare = max(0.0, stage["limit_s"] + spare - used)
        self.report["suite"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.report["setup"]["load_average_end"] = list(os.getloadavg())
        self.save()
        log(f"\nsuite done in {time.time() - self.t0:.0f} s: "
            + ", ".join(f"{n} {s['status']}" for n, s in self.report["stages"].items()))
        log(f"reports: {os.path.join(self.outdir, 'gpu_suite.json')}, "
            f"{os.path.join(self.outdir, 'gpu_suite.md')}")

    def record(self, stage: str, item_id: str, result: dict) -> None:
        """Records one item's result and rewrites the reports."""
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
        """Worker processes until every item has a result or the stage's time is up."""
        items = {it["id"]: it for it in stage["items"]}
        pending = list(items)
        rep = self.report["stages"][name]
        rep.update(status="running", limit_s=limit)
        log(f"\n=== stage {name}: {len(pending)} item(s), limit {limit:.0f} s ===")
        t0 = time.time()
        deadline = t0 + limit
        log_path = os.path.join(self.scratch, "logs", f"{name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        env = dict(self.env)
        if name == "torch_compare":  # JAX preallocates 75% of the GPU by default
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")
        while pending:
            if time.time() >= deadline - 2:
                for item_id in pending:
                    self.record(name, item_id, {"status": "skipped",
                                                "reason": "stage time limit reached"})
                break
            pending = self.run_worker(name, items, pending, deadline, env, log_path)
        rep["status"] = stage_status(rep["items"])
        rep["seconds"] = time.time() - t0
        self.save()
        log(f"=== stage {name}: {rep['status']} in {rep['seconds']:.0f} s ===")

    def run_worker(self, name: str, items: dict, pending: list[str], deadline: float,
                   env: dict, log_path: str) -> list[str]:
        """One worker process on the pending items, stopped when its item or the stage
        runs out of time; records what it did. Returns the items still pending."""
        progress = os.path.join(self.scratch, "progress", f"{name}.json")
        if os.path.exists(progress):
            os.remove(progress)
        cmd = [sys.executable, SCRIPT, f"--worker={name}", f"--scratch={self.scratch}",
               f"--items={','.join(pending)}"]
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
        return self.settle(name, pending, proc, killed, tail)

    def settle(self, name: str, pending: list[str], proc: subprocess.Popen, killed,
               tail: LogTail) -> list[str]:
        """After a worker ends: the item it was on is a timeout (``killed``) or failed;
        a worker that died before its first item fails that item. Returns what is pending."""
        prog = read_json(os.path.join(self.scratch, "progress", f"{name}.json"), {}) or {}
        current = killed[0] if killed else prog.get("item")
        if current in pending:
            partial = read_json(os.path.join(self.scratch, "partial", name, f"{current}.json"))
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
        return pending
