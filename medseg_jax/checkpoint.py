"""Orbax checkpoints: the latest ones (for resume) and the best by validation Dice.

Each checkpoint holds two items: ``state`` (the TrainState pytree: step, params,
batch_stats, optimizer state) and ``meta`` (JSON: epoch, early-stopping
bookkeeping, validation figures). Orbax writes to a temporary folder and renames
it when complete, so a run killed during a save resumes from the previous one.

The retention policy is explicit: the newest ``max_to_keep`` checkpoints AND the
best one by ``val_dice`` are preserved, whatever their order (a plain
``max_to_keep`` with ``best_fn`` could delete the latest).
"""

from __future__ import annotations

import contextlib
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val_dice"
NEVER_BEST = -1.0  # below any Dice


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2, read_only: bool = False,
                 keep_every_seconds: float = 0.0):
        """``keep_every_seconds`` > 0 also keeps a checkpoint every that many seconds of
        the run (to evaluate the model reached after 15, 30, ... minutes)."""
        self.directory = os.path.abspath(directory)
        keep = [policies.LatestN(n=max(1, max_to_keep)),
                policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1)]
        if keep_every_seconds > 0:
            keep.append(policies.EveryNSeconds(interval_secs=int(keep_every_seconds)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            best_fn=lambda m: m[BEST_METRIC],
            best_mode="max",
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, meta: dict, metrics: dict | None) -> None:
        """Saves (asynchronously); waits for the previous save first.

        ``metrics=None`` (a mid-epoch save on SIGTERM, not validated) is never the best.
        """
        metrics = metrics or {BEST_METRIC: NEVER_BEST}
        with self._save_errors():
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
                metrics={k: float(v) for k, v in metrics.items()},
                force=True,
            )

    def wait(self) -> None:
        with self._save_errors():
            self._manager.wait_until_finished()

    def check(self) -> None:
        """Raises the error of a finished background save, if any; never blocks.

        (One process only: waiting is collective across hosts.)
        """
        if jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _save_errors(self):
        """A failed write (disk full, I/O error) -> one OSError naming the directory and
        the checkpoints left intact (Orbax only renames complete ones into place)."""
        try:
            yield
        except OSError as e:
            try:
                self._manager.reload()
                complete = sorted(self._manager.all_steps())
            except Exception:  # noqa: BLE001 (the listing is for the message only)
                complete = "unknown"
            where = f" ({e.filename})" if e.filename else ""
            raise OSError(
                e.errno,
                f"checkpoint save in {self.directory} failed: {e.strerror or e}{where}; the "
                f"complete checkpoints are intact (steps {complete}); free space and run "
                "the same command to resume from the latest") from e

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def resolve(self, which: str | int) -> int:
        """'best', 'latest' or a step number -> a step that exists, or ValueError."""
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"{self.directory}: no checkpoint found (train first)")
        if which == "best":
            step = self.best_step()
        elif which == "latest":
            step = self.latest_step()
        else:
            step = int(which)
        if step not in steps:
            raise ValueError(
                f"{self.directory}: no checkpoint for step {which}; kept steps: "
                f"{sorted(steps)}")
        return step

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores onto ``abstract_state`` (ShapeDtypeStructs with shardings)."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.directory}/{step}: checkpoint does not match this config's model "
                f"(architecture or sizes differ?): {str(e).splitlines()[0][:300]}") from e
        return restored.state, dict(restored.meta)


def abstract_like(state, sharding):
    """ShapeDtypeStructs of ``state`` placed with ``sharding`` (for restore)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
