"""A run's record is the truth: every config number checked (config.check_numbers, its
NUMBERS table), and a resumed run's config compared with its config.json: fields that
change what it computes refused, safe ones recorded as changes with their step."""

import json
import math
import re

import pytest

from medseg_jax import config as config_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.config import (NUMBERS, check_numbers, choose_section, default_config,
                               study_section)
from medseg_jax.data.augment import nnunet_augment_config


def _full_config():
    """default_config with every architecture's own fields, a study and a choose section."""
    from medseg_jax.models import MODELS, model_fields

    config = default_config()
    config.benchmark = study_section()
    config.choose = choose_section()
    for name in MODELS:
        for key, value in model_fields(name).items():
            if key not in config.model and isinstance(value, (bool, int, float, str, tuple)):
                config.model[key] = value
    return config


def _leaves(node, prefix=""):
    for key in node:
        value, dotted = node[key], f"{prefix}{key}"
        if hasattr(value, "keys"):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def test_every_numeric_field_has_a_constraint():
    """A numeric (or tuple) field added to the config without a NUMBERS entry fails here."""
    configs = [_full_config(), nnunet_augment_config(2), nnunet_augment_config(3)]
    seen = set()
    for i, config in enumerate(configs):
        prefix = "" if i == 0 else "augment."
        for dotted, value in _leaves(config, prefix):
            numeric = isinstance(value, (int, float, tuple, list)) and not isinstance(value, bool)
            if numeric:
                seen.add(dotted)
                assert dotted in NUMBERS or dotted.startswith(config_lib.PROBABILITY_PREFIX), (
                    f"config.{dotted} has no constraint in config.NUMBERS")
    assert set(NUMBERS) <= seen, set(NUMBERS) - seen  # no stale entry
    for config in configs[:1]:
        check_numbers(config)  # the defaults pass
    check_numbers(config_lib.recipe(default_config()))  # "to the plan" zeros pass


def _bad_values(dotted):
    """Values NUMBERS[dotted] refuses, as the field's type allows."""
    shape, rule = NUMBERS[dotted] if isinstance(NUMBERS[dotted], tuple) else ("number",
                                                                              NUMBERS[dotted])
    wrong = []
    if rule.lo is not None:
        wrong.append(rule.lo if rule.open_lo else rule.lo - 1)
    if rule.hi is not None:
        wrong.append(rule.hi if rule.open_hi else rule.hi + 1)
    if rule.kind is int:
        wrong = [int(w) for w in wrong]
    else:
        wrong += [math.nan, math.inf]
    if shape == "number":
        return wrong
    if shape == "angle":  # one number d >= 0 for [-d, d] (a pair is set by the dict)
        return wrong + [-3.0]
    if shape == "entries":
        return [(w,) for w in wrong]
    return [(w, w) for w in wrong] + [(2.0, 1.0) if rule.hi is None else (0.8, 0.6)]


@pytest.mark.parametrize("dotted", sorted(NUMBERS))
def test_each_constrained_field_is_named_when_wrong(dotted):
    for value in _bad_values(dotted):
        config = _full_config()
        section, _, field = dotted.rpartition(".")
        node = config
        for part in section.split(".") if section else []:
            node = node[part]
        if isinstance(node[field], tuple) and len(node[field]) == 2 and len(value) == 1:
            value = value * 2
        node[field] = value
        with pytest.raises(ValueError, match=rf"^config\.{re.escape(dotted)}: (entry .*: )?"
                                             r"must be "):
            check_numbers(config)


@pytest.mark.parametrize("field,value,message", [
    ("train.steps_per_epoch", -5, "config.train.steps_per_epoch: must be >= 0 (0: one pass), "
                                  "got -5"),
    ("train.learning_rate", -1.0, "config.train.learning_rate: must be > 0, got -1.0"),
    ("train.patience", -1, "config.train.patience: must be >= 0 (0: no early stopping), got -1"),
    ("train.log_every_steps", 0, "config.train.log_every_steps: must be >= 1, got 0"),
    ("seed", -1, "config.seed: must be >= 0, got -1"),
    ("train.learning_rate", math.nan, "config.train.learning_rate: must be a finite number"),
    ("augment.p_flip", 1.5, "config.augment.p_flip: must be in [0, 1], got 1.5"),
    ("augment.p_gamma_invert", -0.1, "config.augment.p_gamma_invert: must be in [0, 1]"),
    ("augment.scale_range", (1.2, 0.8), "config.augment.scale_range: must be a pair (lo, hi) "
                                        "with lo <= hi, got (1.2, 0.8)"),
    ("augment.rotate_degrees", -3.0, "config.augment.rotate_degrees: must be >= 0 (for [-d, d])"),
    ("data.image_size", (16, 0), "config.data.image_size: entry 0: must be >= 1"),
    ("model.pool_sizes", ((2, 2), (2, 0)), "config.model.pool_sizes: entry 0: must be >= 1"),
    ("eval.sw_overlap", 1.0, "config.eval.sw_overlap: must be in [0, 1), got 1.0"),
    ("train.batch_size", 0, "config.train.batch_size: must be >= 1, got 0"),
])
def test_validate_names_the_field(make_tiny_config, field, value, message):
    config = make_tiny_config(**{field: value})
    with pytest.raises(ValueError) as error:
        config_lib.validate(config)  # validate checks the numbers first
    assert str(error.value).startswith(message), str(error.value)


