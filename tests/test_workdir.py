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


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    """The lock is on the folder: a run that finds ``.lock`` deleted (or recreated by
    hand) is still refused while the first lives, and writes nothing."""
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.unlink(tmp_path / "run" / ".lock")
        with pytest.raises(workdir.WorkdirInUse, match="its .lock was removed") as error:
            with workdir.lock(run_dir):
                pass
        if os.path.exists("/proc/locks"):  # Linux: the holder found there
            assert f"(pid {holder.pid} on this host: its .lock was removed;" in str(error.value)
        assert _files(run_dir) == []  # the refused run wrote no .lock
        (tmp_path / "run" / ".lock").write_text("")  # recreated by hand
        with pytest.raises(workdir.WorkdirInUse, match=f"--workdir {run_dir} is in use"):
            with workdir.lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir.lock(run_dir):  # the holder is gone: free
        assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_lock_on_the_lock_file_where_a_folder_cannot_be_locked(tmp_path, monkeypatch):
    """Network file systems that cannot flock a folder: the lock is on ``.lock`` itself
    (checked to be the file the path names after locking it)."""
    import errno
    import fcntl
    import stat

    original = fcntl.flock

    def flock(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return original(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    run_dir = str(tmp_path / "run")
    with workdir.lock(run_dir):
        path = tmp_path / "run" / ".lock"
        assert path.read_text().startswith(f"pid {os.getpid()} ")
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                original(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held on the file
        finally:
            os.close(fd)


def test_a_failed_start_removes_only_the_workdir_it_created(tmp_path):
    new, empty, used = tmp_path / "new" / "run", tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    for folder in (new, empty, used):
        with pytest.raises(ValueError, match="bad data"):
            with workdir.lock(str(folder)):
                with workdir.lock(str(folder)):  # re-entrant: removed by the outer one only
                    assert (folder / ".lock").exists()
                raise ValueError("bad data")
    assert not new.exists()
    assert _files(empty) == [".lock"]  # was there before: kept (the lock's own file stays)
    assert _files(used) == [".lock", "notes.txt"] and (used / "notes.txt").read_text() == "mine"
    with workdir.lock(str(new)):  # created, and something written: kept
        (new / "config.json").write_text("{}")
    assert _files(new) == [".lock", "config.json"]


def test_disk_full_at_start_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run_dir = tmp_path / "run"
    monkeypatch.setattr(workdir, "_write_holder", no_space)
    with pytest.raises(OSError) as error:
        with workdir.lock(str(run_dir)):
            pass
    assert error.value.errno == errno.ENOSPC
    assert error.value.filename == str(run_dir / ".lock")
    assert not run_dir.exists()
