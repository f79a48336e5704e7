"""The workdir: one run at a time, a lock left by a dead run does not block, not writable."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_jax import evaluate, train, workdir

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from medseg_jax import workdir; held = workdir.lock(sys.argv[1]); "
        "held.__enter__(); print('held', flush=True); time.sleep(120)")


def _files(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def test_second_run_is_refused_and_a_dead_holder_does_not_block(make_tiny_config, tmp_path):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(run_dir)
        for run in (train.train, train.train_and_evaluate):
            with pytest.raises(workdir.WorkdirInUse) as error:
                run(make_tiny_config(), run_dir)
            message = str(error.value)
            assert "\n" not in message
            assert f"--workdir {run_dir} is in use by another run (pid {holder.pid} on " in message
        assert _files(run_dir) == before == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run" / ".lock").exists()  # left behind by the killed holder
    with workdir.lock(run_dir):  # ... and it does not block
        with workdir.lock(run_dir):  # re-entrant within a process
            assert f"pid {os.getpid()} " in (tmp_path / "run" / ".lock").read_text()


def test_eval_while_another_run_holds_the_workdir_is_refused(make_tiny_config, tmp_path):
    run_dir = str(tmp_path)
    (tmp_path / "splits.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirInUse, match=f"pid {holder.pid} "):
            evaluate.evaluate(make_tiny_config(), run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _not_writable_dirs(tmp_path):
    """Folders this process cannot write: a chmod-ed one (not as root), one under /sys."""
    found = []
    if os.geteuid() != 0:
        locked = tmp_path / "read_only"
        locked.mkdir()
        (locked / "config.json").write_text("{}")
        locked.chmod(0o555)
        found.append(str(locked))
    try:
        os.makedirs("/sys/medseg_jax_workdir")
    except OSError:  # sysfs: read-only, even for root: a new folder and an existing one
        found += ["/sys/medseg_jax_workdir", "/sys/kernel"]
    else:
        os.rmdir("/sys/medseg_jax_workdir")
    return found


def test_workdir_that_is_not_writable(make_tiny_config, tmp_path):
    dirs = _not_writable_dirs(tmp_path)
    if not dirs:
        pytest.skip("no folder here that this process cannot write")
    for run_dir in dirs:
        existed = os.path.isdir(run_dir)
        with pytest.raises(OSError) as error:
            train.train(make_tiny_config(), run_dir)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"--workdir {run_dir}: "), message
        if existed:
            assert "not writable (Permission denied" in message
            if run_dir.startswith(str(tmp_path)):
                assert _files(run_dir) == ["config.json"]
        else:
            assert "cannot create it (" in message
