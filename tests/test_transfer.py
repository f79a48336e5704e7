"""Transfer learning: init_from another run, frozen encoder, clear errors."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import sharding, train
from medseg_jax import state as state_lib


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny trained U-Net run to transfer from."""
    workdir = str(tmp_path_factory.mktemp("source"))
    train.train(tiny_config(), workdir)
    return workdir


def _params(workdir, config):
    """The best checkpoint's params of a run, as numpy."""
    from medseg_jax import transfer  # noqa: PLC0415

    ck = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", read_only=True)
    step = ck.resolve("best")
    ck.close()
    return jax.tree.map(np.asarray, transfer._restore_as_saved(f"{workdir}/checkpoints",
                                                               step)["params"])


def test_init_from_copies_weights_and_freezes_the_encoder(make_tiny_config, tmp_path, source):
    pretrained = _params(source, None)

    # One epoch with the encoder frozen: encoder equals the source, the decoder moved.
    tuned = str(tmp_path / "tuned")
    config = make_tiny_config(**{"train.init_from": source, "train.freeze_encoder_epochs": 1,
                                 "train.num_epochs": 1})
    train.train(config, tuned)
    after = _params(tuned, config)
    for name in pretrained:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pretrained[name]),
                                                        jax.tree.leaves(after[name])))
        assert same == name.startswith("enc_"), name

    # Without freezing, the encoder is trained too.
    free = str(tmp_path / "free")
    train.train(make_tiny_config(**{"train.init_from": source, "train.num_epochs": 1}), free)
    moved = _params(free, None)
    assert not np.array_equal(jax.tree.leaves(moved["enc_0"])[0],
                              jax.tree.leaves(pretrained["enc_0"])[0])


def test_init_from_keeps_a_head_of_another_shape_fresh(make_tiny_config, tmp_path, source):
    from medseg_jax import transfer  # noqa: PLC0415

    config = make_tiny_config()
    mesh = sharding.make_mesh()
    model = state_lib.build_model(config, 3)  # three classes: the head differs
    state = state_lib.init_state(config, model, (8, 16, 16, 1), 4, mesh)
    fresh_head = np.asarray(state.params["head"]["kernel"])
    state, summary = transfer.load_pretrained(state, source, mesh)
    assert any(k.startswith("params/head/kernel") for k in summary["kept_fresh"])
    np.testing.assert_array_equal(np.asarray(state.params["head"]["kernel"]), fresh_head)
    np.testing.assert_array_equal(np.asarray(state.params["enc_0"]["Conv_0"]["kernel"]),
                                  _params(source, None)["enc_0"]["Conv_0"]["kernel"])

    wide = make_tiny_config(**{"model.base_features": 8})  # every shape differs
    other = state_lib.init_state(wide, state_lib.build_model(wide, 2), (8, 16, 16, 1), 4, mesh)
    with pytest.raises(ValueError, match=r"only 1 of \d+ parameter arrays .* match this model"):
        transfer.load_pretrained(other, source, mesh)
    with pytest.raises(FileNotFoundError, match="holds no training run"):
        transfer.load_pretrained(state, str(tmp_path / "nothing"), mesh)


def test_frozen_for_fewer_epochs_than_the_run_then_trained(make_tiny_config, tmp_path,
                                                           source):
    """freeze_encoder_epochs=1 of 2: the encoder is the source's after epoch 1 and has
    moved after epoch 2 (the decoder moves in both)."""
    from medseg_jax import transfer  # noqa: PLC0415

    pretrained = _params(source, None)
    workdir = str(tmp_path / "tuned")
    config = make_tiny_config(**{"train.init_from": source, "train.freeze_encoder_epochs": 1,
                                 "train.num_epochs": 2, "train.patience": 0})
    train.train(config, workdir)
    steps = config.train.steps_per_epoch
    by_epoch = [jax.tree.map(np.asarray, transfer._restore_as_saved(
        f"{workdir}/checkpoints", steps * (e + 1))["params"]) for e in range(2)]

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    encoder = [k for k in pretrained if k.startswith("enc_")]
    assert encoder and all(same(by_epoch[0][k], pretrained[k]) for k in encoder)
    assert not any(same(by_epoch[1][k], pretrained[k]) for k in encoder)
    assert not same(by_epoch[0]["dec_0"], pretrained["dec_0"])
