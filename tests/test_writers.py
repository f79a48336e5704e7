"""The run's writers: metrics.jsonl and TensorBoard event files, cut back on resume,
written by process 0 only, and what a training run writes through them."""

import builtins
import io
import json
import os

import numpy as np
import pytest

from medseg_jax import report, writers

def _read(directory):
    """TensorBoard's own reader (the test extra) on ``directory``."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(directory),
                                       size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture
def opened(monkeypatch):
    """The paths opened for writing (with their mode) while a test runs."""
    calls, real_open = [], builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax"):
            calls.append((os.path.basename(str(file)), mode))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return calls


def test_tensorboard_reads_scalars_per_class_and_images(tmp_path):
    """TensorBoard's own reader reads back what the writer wrote: scalars under their
    section, per-class lists under the class names, non-finite values left out, and the
    image's pixels as given."""
    writer = writers.TensorBoardWriter(str(tmp_path), class_names=["liver", "lesion"])
    assert writer.path is None and not list(tmp_path.iterdir())  # opened at the first record
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.4)):
        writer.write_scalars(step, {"loss": loss, "skipped": float("nan")}, section="train")
    writer.write_scalars(3, {"val_dice_per_class": [0.5, 0.25]}, section="epoch", epoch=1)
    rgb = report.overlay(np.random.default_rng(0).random((8, 6)),
                         np.pad(np.ones((4, 2), np.uint8), ((2, 2), (2, 2))),
                         np.pad(np.ones((4, 4), np.uint8), ((2, 2), (1, 1))), scale=2)
    writer.write_images(3, {"epoch/val_overlay": rgb})
    writer.close()
    acc = _read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "epoch/val_dice_per_class/liver",
                                          "epoch/val_dice_per_class/lesion"}
    assert [s for s, _ in _scalars(acc, "train/loss")] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in _scalars(acc, "train/loss")], [0.9, 0.7, 0.4],
                               rtol=1e-6)
    assert _scalars(acc, "epoch/val_dice_per_class/lesion") == [(3, 0.25)]
    (image,) = acc.Images("epoch/val_overlay")
    assert (image.step, image.height, image.width) == (3, 12, 16) == (3, *rgb.shape[:2])
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))),
                                  rgb)


def test_event_file_is_opened_once_and_flushed_at_each_record(tmp_path, opened):
    writer = writers.TensorBoardWriter(str(tmp_path))
    sizes = []
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": 1.0 / step}, section="train")
        sizes.append(os.path.getsize(writer.path))  # on disk before the file is closed
    writer.write_images(5, {"epoch/val_overlay": np.zeros((4, 6, 3), np.uint8)})
    assert os.path.getsize(writer.path) > sizes[-1]
    writer.close()
    assert sizes == sorted(set(sizes))  # every record reached the file at once
    assert [m for name, m in opened if "tfevents" in name] == ["xb"]
    assert [s for s, _ in _scalars(_read(tmp_path), "train/loss")] == [1, 2, 3, 4, 5]


def test_jsonl_rows_name_their_section_and_are_on_disk_at_once(tmp_path, opened):
    writer = writers.JsonlWriter(str(tmp_path))
    writer.write_scalars(2, {"loss": 0.5}, section="train", epoch=1)
    writer.write_scalars(2, {"val_loss": 0.4, "val_dice_per_class": [0.1, float("nan")]},
                         section="epoch", epoch=1)
    writer.write_images(2, {"epoch/val_overlay": np.zeros((4, 6, 3), np.uint8)})  # no row
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # before close
    writer.close()
    assert lines[0] == '{"epoch": 1, "loss": 0.5, "section": "train", "step": 2}'
    assert json.loads(lines[1])["section"] == "epoch" and len(lines) == 2
    assert [m for name, m in opened if name == "metrics.jsonl"] == ["a"]
    with pytest.raises(ValueError, match=r"\['step'\] are the record's own keys"):
        writer.write_scalars(3, {"step": 1.0}, section="train")
    steps, epochs = report.read_metrics_log(str(tmp_path))
    assert [r["step"] for r in steps] == [2] and [r["val_loss"] for r in epochs] == [0.4]


