"""The evaluators of ``train.evals`` and the best checkpoint by ``train.best_metric``
smoothed over epochs by ``train.best_ema``."""

import json
import os

import pytest

from conftest import scripted_validation
from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import evaluators, train, writers


def _epoch_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "val_loss" in row]


def _best_step(workdir):
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return ck.best_step()
    finally:
        ck.close()


def _config(make_tiny_config, **overrides):
    return make_tiny_config(**{"train.num_epochs": 3, "train.steps_per_epoch": 1,
                               "train.patience": 0, "eval.figures": False,
                               "train.tensorboard": False, **overrides})


LOSS, DICE = [0.9, 0.5, 0.7], [0.1, 0.9, 0.8]


def test_declared_evaluators_are_the_ones_run(make_tiny_config, tmp_path, monkeypatch):
    """With TensorBoard on, the default 'dice,overlay' writes an overlay image per epoch;
    'dice' alone writes none (and its epoch rows are the same)."""
    images = []
    real = writers.TensorBoardWriter.write_images

    def write_images(self, step, pictures):
        images.append((step, sorted(pictures)))
        real(self, step, pictures)

    monkeypatch.setattr(writers.TensorBoardWriter, "write_images", write_images)
    rows = {}
    for evals in ("dice,overlay", "dice"):
        images.clear()
        scripted_validation(monkeypatch, LOSS[:2], DICE[:2])
        config = _config(make_tiny_config, **{"train.num_epochs": 2,
                                              "train.tensorboard": True,
                                              "train.evals": evals})
        train.train(config, str(tmp_path / evals))
        rows[evals] = [{k: r[k] for k in ("epoch", "val_loss", "val_dice")}
                       for r in _epoch_rows(str(tmp_path / evals))]
        if evals == "dice":
            assert images == []
        else:
            assert images == [(1, ["epoch/val_overlay"]), (2, ["epoch/val_overlay"])]
    assert rows["dice"] == rows["dice,overlay"]


def test_default_epoch_rows_keep_their_keys(make_tiny_config, tmp_path, monkeypatch):
    """The default (raw val_dice) adds no key to the epoch rows and picks the raw best."""
    scripted_validation(monkeypatch, LOSS, DICE)
    workdir = str(tmp_path / "run")
    meta = train.train(_config(make_tiny_config), workdir)
    rows = _epoch_rows(workdir)
    assert [sorted(r) for r in rows] == [sorted(
        ["step", "epoch", "section", "train_loss", "val_loss", "val_dice", "val_dice_per_class",
         "images_per_second", "epoch_seconds"])] * 3
    assert [r["val_dice"] for r in rows] == DICE
    assert meta["best_epoch"] == 2 and meta["best_val_dice"] == 0.9
    assert meta["best_metric_value"] == 0.9 and _best_step(workdir) == 2


def _hand_ema(values, a):
    out = [values[0]]
    for x in values[1:]:
        out.append(out[-1] * a + x * (1 - a))
    return out


def test_best_ema_smooths_the_metric_and_chooses_another_epoch(make_tiny_config, tmp_path,
                                                                monkeypatch):
    """best_ema=0.9 over val_dice 0.1, 0.9, 0.8: 0.1, 0.18, 0.242, so epoch 3 is the best
    (raw: epoch 2); the smoothed value is in each epoch row."""
    ema = _hand_ema(DICE, 0.9)
    assert ema == pytest.approx([0.1, 0.18, 0.242])
    scripted_validation(monkeypatch, LOSS, DICE)
    workdir = str(tmp_path / "run")
    meta = train.train(_config(make_tiny_config, **{"train.best_ema": 0.9}), workdir)
    assert [r["best_metric_ema"] for r in _epoch_rows(workdir)] == ema
    assert meta["best_epoch"] == 3 and meta["best_metric_value"] == ema[2]
    assert meta["best_val_dice"] == 0.8  # the raw Dice of the chosen epoch
    assert _best_step(workdir) == 3


def test_best_metric_val_loss_chooses_the_lowest(make_tiny_config, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.9, 0.8, 0.3], DICE)
    workdir = str(tmp_path / "run")
    meta = train.train(_config(make_tiny_config, **{"train.best_metric": "val_loss"}),
                       workdir)
    assert meta["best_epoch"] == 3 and meta["best_metric_value"] == 0.3
    assert _best_step(workdir) == 3


