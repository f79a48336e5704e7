"""The exponential moving average of the params (``train.ema_decay``): its update in the
train step, the weights validation, the best checkpoint, evaluation, prediction and
transfer use, ``dice_raw``, resume, and the tree of a run without it."""

import json
import os
import types

import jax
import numpy as np
import pytest

from conftest import tiny_config
from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import evaluators, sharding, train, transfer
from medseg_jax import state as state_lib

DECAY = 0.9


def _batch(config, seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(8, *config.data.image_size, 1)).astype(np.float32)
    labels = np.zeros((8, *config.data.image_size), np.int32)
    labels[:, 4:10, 5:12] = 1
    images[labels > 0] += 2.0
    return {"image": images, "label": labels}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _steps(config, steps=3):
    """The params after each of ``steps`` real train steps, and the final state."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = state_lib.build_model(config, 2)
    state = state_lib.init_state(config, model, (8, *config.data.image_size, 1), 10, mesh)
    train_fn, _ = state_lib.jit_steps(config, mesh, 2)
    params = [_leaves(state.params)]
    emas = [_leaves(state.ema_params)] if config.train.ema_decay else []
    for i in range(steps):
        state, _ = train_fn(state, sharding.to_global(_batch(config, i), mesh))
        params.append(_leaves(state.params))
        if config.train.ema_decay:
            emas.append(_leaves(state.ema_params))
    return params, emas, state


def test_ema_is_the_hand_computed_average_over_three_steps(make_tiny_config):
    params, emas, state = _steps(make_tiny_config(**{"train.ema_decay": DECAY}))
    assert isinstance(state, state_lib.EmaTrainState)
    for e, p in zip(emas[0], params[0]):  # starts as a copy of the initial params
        np.testing.assert_array_equal(e, p)
    expected = params[0]
    for step in range(1, 4):
        d = np.float32(min(DECAY, (1 + step) / (10 + step)))  # warm-up: 2/11, 3/12, 4/13
        expected = [d * e + (np.float32(1) - d) * p for e, p in zip(expected, params[step])]
        for got, want in zip(emas[step], expected):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(e, p) for e, p in zip(emas[3], params[3]))
    # The average does not change the steps: the raw params are those of a run without.
    raw, _, _ = _steps(make_tiny_config())
    for a, b in zip(raw[3], params[3]):
        np.testing.assert_array_equal(a, b)


def test_the_decay_warms_up_to_the_configured_one():
    steps = np.array([0, 1, 10, 100, 1790, 1800, 10_000], np.float32)
    got = np.asarray(state_lib.ema_decay_at(0.995, steps))
    np.testing.assert_allclose(got[:4], (1 + steps[:4]) / (10 + steps[:4]), rtol=1e-6)
    np.testing.assert_allclose(got[4:], 0.995, rtol=1e-6)  # reached at step 1790
    assert got.dtype == np.float32 and np.all(np.diff(got) >= 0)


def _paths(tree):
    return ["/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_off_by_default_the_state_and_checkpoint_trees_are_unchanged(make_tiny_config,
                                                                     tmp_path):
    assert config_lib.recipe(config_lib.default_config()).train.ema_decay == 0.0
    config = make_tiny_config(**{"train.num_epochs": 1})
    assert config.train.ema_decay == 0.0
    meta, state = train.train(config, str(tmp_path / "off"), return_state=True)
    assert type(state) is state_lib.TrainState
    assert not hasattr(state, "ema_params")
    assert {p.split("/")[0] for p in _paths(state)} == {
        "step", "params", "opt_state", "batch_stats"}
    saved = (tmp_path / "off" / "checkpoints" / "2" / "state" / "_METADATA").read_text()
    assert "ema" not in saved and "('params'," in saved
    # With it on, the average is one more copy of the params in the tree and checkpoint.
    mesh = sharding.make_mesh()
    on = make_tiny_config(**{"train.ema_decay": DECAY})
    abstract = state_lib.abstract_state(on, state_lib.build_model(on, 2),
                                        (8, *on.data.image_size, 1), 1, mesh)
    extra = [p for p in _paths(abstract) if p.startswith("ema_params/")]
    assert [p.removeprefix("ema_") for p in extra] == [p for p in _paths(abstract)
                                                      if p.startswith("params/")]
    assert len(jax.tree.leaves(abstract)) == len(jax.tree.leaves(state)) + len(extra)


def _restore(config, workdir, which="latest"):
    mesh = sharding.make_mesh()
    abstract = state_lib.abstract_state(config, state_lib.build_model(config, 2),
                                        (8, *config.data.image_size, 1), 1, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return ck.restore(ck.resolve(which), abstract)[0]
    finally:
        ck.close()


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A run of one epoch (two steps) with the average and dice_raw; what each
    validation call was given (its first param array), the final state."""
    config = tiny_config(**{"train.ema_decay": DECAY, "train.num_epochs": 1,
                            "train.evals": "dice,dice_raw", "train.patience": 0,
                            "train.tensorboard": False})
    given, real = [], evaluators.validate

    def validate(eval_fn, state, *args):
        given.append(np.asarray(jax.tree.leaves(state.params)[0]))
        return real(eval_fn, state, *args)

    workdir = str(tmp_path_factory.mktemp("ema") / "run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluators, "validate", validate)
        meta, state = train.train(config, workdir, return_state=True)
    return config, workdir, given, state


def test_validation_and_the_best_checkpoint_score_the_average(ema_run):
    config, workdir, given, state = ema_run
    ema, raw = (np.asarray(jax.tree.leaves(t)[0]) for t in (state.ema_params, state.params))
    assert not np.array_equal(ema, raw)
    assert len(given) == 2  # dice (the average), then dice_raw (the raw weights)
    np.testing.assert_array_equal(given[0], ema)
    np.testing.assert_array_equal(given[1], raw)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "val_loss" in r]
    assert len(rows) == 1 and {"val_loss_raw", "val_dice_raw"} <= set(rows[0])
    assert rows[0]["val_loss"] != rows[0]["val_loss_raw"]
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        _, meta = ck.restore(ck.best_step(), _restore(config, workdir))
    finally:
        ck.close()
    assert meta["val_loss"] == rows[0]["val_loss"] and meta["val_dice"] == rows[0]["val_dice"]