def test_report_reads_rows_by_section_and_older_rows_by_keys(tmp_path):
    rows = [{"step": 1, "loss": 1.0},  # written before rows named their section
            {"step": 1, "epoch": 1, "val_loss": 0.9, "val_dice": 0.1},
            {"step": 2, "section": "train", "loss": 0.8},
            {"step": 2, "section": "epoch", "train_loss": 0.7, "val_dice": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, epochs = report.read_metrics_log(str(tmp_path))
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["val_dice"] for r in epochs] == [0.1, 0.2]  # the last without a val_loss


def _log(workdir, restored_step, steps, scale, epochs=()):
    log = writers.create(str(workdir), restored_step, ["lesion"])
    for step in steps:
        log.write_scalars(step, {"loss": scale * step}, section="train", epoch=1)
        if step in epochs:
            log.write_scalars(step, {"val_dice_per_class": [scale * step]}, section="epoch",
                              epoch=1)
            log.write_images(step, {"epoch/val_overlay": np.full((2, 2, 3), step, np.uint8)})
    log.close()


def test_resume_cuts_both_logs_back_to_the_restored_step(tmp_path):
    """A run killed at step 6 whose checkpoint is step 3, resumed: metrics.jsonl and what
    TensorBoard shows both hold steps 1-3 of the first run (the restored step included)
    and 4-7 of the resumed one, and they agree value for value."""
    _log(tmp_path, 0, range(1, 7), 1.0, epochs=(3, 6))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # the kill cut this line short
    _log(tmp_path, 3, range(4, 8), 10.0)
    assert len([n for n in os.listdir(tmp_path) if "tfevents" in n]) == 2
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["section"]) for r in rows] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "epoch"),
        (4, "train"), (5, "train"), (6, "train"), (7, "train")]
    acc = _read(tmp_path)
    expected = [(r["step"], r["loss"]) for r in rows if r["section"] == "train"]
    assert _scalars(acc, "train/loss") == expected == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    assert _scalars(acc, "epoch/val_dice_per_class/lesion") == [(3, 3.0)]
    assert [e.step for e in acc.Images("epoch/val_overlay")] == [3]


def test_only_process_0_writes(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')  # past step 0
    monkeypatch.setattr(writers.jax, "process_index", lambda: 1)
    log = writers.create(str(tmp_path), 0, tensorboard=True)
    assert log.writers == []
    log.write_scalars(1, {"loss": 0.5}, section="train", epoch=1)
    log.write_images(1, {"epoch/val_overlay": np.zeros((2, 2, 3), np.uint8)})
    log.close()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # not cut back, nothing added
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 9, "loss": 1.0}\n'
    monkeypatch.setattr(writers.jax, "process_index", lambda: 0)
    log = writers.create(str(tmp_path), 0, tensorboard=True)
    assert [type(w) for w in log.writers] == [writers.JsonlWriter, writers.TensorBoardWriter]
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # process 0 cuts it back


def test_overlay_draws_both_outlines():
    image = np.zeros((10, 10))
    ref = np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[5:9, 5:9] = 1
    rgb = report.overlay(image, ref, pred)
    green = (rgb == (0, 255, 0)).all(-1)
    red = (rgb == (255, 0, 0)).all(-1)
    assert green.sum() and red.sum()
    # Upright: array x to the right, y up (row 0 is the top, y = 9).
    assert red[0:5].sum() > 0 and green[0:4].sum() == 0


def test_a_run_writes_events_beside_metrics_jsonl(tmp_path, make_tiny_config, opened):
    """Every scalar of the event file is a value of metrics.jsonl at its step, and every
    finite value of metrics.jsonl is in the event file (train/ per log step, epoch/ per
    epoch, lists per class); each file is opened for writing once."""
    from medseg_jax import train

    config = make_tiny_config()
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    names = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")]
    assert len(names) == 1
    assert [m for name, m in opened if "tfevents" in name] == ["xb"]
    assert [m for name, m in opened if name == "metrics.jsonl"] == ["a"]
    acc = _read(workdir)
    tags = acc.Tags()
    assert {"train/loss", "train/grad_norm", "epoch/val_loss", "epoch/val_dice",
            "epoch/val_dice_per_class/lesion"} <= set(tags["scalars"])
    assert [e.step for e in acc.Images("epoch/val_overlay")] == [2, 4]
    assert len(acc.Scalars("epoch/val_dice")) == config.train.num_epochs

    expected = {}  # tag -> [(step, value)] from metrics.jsonl
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # Steps 2..4 (the first, with the compilation, is not timed) and the two epochs.
    assert [(r["step"], r["section"]) for r in rows] == [
        (2, "train"), (2, "epoch"), (3, "train"), (4, "train"), (4, "epoch")]
    for row in rows:
        for key, value in row.items():
            if key in ("step", "epoch", "section"):
                continue
            named = ({f"{key}/lesion": value[0]} if isinstance(value, list)
                     else {key: value})
            assert not isinstance(value, list) or len(value) == 1  # one class: lesion
            for name, v in named.items():
                if np.isfinite(v):
                    expected.setdefault(f"{row['section']}/{name}", []).append(
                        (row["step"], v))
    assert {"train/loss", "train/grad_norm", "train/images_per_second", "epoch/train_loss",
            "epoch/val_loss", "epoch/val_dice", "epoch/epoch_seconds"} <= set(expected)
    assert set(tags["scalars"]) == set(expected)
    for tag, points in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [step for step, _ in points], tag
        np.testing.assert_array_equal(np.float32([e.value for e in events]),
                                      np.float32([v for _, v in points]), err_msg=tag)