def test_best_ema_survives_a_resume(make_tiny_config, tmp_path, monkeypatch):
    """Two epochs, then a resume for the third: the same smoothed values and best step
    as three epochs in one go (the moving average is in the checkpoint's meta)."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    scripted_validation(monkeypatch, LOSS, DICE)
    train.train(_config(make_tiny_config, **{"train.best_ema": 0.9}), full)
    scripted_validation(monkeypatch, LOSS[:2], DICE[:2])
    train.train(_config(make_tiny_config, **{"train.best_ema": 0.9,
                                             "train.num_epochs": 2}), split)
    scripted_validation(monkeypatch, LOSS[2:], DICE[2:])
    meta = train.train(_config(make_tiny_config, **{"train.best_ema": 0.9}), split)
    ema = [r["best_metric_ema"] for r in _epoch_rows(split)]
    assert ema == [r["best_metric_ema"] for r in _epoch_rows(full)] == _hand_ema(DICE, 0.9)
    assert meta["best_epoch"] == 3 and _best_step(split) == _best_step(full) == 3


def test_best_ema_may_change_on_resume(make_tiny_config, tmp_path, monkeypatch):
    """best_ema (like best_metric and evals) chooses the best checkpoint, not the weights:
    a resume may change it; the average starts from the first smoothed epoch."""
    workdir = str(tmp_path / "run")
    scripted_validation(monkeypatch, LOSS[:2], DICE[:2])
    train.train(_config(make_tiny_config, **{"train.num_epochs": 2}), workdir)
    scripted_validation(monkeypatch, LOSS[2:], DICE[2:])
    meta = train.train(_config(make_tiny_config, **{"train.best_ema": 0.5}), workdir)
    # epoch 2's raw value 0.9 seeds the average: 0.9 * 0.5 + 0.8 * 0.5 = 0.85 < 0.9
    assert _epoch_rows(workdir)[-1]["best_metric_ema"] == 0.9 * 0.5 + 0.8 * 0.5
    assert meta["best_epoch"] == 2
    with open(os.path.join(workdir, "config.json")) as f:
        changes = json.load(f)["changes"]
    assert any("train.best_ema" in json.dumps(c) for c in changes)


@pytest.mark.parametrize("field,value,message", [
    ("train.evals", "overlay", "lacks 'dice'"),
    ("train.evals", "dice,wholecase", "unknown evaluator 'wholecase'"),
    ("train.best_metric", "dice", "config.train.best_metric"),
    ("train.best_ema", 1.0, "config.train.best_ema"),
    ("train.best_ema", -0.1, "config.train.best_ema"),
    ("train.best_metric", "val_case_dice", "config.train.best_metric: .*add case_dice"),
    ("train.val_max_cases", -1, "config.train.val_max_cases"),
])
def test_bad_evals_and_best_fields_are_refused(make_tiny_config, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(make_tiny_config(**{field: value}))


def test_resume_from_a_checkpoint_chosen_by_raw_val_dice(make_tiny_config, tmp_path,
                                                        monkeypatch):
    """Checkpoints written before the best-checkpoint score (their metrics and meta have
    val_dice alone) resume: their best stays the best until a higher Dice."""
    workdir = str(tmp_path / "run")
    real = ckpt_lib.Checkpointer.save
    new = ("best_score", "best_metric", "best_metric_ema", "best_metric_value")

    def older_save(self, step, state, meta, metrics):
        meta = {k: v for k, v in meta.items() if k not in new}
        metrics = metrics and {k: v for k, v in metrics.items() if k not in new}
        real(self, step, state, meta, metrics)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", older_save)
    scripted_validation(monkeypatch, LOSS[:2], DICE[:2])
    train.train(_config(make_tiny_config, **{"train.num_epochs": 2}), workdir)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", real)
    scripted_validation(monkeypatch, LOSS[2:], DICE[2:])
    meta = train.train(_config(make_tiny_config), workdir)
    assert meta["best_epoch"] == 2 and meta["best_metric_value"] == 0.9
    assert _best_step(workdir) == 2


def _uniform_spacing_task(base, spacing=(1.0, 1.0, 1.5), cases=6):
    """Synthetic MRI cases rewritten to one voxel spacing: the run's target spacing, so
    the preprocessed grid is each case's own (no resampling either way)."""
    import glob

    import nibabel as nib
    import numpy as np

    from medseg_jax.data import synthetic

    roots = synthetic.make_synthetic(str(base), seed=0, num_cases=cases, size=16, depth=4)
    root = next(r for r in roots if r.endswith("SynthMRI"))
    for path in glob.glob(os.path.join(root, "*Tr", "*.nii.gz")):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([*spacing, 1.0]),
                                 img.header), path)
    return root


