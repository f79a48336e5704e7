"""Checkpoint failures: a save that cannot be written leaves the complete ones usable."""

import errno
import json
import os

import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import train


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
    assert f"checkpoint save in {workdir}/checkpoints failed: No space left on device" in message
    assert "the complete checkpoints are intact (steps [2])" in message
    assert error.value.errno == errno.ENOSPC
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ck.all_steps() == [2]  # the half-written step 4 is not a checkpoint
    ck.close()

    monkeypatch.undo()  # space freed: the same command resumes from step 2 and finishes
    meta = train.train(config, workdir)
    assert meta["epoch"] == 2
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2, 3]
