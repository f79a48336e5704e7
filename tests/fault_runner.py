"""``python -m medseg_jax.main`` with a fault injected, for tests/test_preemption.py.

``MEDSEG_KILL_IN_SAVE=write:S`` SIGKILLs the process while it writes the
checkpoint of step S (the arrays written, its JSON items not yet);
``MEDSEG_KILL_IN_SAVE=rename:S`` SIGKILLs it once that checkpoint is complete
but before Orbax renames it into place. The package itself has no such hooks.
"""

import os
import signal

from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.path import atomicity

from medseg_jax import main

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


if __name__ == "__main__":
    fault = os.environ.get("MEDSEG_KILL_IN_SAVE")
    if fault:
        _install(*fault.split(":"))
    main.run()