@pytest.mark.parametrize("geometry", [
    {"model.spatial_dims": 3, "data.image_size": (8, 8, 4)},  # sliding windows
    {"data.image_size": (16, 16), "train.steps_per_epoch": 40, "train.ce_weight": 0.0},
])
def test_case_dice_is_evaluations_per_case_dice(make_tiny_config, tmp_path, geometry):
    """A run with the case_dice evaluator: its epoch row's val_case_dice (and per class)
    is what --mode=eval computes from the per-case Dice of the same checkpoint on the
    validation split (3D: sliding windows with overlap; flip TTA)."""
    import math

    from medseg_jax import evaluate

    root = _uniform_spacing_task(tmp_path / "data")
    config = _config(make_tiny_config, **{
        "data.root": root, "data.split_fractions": (0.5, 0.5, 0.0), "train.num_epochs": 1,
        "train.steps_per_epoch": 12, "train.learning_rate": 1e-2,
        "train.evals": "dice,case_dice", "train.best_metric": "val_case_dice",
        "eval.tta": True, "eval.sw_overlap": 0.5, **geometry})
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    row = _epoch_rows(workdir)[-1]
    results = evaluate.evaluate(config, workdir, split="val", checkpoint="latest")
    if config.model.spatial_dims == 3:  # overlapping windows
        assert results["network_inputs"] > 3 * len(results["per_case"])
    names = list(results["per_case"][0]["metrics"])
    per_class = []
    for name in names:
        values = [c["metrics"][name]["dice"] for c in results["per_case"]]
        finite = [v for v in values if math.isfinite(v)]
        per_class.append(sum(finite) / len(finite) if finite else math.nan)
    assert len(results["per_case"]) == 3
    assert row["val_case_dice_per_class"] == pytest.approx(per_class, abs=1e-12, nan_ok=True)
    assert row["val_case_dice"] == pytest.approx(
        sum(d for d in per_class if math.isfinite(d))
        / sum(math.isfinite(d) for d in per_class), abs=1e-12)
    assert 0 < row["val_case_dice"] < 1


def test_val_max_cases_takes_evenly_spaced_cases(make_tiny_config):
    import types

    dataset = types.SimpleNamespace(splits={"val": ["a", "b", "c", "d", "e"]})
    cases = evaluators.Cases(dataset, {}, None)
    for n, keys in ((0, ["a", "b", "c", "d", "e"]), (2, ["a", "c"]), (9, list("abcde"))):
        config = make_tiny_config(**{"train.val_max_cases": n})
        assert evaluators.CaseDice(config, cases, None).keys == keys


def test_best_metric_val_case_dice_chooses_by_it(make_tiny_config, tmp_path, monkeypatch):
    """val_dice would choose epoch 2; val_case_dice 0.5, 0.2, 0.7 chooses epoch 3, and the
    epoch rows carry the case Dice."""
    case_dice = iter([0.5, 0.2, 0.7])

    def run(self, state):
        value = next(case_dice)
        return {"val_case_dice": value, "val_case_dice_per_class": [value]}, {}

    monkeypatch.setattr(evaluators.CaseDice, "run", run)
    scripted_validation(monkeypatch, LOSS, DICE)
    workdir = str(tmp_path / "run")
    meta = train.train(_config(make_tiny_config, **{"train.evals": "dice,case_dice",
                                                    "train.best_metric": "val_case_dice"}),
                       workdir)
    assert [r["val_case_dice"] for r in _epoch_rows(workdir)] == [0.5, 0.2, 0.7]
    assert meta["best_epoch"] == 3 and meta["best_metric_value"] == 0.7
    assert meta["best_val_dice"] == 0.8 and _best_step(workdir) == 3
