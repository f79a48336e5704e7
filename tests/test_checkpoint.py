"""Checkpoint failures: a save that cannot be written leaves the complete ones usable."""

import errno
import json
import logging
import os
import shutil
import stat
import sys

import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import fileio, train


def test_disk_full_during_a_save_keeps_the_previous_checkpoints(make_tiny_config, tmp_path,
                                                                monkeypatch):
    workdir = str(tmp_path)
    config = make_tiny_config(**{"train.num_epochs": 3, "train.patience": 0})
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, item, directory):
        if "/4.orbax-checkpoint-tmp" in str(directory):  # the arrays are written by now
            path = str(directory / "metadata")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return await original(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn",
                        disk_full_at_step_4)
    with pytest.raises(OSError) as error:
        train.train(config, workdir)
    message = str(error.value)
    assert "\n" not in message
    assert isinstance(error.value, ckpt_lib.SaveFailed)
    assert message.startswith(f"{workdir}/checkpoints/4: no space left on device "
                              "(checkpoint save failed); ")
    assert (f"the complete checkpoints are intact (steps [2] in {workdir}/checkpoints); "
            "free space and run the same command to resume from the latest") in message
    assert error.value.errno == errno.ENOSPC
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ck.all_steps() == [2]  # the half-written step 4 is not a checkpoint
    ck.close()

    monkeypatch.undo()  # space freed: the same command resumes from step 2 and finishes
    meta = train.train(config, workdir)
    assert meta["epoch"] == 2
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2, 3]


def _save(ck, step):
    ck.save(step, {"w": np.full((4,), float(step), np.float32)}, {"epoch": step},
            {"val_dice": 0.1 * step})
    ck.wait()


def _fail_writes_with(monkeypatch, error):
    async def failing(self, item, directory):
        raise error(directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing)


@pytest.mark.parametrize("kind", ["oserror", "tensorstore"])
def test_a_failed_save_lists_the_checkpoints_on_disk_now(tmp_path, monkeypatch, kind):
    """Checkpoints deleted during the run (one step; all of checkpoints/), then a save
    fails (a full disk, as an OSError or as TensorStore's ValueError): the message lists
    what the disk holds now, not what the run saved."""
    directory = str(tmp_path / "checkpoints")
    ck = ckpt_lib.Checkpointer(directory, max_to_keep=3)
    try:
        for step in (1, 2):
            _save(ck, step)
        assert ck.all_steps() == [1, 2]
        if kind == "oserror":
            shutil.rmtree(tmp_path / "checkpoints" / "1")
            _fail_writes_with(monkeypatch, lambda d: OSError(
                errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / "metadata")))
        else:
            shutil.rmtree(directory)
            _fail_writes_with(monkeypatch, lambda d: ValueError(
                f'RESOURCE_EXHAUSTED: Error writing local file "{d}/metadata": Failed to '
                "write 512 bytes to file 5: No space left on device [os_error_code='28']"))
        with pytest.raises(ckpt_lib.SaveFailed) as error:
            _save(ck, 3)
        message = str(error.value)
        assert error.value.errno == errno.ENOSPC and "\n" not in message
        assert message.startswith(f"{directory}/3: no space left on device")
        assert "free space and run the same command" in message
        if kind == "oserror":
            assert f"(steps [2] in {directory})" in message  # not step 1: deleted
        else:
            assert "no complete checkpoint is on the disk" in message
            assert "steps [" not in message
    finally:
        monkeypatch.undo()
        ck.close()


def test_a_saved_checkpoint_is_synced_before_its_digest(tmp_path, monkeypatch):
    """Every file of a committed checkpoint, its folder and checkpoints/ are synced
    to the disk before the digest is written (and the digest itself after)."""
    synced = []
    original = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return original(fd)

    directory = tmp_path / "checkpoints"
    ck = ckpt_lib.Checkpointer(str(directory))
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        _save(ck, 1)
    finally:
        ck.close()
    step = directory / "1"
    files = [str(p) for p in step.rglob("*") if p.is_file() and p.name != ckpt_lib.DIGEST_NAME]
    assert files and set(files) <= set(synced)
    assert {str(step), str(directory)} <= set(synced)
    digest = next(i for i, p in enumerate(synced)  # its temporary name, before the rename
                  if p.startswith(f"{step}/.tmp_") and p.endswith(f"_{ckpt_lib.DIGEST_NAME}"))
    assert digest > max(synced.index(f) for f in files)


def test_atomic_writes_sync_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    original = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"),
                       stat.S_ISDIR(os.fstat(fd).st_mode)))
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fileio.write_json_atomic(str(tmp_path / "config.json"), {"a": 1})
    assert len(synced) == 2
    (tmp_name, tmp_is_dir), folder = synced
    assert not tmp_is_dir and os.path.basename(tmp_name).endswith("_config.json")
    assert folder == (str(tmp_path), True)  # after the rename
    synced.clear()
    with fileio.build_folder(str(tmp_path / "built")) as tmp:
        for name in ("a.npy", "b.json"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("x")
    names = {os.path.basename(p) for p, is_dir in synced if not is_dir}
    assert names == {"a.npy", "b.json"}
    assert (str(tmp_path), True) == synced[-1]  # the parent, after the rename


def test_disk_full_in_an_atomic_write_names_the_target_and_keeps_the_old_file(
        tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text('{"old": true}\n')

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as error:
        fileio.write_json_atomic(str(path), {"new": True})
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert fileio.is_disk_full(error.value)
    assert path.read_text() == '{"old": true}\n' and os.listdir(tmp_path) == ["config.json"]


def test_unretrieved_errors_of_abandoned_writes_are_not_reported(tmp_path, caplog):
    """Orbax abandons the per-array gathers of a save that failed; asyncio would report
    each one (``_GatheringFuture exception was never retrieved``) after the run's line."""
    import asyncio
    import gc

    ckpt_lib.install_quiet_reports()  # as the entry point does; a second call adds nothing
    assert sum(isinstance(f, ckpt_lib._UnretrievedTaskFilter)
               for f in logging.getLogger("asyncio").filters) == 1

    async def write():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def save():
        abandoned = asyncio.gather(write())
        await asyncio.sleep(0.01)  # it failed; nobody retrieves its error
        del abandoned

    asyncio.run(save())
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    logging.getLogger("asyncio").error("Unrelated failure")  # other reports get through
    assert [r.getMessage() for r in caplog.records] == ["Unrelated failure"]


def test_a_checkpointer_closes_on_leaving_its_block_also_on_an_error(tmp_path):
    """``with Checkpointer(...)``: the pending save is finished (its digest written)
    and the manager closed when the block ends by an error, which goes through
    unchanged; constructing one installs nothing process-wide."""
    hook, filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
    directory = tmp_path / "checkpoints"
    with pytest.raises(KeyError, match="in the block"):
        with ckpt_lib.Checkpointer(str(directory)) as ck:
            assert sys.unraisablehook is hook
            assert logging.getLogger("asyncio").filters == filters
            ck.save(1, {"w": np.zeros((4,), np.float32)}, {"epoch": 1}, {"val_dice": 0.5})
            raise KeyError("in the block")
    assert (directory / "1" / ckpt_lib.DIGEST_NAME).is_file()
    assert ck._closed
    ck.close()  # a second close does nothing
    with ckpt_lib.Checkpointer(str(directory), read_only=True) as ck:
        assert ck.all_steps() == [1] and ck.verify(1)