def test_evaluation_and_prediction_restore_the_average(ema_run):
    config, workdir, _, _ = ema_run
    saved = _restore(config, workdir, "best")
    run = state_lib.restore_run(config, workdir)  # eval, predict and ensemble members
    for got, ema, raw in zip(_leaves(run.state.params), _leaves(saved.ema_params),
                             _leaves(saved.params)):
        np.testing.assert_array_equal(got, ema)
    assert any(not np.array_equal(e, r) for e, r in zip(_leaves(saved.ema_params),
                                                        _leaves(saved.params)))
    # Evaluated with another setting, the checkpoint's tree is not the config's: refused.
    off = config.copy_and_resolve_references()
    off.train.ema_decay, off.train.evals = 0.0, "dice"
    with pytest.raises(ValueError, match=r"train.ema_decay: 0.9 -> 0.0.*configs/run.py"):
        state_lib.restore_run(off, workdir)


def test_transfer_starts_from_the_average_and_averages_from_there(make_tiny_config, ema_run,
                                                                 tmp_path):
    _, source, _, _ = ema_run
    saved = _restore(make_tiny_config(**{"train.ema_decay": DECAY}), source, "best")
    config = make_tiny_config(**{"train.ema_decay": DECAY, "train.num_epochs": 1,
                                 "train.init_from": source, "train.freeze_encoder_epochs": 1,
                                 "train.tensorboard": False})
    _, state = train.train(config, str(tmp_path / "target"), return_state=True)
    encoder = {k for k in saved.params if k.startswith(transfer.ENCODER_PREFIX)}
    assert encoder
    for k in encoder:  # frozen: the source's averaged weights, and so their average
        for got, avg, want in zip(_leaves(state.params[k]), _leaves(state.ema_params[k]),
                                  _leaves(saved.ema_params[k])):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(avg, want, rtol=1e-6, atol=1e-7)


def test_resume_with_the_average_is_bit_identical(make_tiny_config, tmp_path):
    def config(epochs):
        return make_tiny_config(**{"train.ema_decay": DECAY, "train.num_epochs": epochs,
                                   "train.patience": 0, "train.tensorboard": False})

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train.train(config(2), full)
    train.train(config(1), split)
    assert train.train(config(2), split)["epoch"] == 1  # resumed for the second epoch
    a, b = _restore(config(2), full), _restore(config(2), split)
    assert int(a.step) == int(b.step) == 4
    assert len(jax.tree.leaves(a.ema_params)) == len(jax.tree.leaves(a.params))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The decay is part of what the run computes: another one is refused on resume.
    with pytest.raises(ValueError, match=r"train.ema_decay: 0.9 -> 0.5"):
        train.train(make_tiny_config(**{"train.ema_decay": 0.5, "train.num_epochs": 3,
                                        "train.patience": 0, "train.tensorboard": False}),
                    split)


@pytest.mark.parametrize("overrides,message", [
    ({"train.ema_decay": 1.0}, "config.train.ema_decay"),
    ({"train.ema_decay": -0.1}, "config.train.ema_decay"),
    ({"train.evals": "dice,dice_raw"}, "config.train.evals: 'dice_raw'.*ema_decay is 0"),
])
def test_bad_ema_settings_are_one_line(make_tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        config_lib.validate(make_tiny_config(**overrides))
    assert "\n" not in str(error.value)


def test_the_overlay_draws_the_prediction_of_the_average(ema_run):
    config, _, _, state = ema_run
    given = []

    def predict_fn(state, images):  # records the weights it was given; predicts class 0
        given.append(np.asarray(jax.tree.leaves(state.params)[0]))
        return np.zeros((*images.shape[:-1], 2), np.float32)

    samples = types.SimpleNamespace(images=np.zeros((1, 16, 16, 1), np.float32),
                                    labels=np.zeros((1, 16, 16), np.int32))
    overlay = evaluators.Overlay(config, predict_fn, samples, sharding.make_mesh(), 0)
    _, images = overlay.run(state)
    assert list(images) == ["epoch/val_overlay"] and given
    np.testing.assert_array_equal(given[0], np.asarray(jax.tree.leaves(state.ema_params)[0]))
