"""TensorBoard event files: framing, protocol buffers, and what a run writes."""

import json
import os
import struct

import numpy as np
import pytest

from medseg_jax import events


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) test vectors for CRC-32C.
    assert events.crc32c(b"") == 0
    assert events.crc32c(b"123456789") == 0xE3069283
    assert events.crc32c(bytes(32)) == 0x8A9136AA
    assert events.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def _read_records(path):
    """The payloads of a TFRecord file, checking both CRCs of every frame."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        header = data[i:i + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[i + 8:i + 12])
        assert crc == events.masked_crc(header)
        payload = data[i + 12:i + 12 + length]
        (crc,) = struct.unpack("<I", data[i + 12 + length:i + 16 + length])
        assert crc == events.masked_crc(payload)
        out.append(payload)
        i += 16 + length
    return out


def test_writer_frames_every_event(tmp_path):
    writer = events.EventWriter(str(tmp_path), start_step=5)
    writer.scalars(7, {"train/loss": 0.5, "skipped": float("nan")})
    writer.image(7, "val", np.zeros((4, 6, 3), np.uint8))
    records = _read_records(writer.path)
    assert len(records) == 4  # version, session start, scalars, image
    assert b"brain.Event:2" in records[0]
    assert b"train/loss" in records[2] and b"skipped" not in records[2]
    assert records[3].count(b"\x89PNG") == 1
    assert events.EventWriter(str(tmp_path / "off"), enabled=False).path is None
    assert not (tmp_path / "off").exists()


def test_tensorboard_reads_scalars_and_images(tmp_path):
    """TensorBoard's own reader (when installed) reads back what the writer wrote."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    writer = events.EventWriter(str(tmp_path))
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.4)):
        writer.scalars(step, {"train/loss": loss, "epoch/val_dice/lesion": 1 - loss})
    rgb = events.overlay(np.random.default_rng(0).random((8, 6)),
                         np.pad(np.ones((4, 2), np.uint8), ((2, 2), (2, 2))),
                         np.pad(np.ones((4, 4), np.uint8), ((2, 2), (1, 1))), scale=2)
    writer.image(3, "epoch/val_overlay", rgb)
    acc = accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [0.9, 0.7, 0.4], rtol=1e-6)
    assert [e.step for e in acc.Scalars("epoch/val_dice/lesion")] == [1, 2, 3]
    (image,) = acc.Images("epoch/val_overlay")
    assert (image.height, image.width) == rgb.shape[:2] == (12, 16)


def test_overlay_draws_both_outlines():
    image = np.zeros((10, 10))
    ref = np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[5:9, 5:9] = 1
    rgb = events.overlay(image, ref, pred)
    green = (rgb == (0, 255, 0)).all(-1)
    red = (rgb == (255, 0, 0)).all(-1)
    assert green.sum() and red.sum()
    # Upright: array x to the right, y up (row 0 is the top, y = 9).
    assert red[0:5].sum() > 0 and green[0:4].sum() == 0


def test_a_run_writes_events_beside_metrics_jsonl(tmp_path, make_tiny_config):
    """Every scalar of the event file is a value of metrics.jsonl at its step, and every
    finite value of metrics.jsonl is in the event file (train/ per log step, epoch/ per
    epoch, lists per class)."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    from medseg_jax import train

    config = make_tiny_config()
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    names = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")]
    assert len(names) == 1
    acc = accumulator.EventAccumulator(workdir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/grad_norm", "epoch/val_loss", "epoch/val_dice",
            "epoch/val_dice_per_class/lesion"} <= set(tags["scalars"])
    assert [e.step for e in acc.Images("epoch/val_overlay")] == [2, 4]
    assert len(acc.Scalars("epoch/val_dice")) == config.train.num_epochs

    expected = {}  # tag -> [(step, value)] from metrics.jsonl
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # Steps 2..4 (the first, with the compilation, is not timed) and the two epochs.
    assert [(r["step"], "val_loss" in r) for r in rows] == [
        (2, False), (2, True), (3, False), (4, False), (4, True)]
    for row in rows:
        section = "epoch" if "val_loss" in row else "train"
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            named = ({f"{key}/lesion": value[0]} if isinstance(value, list)
                     else {key: value})
            assert not isinstance(value, list) or len(value) == 1  # one class: lesion
            for name, v in named.items():
                if np.isfinite(v):
                    expected.setdefault(f"{section}/{name}", []).append((row["step"], v))
    assert {"train/loss", "train/grad_norm", "train/images_per_second", "epoch/train_loss",
            "epoch/val_loss", "epoch/val_dice", "epoch/epoch_seconds"} <= set(expected)
    assert set(tags["scalars"]) == set(expected)
    for tag, points in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [step for step, _ in points], tag
        np.testing.assert_array_equal(np.float32([e.value for e in events]),
                                      np.float32([v for _, v in points]), err_msg=tag)
