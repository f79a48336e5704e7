import json
import os

import jax
import numpy as np
import pytest

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import evaluate, sharding, train


def _batch(config, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *config.data.image_size, 1)).astype(np.float32)
    labels = np.zeros((n, *config.data.image_size), np.int32)
    labels[:, 4:10, 5:12] = 1
    images[labels > 0] += 2.0
    return {"image": images, "label": labels}


def _run_steps(config, mesh, steps=3):
    model = train.build_model(config, 2)
    state = train.init_state(config, model, (8, *config.data.image_size, 1), 10, mesh)
    train_fn, _, _ = train.jit_steps(config, mesh, 2)
    losses = []
    for i in range(steps):
        state, out = train_fn(state, sharding.to_global(_batch(config, seed=i), mesh))
        losses.append(float(out["loss"]))
    return state, losses


@pytest.mark.parametrize("name", ["unet", "fcn", "attention_unet"])
def test_train_step_learns(make_tiny_config, name):
    config = make_tiny_config(**{"model.name": name, "augment.enabled": False})
    state, losses = _run_steps(config, sharding.make_mesh(jax.devices()[:1]), steps=6)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert int(state.step) == 6


def test_eight_devices_match_one_device(make_tiny_config):
    assert jax.device_count() == 8, "conftest must set 8 fake CPU devices"
    config = make_tiny_config()
    one, losses_one = _run_steps(config, sharding.make_mesh(jax.devices()[:1]))
    eight, losses_eight = _run_steps(config, sharding.make_mesh())
    np.testing.assert_allclose(losses_one, losses_eight, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_batch_size_must_divide_devices(make_tiny_config, tmp_path):
    config = make_tiny_config(**{"train.batch_size": 12})
    with pytest.raises(ValueError, match="train.batch_size=12 is not divisible by the 8 devices"):
        train.train(config, str(tmp_path))


def _params(workdir, config, which="latest"):
    mesh = sharding.make_mesh()
    model = train.build_model(config, 2)
    abstract = train.abstract_state(config, model, (8, *config.data.image_size, 1), 1, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    state, meta = ck.restore(ck.resolve(which), abstract)
    ck.close()
    return state, meta


def test_resume_equals_uninterrupted_run(make_tiny_config, tmp_path):
    full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
    config3 = make_tiny_config(**{"train.num_epochs": 3, "train.patience": 0})
    train.train(config3, full_dir)
    train.train(make_tiny_config(**{"train.num_epochs": 2, "train.patience": 0}), split_dir)
    meta = train.train(config3, split_dir)  # resumes at epoch 3
    assert meta["epoch"] == 2
    full, _ = _params(full_dir, config3)
    resumed, _ = _params(split_dir, config3)
    assert int(full.step) == int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(r) for r in open(os.path.join(split_dir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2, 3]
    # A finished run is not trained again.
    assert train.train(config3, split_dir)["epoch"] == 2


def test_latest_and_best_are_both_kept(make_tiny_config, tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1)
    state = {"w": np.zeros(3, np.float32)}
    for step, dice in [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.4)]:
        ck.save(step, {"w": np.full(3, step, np.float32)}, {"epoch": step}, {"val_dice": dice})
    ck.wait()
    assert sorted(ck.all_steps()) == [2, 4]
    assert ck.best_step() == 2 and ck.latest_step() == 4
    restored, meta = ck.restore(2, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=sharding.replicated(sharding.make_mesh())), state))
    np.testing.assert_array_equal(np.asarray(restored["w"]), [2, 2, 2])
    assert meta == {"epoch": 2}
    with pytest.raises(ValueError, match="no checkpoint for step 3"):
        ck.resolve(3)
    ck.close()


def test_train_and_evaluate_then_eval_reproduces(make_tiny_config, tmp_path):
    workdir = str(tmp_path)
    config = make_tiny_config()
    results = train.train_and_evaluate(config, workdir)
    for name in ("config.json", "splits.json", "preprocess.json", "metrics.jsonl",
                 "test_metrics.json", "test_metrics.md"):
        assert os.path.exists(os.path.join(workdir, name)), name
    agg = results["aggregate"]
    assert set(agg) == {"all", "SynthCT", "SynthMRI", "SynthUS"}
    assert set(agg["all"]["lesion"]) >= {"dice", "iou", "hd", "hd95"}
    again = evaluate.evaluate(config, workdir)
    assert again["per_case"] == results["per_case"]
    with open(os.path.join(workdir, "splits.json")) as f:
        assert [c["case"] for c in results["per_case"]] == json.load(f)["test"]


def test_workdir_of_another_model_is_refused(make_tiny_config, tmp_path):
    train.write_config(make_tiny_config(), str(tmp_path))
    with pytest.raises(ValueError, match="model.name: 'unet' -> 'fcn'"):
        train.write_config(make_tiny_config(**{"model.name": "fcn"}), str(tmp_path))


def test_eval_without_training_is_a_clear_error(make_tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="train in this workdir first"):
        evaluate.evaluate(make_tiny_config(), str(tmp_path))


def test_3d_model_trains_and_evaluates_on_volumes(make_tiny_config, tmp_path):
    config = make_tiny_config(**{"model.spatial_dims": 3, "data.image_size": (8, 8, 8),
                                 "model.name": "attention_unet", "train.num_epochs": 1})
    results = train.train_and_evaluate(config, str(tmp_path))
    assert set(results["aggregate"]) == {"all", "SynthCT", "SynthMRI"}  # no 2D ultrasound
    assert results["network_inputs"] >= len(results["per_case"])  # sliding windows
    with open(os.path.join(str(tmp_path), "preprocess.json")) as f:
        assert len(json.load(f)["target_spacing"]) == 3  # median spacing of the training set


def test_step_loop_makes_no_implicit_transfer(make_tiny_config, tmp_path, monkeypatch):
    """The step loop runs under jax.transfer_guard("disallow"): a hidden host<->device
    copy (a float() of a device value, a numpy batch handed to the step) raises."""
    config = make_tiny_config(**{"train.transfer_guard": "disallow", "train.num_epochs": 1,
                                 "train.steps_per_epoch": 3, "train.log_every_steps": 2})
    meta = train.train(config, str(tmp_path / "ok"))
    assert meta["epoch"] == 0
    # The guard is live: the same loop fed host numpy batches (no prefetch) fails.
    monkeypatch.setattr(sharding, "prefetch_to_device", lambda batches, mesh, size: batches)
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
        train.train(config, str(tmp_path / "guarded"))


def test_bfloat16_training_keeps_float32_master_weights_and_loss(make_tiny_config):
    config = make_tiny_config(**{"model.dtype": "bfloat16", "augment.enabled": False})
    state, losses = _run_steps(config, sharding.make_mesh(jax.devices()[:1]), steps=6)
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    assert all(x.dtype == np.float32 for x in leaves if np.issubdtype(x.dtype, np.floating))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    _, losses32 = _run_steps(make_tiny_config(**{"augment.enabled": False}),
                             sharding.make_mesh(jax.devices()[:1]), steps=1)
    np.testing.assert_allclose(losses[0], losses32[0], rtol=2e-2)  # same start, bf16 convs
