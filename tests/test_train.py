import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import scripted_validation
from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import evaluate, evaluators, losses, metrics, sharding, train, writers
from medseg_jax import loop as loop_lib
from medseg_jax import state as state_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import loader


def _batch(config, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *config.data.image_size, 1)).astype(np.float32)
    labels = np.zeros((n, *config.data.image_size), np.int32)
    labels[:, 4:10, 5:12] = 1
    images[labels > 0] += 2.0
    return {"image": images, "label": labels}


def _run_steps(config, mesh, steps=3):
    model = state_lib.build_model(config, 2)
    state = state_lib.init_state(config, model, (8, *config.data.image_size, 1), 10, mesh)
    train_fn, _ = state_lib.jit_steps(config, mesh, 2)
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
    from medseg_jax import planning

    config, _ = planning.resolve(config, workdir)  # the run's plan (recipe configs)
    mesh = sharding.make_mesh()
    model = state_lib.build_model(config, 2)
    abstract = state_lib.abstract_state(config, model, (8, *config.data.image_size, 1), 1, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    state, meta = ck.restore(ck.resolve(which), abstract)
    ck.close()
    return state, meta


class _Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted_run(make_run_config, tmp_path, monkeypatch):
    full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
    config3 = make_run_config(**{"train.num_epochs": 3, "train.patience": 0})
    train.train(config3, full_dir)
    if config3.train.lr_schedule == "constant":  # a shorter run, continued for longer
        train.train(make_run_config(**{"train.num_epochs": 2, "train.patience": 0}),
                    split_dir)
    else:  # a schedule over the run's length: the same run, stopped after epoch 2
        real = loop_lib.Loop.end_epoch

        def end_epoch(self, state, meta, epoch, *args):
            real(self, state, meta, epoch, *args)
            if epoch == 1:
                raise _Interrupted

        monkeypatch.setattr(loop_lib.Loop, "end_epoch", end_epoch)
        with pytest.raises(_Interrupted):
            train.train(config3, split_dir)
        monkeypatch.undo()
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


def test_train_and_evaluate_then_eval_reproduces(make_run_config, tmp_path):
    workdir = str(tmp_path)
    config = make_run_config()
    results = train.train_and_evaluate(config, workdir)
    for name in ("config.json", "splits.json", "preprocess.json", "metrics.jsonl",
                 "test_metrics.json", "test_metrics.md", "test_per_case.csv",
                 "test_summary.csv", "figures/test_cases.png", "figures/training_curves.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    agg = results["aggregate"]
    assert set(agg) == {"all", "SynthCT", "SynthMRI", "SynthUS"}
    assert set(agg["all"]["lesion"]) == set(metrics.METRIC_NAMES)
    again = evaluate.evaluate(config, workdir)
    # nan (e.g. the volume of a 2D case) != nan: compare the serialised values.
    assert json.dumps(again["per_case"]) == json.dumps(results["per_case"])
    with open(os.path.join(workdir, "test_per_case.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [c["case"] for c in results["per_case"]]
    first = results["per_case"][0]["metrics"]["lesion"]
    assert float(rows[0]["dice"]) == first["dice"] and float(rows[0]["hd95"]) == first["hd95"]
    with open(os.path.join(workdir, "test_summary.csv")) as f:
        summary = {(r["data"], r["metric"]): r for r in csv.DictReader(f)}
    dice = agg["all"]["lesion"]["dice"]
    row = summary[("all", "dice")]
    assert float(row["mean"]) == dice["mean"] and int(row["n"]) == dice["n"]
    assert float(row["ci_low"]) <= dice["mean"] <= float(row["ci_high"])
    with open(os.path.join(workdir, "splits.json")) as f:
        assert [c["case"] for c in results["per_case"]] == json.load(f)["test"]
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["seed"] == config.seed
    assert recorded["versions"]["jax"] == jax.__version__
    for name in ("python", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        assert recorded["versions"][name], name


def test_workdir_of_another_model_is_refused(make_tiny_config, tmp_path):
    workdir_lib.write_config(make_tiny_config(), str(tmp_path))
    with pytest.raises(ValueError, match="model.name: 'unet' -> 'fcn'"):
        workdir_lib.write_config(make_tiny_config(**{"model.name": "fcn"}), str(tmp_path))
    with pytest.raises(ValueError, match=r"train.weight_decay: 0.0 -> 0.01 \(switches Adam/AdamW"):
        workdir_lib.write_config(make_tiny_config(**{"train.weight_decay": 0.01}), str(tmp_path))
    with pytest.raises(ValueError, match=r"\(train.learning_rate: 0.001 -> 0.0001; recorded in"):
        workdir_lib.write_config(make_tiny_config(**{"train.learning_rate": 1e-4,
                                                     "data.num_workers": 2}), str(tmp_path))
    workdir_lib.write_config(make_tiny_config(**{"data.num_workers": 2}), str(tmp_path))


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


def _diverging(kind):
    """dice_ce_loss with a NaN value ('loss') or a finite value and NaN gradient."""
    original = losses.dice_ce_loss

    def loss(logits, *args, **kwargs):
        value = original(logits, *args, **kwargs)
        if kind == "loss":
            return value * jnp.nan
        return value + 0.0 * jnp.sqrt(0.0 * jnp.mean(logits))  # d sqrt(0) = inf; inf * 0

    return loss


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(
        make_tiny_config, tmp_path, monkeypatch, kind):
    workdir = str(tmp_path)
    config = make_tiny_config(**{"train.num_epochs": 2, "train.log_every_steps": 50})
    train.train(make_tiny_config(**{"train.num_epochs": 1}), workdir)  # steps 1-2: good
    good, _ = _params(workdir, config)
    monkeypatch.setattr(losses, "dice_ce_loss", _diverging(kind))
    with pytest.raises(FloatingPointError) as error:
        train.train(config, workdir)  # step 3 diverges (checked at the epoch's end, step 4)
    message = str(error.value)
    assert "\n" not in message
    assert f"non-finite {kind} at step 3 " in message
    assert "the last good checkpoint (step 2) is kept in" in message
    kept, _ = _params(workdir, config)
    assert int(kept.step) == 2
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if kind == "loss":
        return
    monkeypatch.undo()  # the recovery the message suggests: clip and run again
    meta = train.train(make_tiny_config(**{"train.num_epochs": 2,
                                           "train.grad_clip_norm": 1.0}), workdir)
    assert meta["epoch"] == 1


def test_same_seed_gives_bit_identical_numbers_with_worker_processes(make_run_config,
                                                                     tmp_path):
    config = make_run_config(**{"data.num_workers": 1, "train.num_epochs": 1})
    rows, states = [], []
    for name in ("first", "second"):
        workdir = str(tmp_path / name)
        train.train(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows.append([{k: v for k, v in json.loads(line).items()
                          if k not in ("images_per_second", "epoch_seconds")} for line in f])
        states.append(_params(workdir, config)[0])
    assert rows[0] == rows[1] and any("val_dice" in r for r in rows[0])
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_metrics_log_drops_rows_past_the_checkpoint_and_a_cut_line(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 4, "lo')  # killed
    log = writers.create(str(tmp_path), restored_step=2, tensorboard=False)
    log.write_scalars(3, {"loss": 0.5}, section="train", epoch=1)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0},
        {"step": 3, "epoch": 1, "section": "train", "loss": 0.5}]


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


def test_2d_model_on_resampled_slices_trains_and_evaluates(make_tiny_config, tmp_path):
    """data.in_plane='spacing': 2D patches of cases resampled in plane, 2D sliding window;
    the synthetic set mixes 2D ultrasound images and 3D volumes."""
    config = make_tiny_config(**{"data.in_plane": "spacing", "model.name": "attention_unet",
                                 "data.image_size": (8, 8), "train.num_epochs": 1})
    results = train.train_and_evaluate(config, str(tmp_path))
    assert set(results["aggregate"]) == {"all", "SynthCT", "SynthMRI", "SynthUS"}
    assert results["network_inputs"] > len(results["per_case"])  # windows, not one per case
    with open(os.path.join(str(tmp_path), "preprocess.json")) as f:
        assert len(json.load(f)["target_spacing"]) == 2  # in plane only
    assert os.path.exists(os.path.join(str(tmp_path), "figures", "test_cases.png"))


def test_a_field_added_later_at_its_default_is_no_difference(make_tiny_config):
    """A workdir written before data.in_plane existed still evaluates with the default."""
    current = workdir_lib.config_json(make_tiny_config())
    previous = json.loads(json.dumps(current))
    del previous["data"]["in_plane"]
    assert workdir_lib.config_differences(previous, current) == []
    current["data"]["in_plane"] = "spacing"
    assert workdir_lib.config_differences(previous, current) == ["data.in_plane: None -> 'spacing'"]


def test_validation_dice_on_8_devices_with_a_padded_batch_equals_numpy(make_tiny_config,
                                                                       tmp_path):
    """train.validate sums Dice counts over all devices and masks the padded rows of the
    last batch: its Dice equals numpy's over the same samples and predictions."""
    from medseg_jax.data import cache

    config = make_tiny_config(**{"eval.batch_size": 8})
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    dataset, _, samples = cache.prepare(config, str(tmp_path))
    val = samples["val"]
    assert len(val) % 8  # a padded last batch
    model = state_lib.build_model(config, dataset.num_classes)
    state = state_lib.init_state(config, model, (8, *config.data.image_size, 1), 4, mesh)
    _, eval_fn = state_lib.jit_steps(config, mesh, dataset.num_classes)
    out = evaluators.validate(eval_fn, state, val, config, mesh)
    probs = np.concatenate([np.asarray(state_lib.predict_step(state, np.asarray(
        val.images[i:i + 8]))) for i in range(0, len(val), 8)])
    pred, gt = probs.argmax(-1), np.asarray(val.labels)
    for c in range(1, dataset.num_classes):
        expected = metrics.dice(pred == c, gt == c)
        np.testing.assert_allclose(out["val_dice_per_class"][c - 1], expected, rtol=1e-6)
    # train.val_max_samples: the same over an evenly spaced subset (3 of 8 rows padded)
    config.train.val_max_samples = n_sub = len(val) // 8 * 8 - 3
    sub = evaluators.validate(eval_fn, state, val, config, mesh)
    idx = loader.evenly_spaced(len(val), n_sub)
    assert len(idx) == n_sub and sub["val_dice"] != out["val_dice"]
    for c in range(1, dataset.num_classes):
        expected = metrics.dice(pred[idx] == c, gt[idx] == c)
        np.testing.assert_allclose(sub["val_dice_per_class"][c - 1], expected, rtol=1e-6)


def _val_epochs(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["epoch"] for row in map(json.loads, f) if "val_loss" in row]


def test_early_stopping_after_patience_epochs_keeps_the_best_before(make_tiny_config,
                                                                  tmp_path, monkeypatch):
    """patience=2, min_delta=0.001: epoch 3 is lower by less than min_delta (no
    improvement), epoch 4 higher: the run stops after epoch 4 of 6 (never seeing epoch
    5's improvement), its best checkpoint that of epoch 2; run again, it stays stopped."""
    config = make_tiny_config(**{"train.num_epochs": 6, "train.steps_per_epoch": 1,
                                 "train.patience": 2, "train.min_delta": 0.001,
                                 "eval.figures": False, "train.tensorboard": False})
    scripted_validation(monkeypatch, [1.0, 0.5, 0.4995, 0.6, 0.3, 0.2],
                         [0.2, 0.6, 0.5, 0.4, 0.9, 0.9])
    workdir = str(tmp_path / "run")
    meta = train.train(config, workdir)
    assert meta["stopped"] and meta["epoch"] == 3 and meta["bad_epochs"] == 2
    assert meta["best_epoch"] == 2 and meta["best_val_dice"] == 0.6
    assert _val_epochs(workdir) == [1, 2, 3, 4]
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ck.latest_step() == 4 and ck.best_step() == 2  # one step per epoch
    assert ck.resolve("best") == 2
    ck.close()
    again = train.train(config, workdir)  # a stopped run is finished
    assert again["epoch"] == 3 and _val_epochs(workdir) == [1, 2, 3, 4]


def test_keep_every_minutes_keeps_a_checkpoint_per_interval(make_tiny_config, tmp_path,
                                                            monkeypatch):
    """train.keep_every_minutes=1 with a clock at 40 s per step: of the checkpoints at
    40, 80, 120 and 160 s, those of 40 s and 120 s (80 s after it) are kept besides the
    latest (160 s) and the best (40 s); 80 s is not."""
    import datetime
    import sys
    import types

    manager_module = sys.modules[ckpt_lib.ocp.CheckpointManager.__module__]
    seconds = [0]

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + \
                datetime.timedelta(seconds=seconds[0])

    monkeypatch.setattr(manager_module, "datetime", types.SimpleNamespace(
        datetime=Clock, timezone=datetime.timezone, timedelta=datetime.timedelta))
    real_save = ckpt_lib.Checkpointer.save

    def save(self, step, *args):
        seconds[0] = 40 * step
        real_save(self, step, *args)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    config = make_tiny_config(**{"train.num_epochs": 4, "train.steps_per_epoch": 1,
                                 "train.patience": 0, "train.checkpoint_max_to_keep": 1,
                                 "train.keep_every_minutes": 1.0, "eval.figures": False,
                                 "train.tensorboard": False})
    scripted_validation(monkeypatch, [1.0] * 4, [0.9, 0.8, 0.7, 0.6])
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ck.best_step() == 1 and ck.latest_step() == 4
    assert sorted(ck.all_steps()) == [1, 3, 4]  # without the setting: [1, 4]
    ck.close()


def test_profile_steps_writes_a_trace_of_those_steps(make_tiny_config, tmp_path):
    """train.profile_steps="1:2" on a run of 3 steps: a jax.profiler trace in
    <workdir>/profile that TensorBoard (.xplane.pb) and Perfetto (trace JSON) open, with
    the annotated training steps 1 and 2 (not 3) in it."""
    import glob
    import gzip

    config = make_tiny_config(**{"train.num_epochs": 1, "train.steps_per_epoch": 3,
                                 "train.profile_steps": "1:2", "train.tensorboard": False})
    train.train(config, str(tmp_path))
    runs = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
    assert len(runs) == 1, runs
    xplane = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    assert xplane and os.path.getsize(xplane[0]) > 0
    perfetto = glob.glob(os.path.join(runs[0], "perfetto_trace.json.gz"))
    assert perfetto, os.listdir(runs[0])
    with gzip.open(perfetto[0], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = {str(e.get("args", {}).get("step_num")) for e in events if e.get("name") == "train"}
    assert steps == {"1", "2"}, steps


@pytest.mark.parametrize("spec", ["2:1", "0:3", "5", "a:b"])
def test_profile_steps_must_be_a_range_of_steps(make_tiny_config, tmp_path, spec):
    config = make_tiny_config(**{"train.profile_steps": spec})
    with pytest.raises(ValueError, match=r"config\.train\.profile_steps: .* is not 'A:B'"):
        train.train(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before anything is written
