"""The run's log: ``metrics.jsonl`` (one JSON object per log step and per epoch, the
source of truth) mirrored into TensorBoard event files (``events.py``). On resume the log
is cut back to the restored checkpoint's step, so a resumed run's log reads as if it had
never stopped."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from medseg_jax import events as events_lib
from medseg_jax import fileio, report


class MetricsLog:
    """metrics.jsonl, truncated on resume to what the restored checkpoint has seen (a line
    cut short by a kill or a full disk is dropped then too), mirrored into TensorBoard
    event files (``events.py``: scalars under ``train/`` per log step and ``epoch/`` per
    epoch, and the validation overlay image)."""

    def __init__(self, workdir: str, restored_step: int, class_names: list[str] | None = None,
                 resumed: bool = False, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self.class_names = list(class_names or [])
        if self.enabled and os.path.exists(self.path):
            rows = fileio.read_text_lines(self.path, "the run's log", LOG_RECOVER)
            kept = [r for r in rows if _row_step(r) <= restored_step]
            if len(kept) != len(rows):
                fileio.write_text_atomic(self.path, "".join(kept))
        self.events = events_lib.EventWriter(
            workdir, enabled=self.enabled and tensorboard,
            start_step=restored_step if resumed else None)

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            self.events.scalars(int(row["step"]), self._scalars(row))

    def _scalars(self, row: dict) -> dict[str, float]:
        section = "epoch" if "val_loss" in row else "train"
        out = {}
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            if isinstance(value, (list, tuple)):  # per class
                names = self.class_names or [str(i + 1) for i in range(len(value))]
                for name, v in zip(names, value):
                    out[f"{section}/{key}/{name}"] = v
            else:
                out[f"{section}/{key}"] = value
        return out

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        if self.enabled:
            self.events.image(step, tag, rgb)


LOG_RECOVER = ("move it aside: the run then starts a new log from the restored checkpoint "
               "(the checkpoints hold the training state)")


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank, cut or unreadable line."""
    row = report.metrics_row(line)
    return float("inf") if row is None else row.get("step", 0)
