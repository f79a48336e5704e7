"""``python -m medseg_jax.main`` with a fault injected, for tests/test_preemption.py.

``MEDSEG_KILL_IN_SAVE=write:S`` SIGKILLs the process while it writes the
checkpoint of step S (the arrays written, its JSON items not yet);
``MEDSEG_KILL_IN_SAVE=rename:S`` SIGKILLs it once that checkpoint is complete
but before Orbax renames it into place. ``MEDSEG_SIGNAL_AT_STEP=15:S`` sends the
process a real SIGTERM (15) when the loop takes the batch of step S.
``MEDSEG_DISK_FULL=file:NAME`` makes syncing the atomic write of any file called NAME
fail with ENOSPC; ``MEDSEG_DISK_FULL=checkpoint:S`` makes writing the checkpoint of
step S fail with ENOSPC (an OSError), ``MEDSEG_DISK_FULL=tensorstore:S`` with the
ValueError TensorStore raises on a full disk. The package itself has no such hooks.
"""

import collections
import errno
import os
import signal

from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.path import atomicity

from medseg_jax import fileio, main, sharding
from medseg_jax.data import loader

SUFFIX = ".orbax-checkpoint-tmp"


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kind: str, step: str) -> None:
    step_dir = f"{step}{SUFFIX}"
    if kind == "write":
        original_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

        async def save_fn(self, item, directory):
            if f"/{step_dir}/" in str(directory):  # an item of step S being written
                _kill()
            return await original_save(self, item, directory)

        json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_fn
    elif kind == "rename":
        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if os.path.basename(str(self.get())) == step_dir:  # step S, complete
                _kill()
            return await original_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:
        raise ValueError(f"MEDSEG_KILL_IN_SAVE: unknown kind {kind!r}")


def _signal_at_step(signum: str, step: str) -> None:
    """Sends the signal when the training loop takes the device batch of step S (batches
    are prefetched ahead, so the moment a batch is read from the pipeline is earlier)."""
    original, marked = loader.run_batches, set()

    def run_batches(train, config, steps, first=0, last=None):
        for i, batch in enumerate(original(train, config, steps, first, last), first):
            if i + 1 == int(step):
                marked.add(id(batch))
            yield batch

    def prefetch_to_device(batches, mesh, size=2):
        queue = collections.deque()
        for batch in batches:
            queue.append((id(batch) in marked, sharding.to_global(batch, mesh)))
            if len(queue) > size:
                yield _take(queue)
        while queue:
            yield _take(queue)

    def _take(queue):
        flagged, device_batch = queue.popleft()
        if flagged:
            os.kill(os.getpid(), int(signum))
        return device_batch

    loader.run_batches = run_batches
    sharding.prefetch_to_device = prefetch_to_device


def _disk_full(kind: str, where: str) -> None:
    no_space = os.strerror(errno.ENOSPC)
    if kind == "file":
        original_fsync = fileio._fsync

        def fsync(path, folder=False):
            if not folder and os.path.basename(path).endswith(f"_{where}"):  # its temp file
                raise OSError(errno.ENOSPC, no_space)
            return original_fsync(path, folder)

        fileio._fsync = fsync
        return
    step_dir = f"/{where}{SUFFIX}/"
    original_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, item, directory):
        if step_dir in str(directory):
            if kind == "checkpoint":
                raise OSError(errno.ENOSPC, no_space, str(directory / "metadata"))
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{directory}/'
                             f'metadata": Failed to write 512 bytes to file 5: {no_space} '
                             "[os_error_code='28']")
        return await original_save(self, item, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_fn


if __name__ == "__main__":
    if os.environ.get("MEDSEG_DISK_FULL"):
        _disk_full(*os.environ["MEDSEG_DISK_FULL"].split(":", 1))
    if os.environ.get("MEDSEG_KILL_IN_SAVE"):
        _install(*os.environ["MEDSEG_KILL_IN_SAVE"].split(":"))
    if os.environ.get("MEDSEG_SIGNAL_AT_STEP"):
        _signal_at_step(*os.environ["MEDSEG_SIGNAL_AT_STEP"].split(":"))
    main.run()
