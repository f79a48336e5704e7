"""The run's metric writers: ``metrics.jsonl`` (the source of truth) and TensorBoard event
files behind one interface, in the pattern of CLU's ``MetricWriter``: each record is
written through a ``MultiWriter`` to every writer, and on resume every writer drops what
it holds past the restored checkpoint's step (``truncate``), so a resumed run's log reads
as if it had never stopped. Only process 0 writes; the others get a writer that writes
nothing.

TensorBoard files hold tensorboardX's protocol buffers (no TensorFlow, no torch) in
TFRecord frames; the viewer itself is the ``tensorboard`` extra.
"""

from __future__ import annotations

import abc
import itertools
import json
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from tensorboardX import record_writer, summary
from tensorboardX.proto import event_pb2, summary_pb2

from medseg_jax import fileio, report

Scalars = Mapping[str, float | Sequence[float]]  # a sequence: one value per class

LOG_RECOVER = ("move it aside: the run then starts a new log from the restored checkpoint "
               "(the checkpoints hold the training state)")

_COORDINATES = ("step", "epoch", "section")  # a row's keys that are not metrics


class MetricWriter(abc.ABC):
    """Writes a run's records: scalars per step in a named section (``train`` per log
    step, ``epoch`` per epoch), and images."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Scalars, *, section: str,
                      epoch: int | None = None) -> None:
        """One record of ``scalars`` at ``step`` (``epoch``: the epoch it belongs to)."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images by tag, each (height, width, 3) uint8."""

    @abc.abstractmethod
    def truncate(self, after_step: int) -> None:
        """Drops the records past ``after_step`` (a resume from that step's checkpoint)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Pushes what is written to the file system."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and closes the files."""


class JsonlWriter(MetricWriter):
    """``metrics.jsonl``: one JSON object a record, ``{"step", "epoch", "section", ...}``
    with keys sorted; a per-class value is a list. Images are not written here. Each record
    is flushed at once: a killed run loses nothing it logged."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None

    def write_scalars(self, step, scalars, *, section, epoch=None):
        reserved = set(_COORDINATES) & set(scalars)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are the record's own keys")
        row = {"step": int(step), "section": section, **scalars}
        if epoch is not None:
            row["epoch"] = int(epoch)
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def write_images(self, step, images):
        pass  # metrics.jsonl holds numbers only; the images go to TensorBoard

    def truncate(self, after_step):
        """Keeps the rows up to ``after_step``; a line cut short by a kill or a full disk
        is dropped too (the file is rewritten atomically, only when a row goes)."""
        self.close()
        rows = fileio.read_text_lines(self.path, "the run's log", LOG_RECOVER)
        kept = [r for r in rows if _row_step(r) <= after_step]
        if len(kept) != len(rows):
            fileio.write_text_atomic(self.path, "".join(kept))

    def flush(self):
        if self._file is not None:
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank, cut or unreadable line."""
    row = report.metrics_row(line)
    return float("inf") if row is None else row.get("step", 0)


class TensorBoardWriter(MetricWriter):
    """One new event file ``<workdir>/events.out.tfevents.<time>.<host>.<pid>`` a run,
    opened at the first record and kept open: a scalar ``<section>/<name>`` (per class
    ``<section>/<name>/<class name>``; non-finite values are left out) per record, each
    record one event, flushed at once.

    ``truncate(step)`` writes a ``SessionLog.START`` event at ``step + 1``: TensorBoard's
    reader then drops the events past ``step`` that earlier files of the workdir hold,
    as ``metrics.jsonl`` drops its rows past it.
    """

    def __init__(self, workdir: str, class_names: Sequence[str] = ()):
        self.workdir = workdir
        self.class_names = list(class_names)
        self.path = None
        self._file = None
        self._start_step = None

    def _open(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        base = os.path.join(self.workdir, "events.out.tfevents."
                            f"{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
        for n in itertools.count():  # a new file, never an earlier run's (same second)
            self.path = f"{base}.{n}" if n else base
            try:
                self._file = open(self.path, "xb")
                break
            except FileExistsError:
                continue
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if self._start_step is not None:
            self._write_start()

    def _write(self, event) -> None:
        """One TFRecord frame: length, its masked CRC-32C, the event, the event's."""
        if self._file is None:
            self._open()
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", record_writer.masked_crc32c(header))
                         + data + struct.pack("<I", record_writer.masked_crc32c(data)))

    def _write_start(self) -> None:
        self._write(event_pb2.Event(
            wall_time=time.time(), step=self._start_step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _values(self, section: str, scalars: Scalars):
        for name, value in scalars.items():
            if isinstance(value, (list, tuple, np.ndarray)):  # per class
                names = self.class_names or [str(i + 1) for i in range(len(value))]
                pairs = [(f"{section}/{name}/{c}", v) for c, v in zip(names, value)]
            else:
                pairs = [(f"{section}/{name}", value)]
            for tag, v in pairs:
                if v is not None and np.isfinite(v):
                    yield summary_pb2.Summary.Value(tag=tag, simple_value=float(v))

    def write_scalars(self, step, scalars, *, section, epoch=None):
        values = list(self._values(section, scalars))
        if values:
            self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))
            self.flush()

    def write_images(self, step, images):
        values = [summary_pb2.Summary.Value(
            tag=tag, image=summary.make_image(np.ascontiguousarray(rgb, np.uint8)))
            for tag, rgb in images.items()]
        if values:
            self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))
            self.flush()

    def truncate(self, after_step):
        self._start_step = int(after_step) + 1
        if self._file is not None:
            self._write_start()
            self.flush()

    def flush(self):
        if self._file is not None:
            self._file.flush()  # to the OS: a killed process loses nothing (no fsync)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class MultiWriter(MetricWriter):
    """Every record to each of ``writers``; with none, a writer that writes nothing."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars, *, section, epoch=None):
        for w in self.writers:
            w.write_scalars(step, scalars, section=section, epoch=epoch)

    def write_images(self, step, images):
        for w in self.writers:
            w.write_images(step, images)

    def truncate(self, after_step):
        for w in self.writers:
            w.truncate(after_step)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create(workdir: str, restored_step: int, class_names: Sequence[str] = (),
           tensorboard: bool = True) -> MultiWriter:
    """The run's writers (``metrics.jsonl``, and TensorBoard's with ``tensorboard``) on
    process 0, cut back to ``restored_step``; none on the other processes."""
    if jax.process_index() != 0:
        return MultiWriter([])
    writers = [JsonlWriter(workdir)]
    if tensorboard:
        writers.append(TensorBoardWriter(workdir, class_names))
    multi = MultiWriter(writers)
    multi.truncate(restored_step)
    return multi