def test_no_loss_weight_and_plan_zeros(make_tiny_config):
    with pytest.raises(ValueError, match="config.train.dice_weight / ce_weight: both 0"):
        check_numbers(make_tiny_config(**{"train.dice_weight": 0.0, "train.ce_weight": 0.0}))
    planned = make_tiny_config(**{"data.plan": "auto", "train.batch_size": 0,
                                  "model.depth": 0, "data.image_size": ()})
    check_numbers(planned)  # 0 / (): to the plan
    with pytest.raises(ValueError, match="config.train.batch_size: must be >= 1"):
        check_numbers(make_tiny_config(**{"train.batch_size": 0}))


# --------------------------------------------------------------------------- #
# config.json on resume
# --------------------------------------------------------------------------- #


def _record(tmp_path, config):
    workdir_lib.write_config(config, str(tmp_path))
    return (tmp_path / "config.json").read_bytes()


@pytest.mark.parametrize("field,value,shown", [
    ("train.batch_size", 4, "train.batch_size: 8 -> 4"),
    ("train.learning_rate", 0.5, "train.learning_rate: 0.001 -> 0.5"),
    ("train.ce_weight", 0.0, "train.ce_weight: 1.0 -> 0.0"),
    ("seed", 5, "seed: 0 -> 5"),
    ("augment.p_flip", 0.0, "augment.p_flip: 0.5 -> 0.0"),
    ("train.lr_schedule", "poly", "train.lr_schedule: 'constant' -> 'poly'"),
    ("train.steps_per_epoch", 3, "train.steps_per_epoch: 2 -> 3"),
    ("train.grad_clip_norm", 1.0, "train.grad_clip_norm: 0.0 -> 1.0"),
    ("data.foreground_fraction", 0.5, "data.foreground_fraction: 0.33 -> 0.5"),
    ("model.dtype", "bfloat16", "model.dtype: 'float32' -> 'bfloat16'"),
])
def test_a_result_changing_field_is_refused_and_nothing_written(make_tiny_config, tmp_path,
                                                                field, value, shown):
    before = _record(tmp_path, make_tiny_config())
    safe = {"train.num_epochs": 9} if field != "train.lr_schedule" else {}
    with pytest.raises(ValueError) as error:
        workdir_lib.write_config(make_tiny_config(**{field: value, **safe}), str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{tmp_path} holds a run with a different config ({shown}; "
                              f"recorded in {tmp_path}/config.json); these change what it "
                              "computes: "), message
    assert "use a new --workdir, or resume it with the recorded values " \
           f"(--config=configs/run.py:{tmp_path})" in message
    assert "num_epochs" not in message  # safe: not listed
    assert (tmp_path / "config.json").read_bytes() == before


def test_safe_fields_are_recorded_as_changes_with_their_step(make_tiny_config, tmp_path):
    _record(tmp_path, make_tiny_config())
    workdir_lib.write_config(make_tiny_config(**{
        "train.num_epochs": 5, "train.patience": 2, "eval.tta": True,
        "data.num_workers": 2, "train.val_max_samples": 4}), str(tmp_path), step=4)
    workdir_lib.write_config(make_tiny_config(**{
        "train.num_epochs": 7, "train.patience": 2, "eval.tta": True,
        "data.num_workers": 2, "train.val_max_samples": 4}), str(tmp_path), step=10)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["train"]["num_epochs"] == 7  # the values in force
    assert recorded["changes"] == [
        {"step": 4, "field": "data.num_workers", "old": 0, "new": 2},
        {"step": 4, "field": "eval.tta", "old": False, "new": True},
        {"step": 4, "field": "train.num_epochs", "old": 2, "new": 5},
        {"step": 4, "field": "train.patience", "old": 8, "new": 2},
        {"step": 4, "field": "train.val_max_samples", "old": 0, "new": 4},
        {"step": 10, "field": "train.num_epochs", "old": 5, "new": 7}]
    # The run's config reads back as the values in force (configs/run.py).
    again = workdir_lib.read_run_config(str(tmp_path))
    assert again.train.num_epochs == 7 and "changes" not in again


def test_schedule_length_may_not_change(make_tiny_config, tmp_path):
    _record(tmp_path, make_tiny_config(**{"train.lr_schedule": "cosine"}))
    with pytest.raises(ValueError, match=r"train.num_epochs: 2 -> 4 \(the length of the "
                                         r"cosine learning-rate schedule\)"):
        workdir_lib.write_config(make_tiny_config(**{"train.lr_schedule": "cosine",
                                                     "train.num_epochs": 4}), str(tmp_path))


def test_after_a_divergence_the_rate_and_clipping_may_change(make_tiny_config, tmp_path):
    _record(tmp_path, make_tiny_config())
    changed = make_tiny_config(**{"train.learning_rate": 1e-4, "train.grad_clip_norm": 1.0})
    with pytest.raises(ValueError, match="train.grad_clip_norm: 0.0 -> 1.0; "
                                         "train.learning_rate: 0.001 -> 0.0001"):
        workdir_lib.write_config(changed, str(tmp_path))
    workdir_lib.record_divergence(str(tmp_path), 3)
    assert json.loads((tmp_path / "config.json").read_text())["diverged"] == {"step": 3}
    workdir_lib.write_config(changed, str(tmp_path), step=2)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert "diverged" not in recorded  # one recovery per divergence
    assert recorded["changes"] == [
        {"step": 2, "field": "train.grad_clip_norm", "old": 0.0, "new": 1.0,
         "reason": "diverged at step 3"},
        {"step": 2, "field": "train.learning_rate", "old": 0.001, "new": 1e-4,
         "reason": "diverged at step 3"}]
    with pytest.raises(ValueError, match="train.learning_rate: 0.0001 -> 0.5"):
        workdir_lib.write_config(make_tiny_config(**{"train.learning_rate": 0.5,
                                                     "train.grad_clip_norm": 1.0}),
                                 str(tmp_path))


def test_evaluation_compares_what_it_needs(make_tiny_config, tmp_path):
    _record(tmp_path, make_tiny_config())
    for fine in ({"eval.tta": True, "eval.batch_size": 16}, {"train.learning_rate": 0.5},
                 {"augment.p_flip": 0.0, "seed": 3}):
        assert workdir_lib.check_config(make_tiny_config(**fine), str(tmp_path),
                                        workdir_lib.EVAL_FIELDS) == []
    # A schedule restores another optimizer state: named before the checkpoint is read.
    with pytest.raises(ValueError, match="train.lr_schedule: 'constant' -> 'cosine'.*"
                                         "evaluate it with the recorded values"):
        workdir_lib.check_config(make_tiny_config(**{"train.lr_schedule": "cosine"}),
                                 str(tmp_path), workdir_lib.EVAL_FIELDS)
    with pytest.raises(ValueError, match="model.depth: 3 -> 4"):
        workdir_lib.check_config(make_tiny_config(**{"model.depth": 4}), str(tmp_path),
                                 workdir_lib.EVAL_FIELDS)
    # How cases are resampled and cropped is what the network is fed.
    for field, old, new in (("resampling", "'simple'", "nnunet"), ("crop_nonzero", False, True)):
        with pytest.raises(ValueError, match=f"data.{field}: {old} -> '?{new}"):
            workdir_lib.check_config(make_tiny_config(**{f"data.{field}": new}),
                                     str(tmp_path), workdir_lib.EVAL_FIELDS)


def test_config_json_is_written_only_after_the_checkpoint_is_restored(make_tiny_config,
                                                                      tmp_path):
    """Without a config.json to compare with, a checkpoint of another model is refused by
    its structure, and config.json is not written with the refused settings."""
    from medseg_jax import train

    workdir = tmp_path / "run"
    train.train(make_tiny_config(**{"train.num_epochs": 1}), str(workdir))
    (workdir / "config.json").unlink()
    with pytest.raises(ValueError, match="checkpoint does not match this config's model"):
        train.train(make_tiny_config(**{"train.num_epochs": 2, "model.base_features": 8}),
                    str(workdir))
    assert not (workdir / "config.json").exists()
    train.train(make_tiny_config(**{"train.num_epochs": 1}), str(workdir))  # the run's own
    assert json.loads((workdir / "config.json").read_text())["model"]["base_features"] == 4


def test_a_swept_value_is_checked_as_its_train_field():
    config = _full_config()
    config.benchmark.sweep.learning_rates = "1e-3,-3e-4"
    with pytest.raises(ValueError, match=r"^config.benchmark.sweep.learning_rates: entry "
                                         r"'-3e-4' \(train.learning_rate\): must be > 0"):
        check_numbers(config)
    config.benchmark.sweep.learning_rates, config.benchmark.sweep.patience = "1e-3", "8,-1"
    with pytest.raises(ValueError, match=r"sweep.patience: entry '-1' \(train.patience\)"):
        check_numbers(config)
    config.benchmark.sweep.patience = "8,fast"  # not a number: the study names it
    check_numbers(config)
