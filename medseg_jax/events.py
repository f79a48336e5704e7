"""TensorBoard event files of a run: scalars and images, no TensorFlow needed.

Every run writes ``<workdir>/events.out.tfevents.<time>.<host>`` beside its
``metrics.jsonl`` (which stays the source of truth), so ``tensorboard --logdir runs``
shows all runs side by side, each under its workdir's name. The file format is
TensorFlow's: TFRecord framing (length, masked CRC-32C, payload, masked CRC-32C)
around ``Event`` protocol buffers, encoded here by hand (a few fields of
``tensorflow/core/util/event.proto`` and ``summary.proto``), as flax's examples get
through clu's metric writers without depending on them.

A resumed run first writes a ``SessionLog.START`` event at its restored step:
TensorBoard then drops the events past that step that the interrupted run had
written, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time

import numpy as np

# --------------------------------------------------------------------------- #
# CRC-32C (Castagnoli), as TFRecord frames use it
# --------------------------------------------------------------------------- #


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(payload: bytes) -> bytes:
    """One TFRecord frame."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc(length)) + payload
            + struct.pack("<I", masked_crc(payload)))


# --------------------------------------------------------------------------- #
# Protocol buffer encoding of the few messages needed
# --------------------------------------------------------------------------- #


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def _double(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", float(value))


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", float(value))


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _event(step: int, wall_time: float, body: bytes) -> bytes:
    """Event: wall_time = 1 (double), step = 2 (int64), then the body's fields."""
    return _double(1, wall_time) + _int(2, step) + body


def scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value: tag = 1, simple_value = 2."""
    return _bytes(1, tag.encode()) + _float(2, value)


def image_value(tag: str, png: bytes, height: int, width: int, channels: int = 3) -> bytes:
    """Summary.Value: tag = 1, image = 4 (Image: height 1, width 2, colorspace 3,
    encoded_image_string 4)."""
    image = _int(1, height) + _int(2, width) + _int(3, channels) + _bytes(4, png)
    return _bytes(1, tag.encode()) + _bytes(4, image)


def _summary(values: list[bytes]) -> bytes:
    """Event.summary = 5: Summary { repeated Value value = 1 }."""
    return _bytes(5, b"".join(_bytes(1, v) for v in values))


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes."""
    from PIL import Image  # noqa: PLC0415 (a matplotlib dependency)

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray,
            scale: int = 1) -> np.ndarray:
    """A 2D slice (x, y) drawn upright (y up) as RGB, with the reference outline in green
    and the predicted one in red (every class), each pixel repeated ``scale`` times."""
    from scipy import ndimage  # noqa: PLC0415

    lo, hi = np.percentile(image, [1, 99])
    gray = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    rgb = np.repeat((255 * gray)[..., None], 3, axis=-1).astype(np.uint8)
    for labels, colour in ((reference, (0, 255, 0)), (prediction, (255, 0, 0))):
        edge = np.zeros(labels.shape, bool)
        for value in np.unique(labels):
            if value:
                mask = labels == value
                edge |= mask ^ ndimage.binary_erosion(mask)
        rgb[edge] = colour
    rgb = rgb.transpose(1, 0, 2)[::-1]  # rows = y from the top, columns = x
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return rgb


# --------------------------------------------------------------------------- #
# The writer
# --------------------------------------------------------------------------- #


class EventWriter:
    """Appends scalar and image events to one new event file in ``directory``.

    ``enabled=False`` (processes other than 0) writes nothing. Every event is flushed
    at once: a killed run loses nothing it logged.
    """

    def __init__(self, directory: str, enabled: bool = True, start_step: int | None = None):
        self.path = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self._write(_double(1, time.time()) + _bytes(3, b"brain.Event:2"))
        if start_step is not None:  # SessionLog { status = START (1) } = Event field 6
            self._write(_event(start_step, time.time(), _bytes(6, _int(1, 1))))

    def _write(self, event: bytes) -> None:
        if self.path is None:
            return
        with open(self.path, "ab") as f:
            f.write(record(event))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        finite = [scalar_value(tag, v) for tag, v in values.items()
                  if v is not None and np.isfinite(v)]
        if finite:
            self._write(_event(step, time.time(), _summary(finite)))

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        self._write(_event(step, time.time(),
                           _summary([image_value(tag, png_bytes(rgb), height, width)])))
