"""nnU-Net's recipe: schedule, optimizer, deep supervision, oversampling, plans in a run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medseg_jax import losses, planning, sharding, train
from medseg_jax import state as state_lib
from medseg_jax.config import default_config
from medseg_jax.data import cache, loader


def test_poly_schedule_values():
    config = default_config()
    config.train.lr_schedule, config.train.learning_rate = "poly", 0.01
    config.train.optimizer, config.train.momentum = "sgd", 0.0
    tx = state_lib.make_optimizer(config, 100)
    params = {"w": jnp.zeros(())}
    opt_state = tx.init(params)
    seen = []
    for step in range(100):
        updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
        seen.append(-float(updates["w"]))  # plain SGD, gradient 1: the learning rate
    np.testing.assert_allclose(seen[0], 0.01, rtol=1e-6)
    for step in (10, 50, 99):
        np.testing.assert_allclose(seen[step], 0.01 * (1 - step / 100) ** 0.9, rtol=1e-5)


def test_sgd_is_nesterov_with_l2_weight_decay():
    config = default_config()
    config.train.optimizer, config.train.learning_rate = "sgd", 0.1
    config.train.momentum, config.train.weight_decay = 0.9, 0.01
    tx = state_lib.make_optimizer(config, 10)
    p = {"w": jnp.array(2.0)}
    opt_state = tx.init(p)
    g1 = 0.5 + 0.01 * 2.0  # gradient + weight decay * parameter
    updates, opt_state = tx.update({"w": jnp.array(0.5)}, opt_state, p)
    # Nesterov, first step: velocity v = g; update = -lr * (g + momentum * v)
    np.testing.assert_allclose(float(updates["w"]), -0.1 * (g1 + 0.9 * g1), rtol=1e-6)


def test_switching_the_optimizer_is_refused_on_resume():
    from medseg_jax import workdir as workdir_lib

    before = workdir_lib.config_json(default_config())
    config = default_config()
    config.train.optimizer = "sgd"
    after = workdir_lib.config_json(config)
    assert workdir_lib.config_differences(before, after) == ["train.optimizer: 'adam' -> 'sgd'"]
    config.train.optimizer, config.train.learning_rate = "adam", 0.5
    assert workdir_lib.config_differences(before, workdir_lib.config_json(config)) == []


def test_deep_supervision_weights_and_loss():
    assert losses.deep_supervision_weights([1, 2]) == pytest.approx(
        {0: 4 / 7, 1: 2 / 7, 2: 1 / 7})
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, (2, 8, 8)))
    aux = {1: jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32),
           2: jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)}
    plain = losses.dice_ce_loss(logits, labels, 3)
    assert losses.supervised_loss(logits, labels, 3) == plain  # bit for bit
    expected = (4 / 7 * plain + 2 / 7 * losses.dice_ce_loss(aux[1], labels[:, ::2, ::2], 3)
                + 1 / 7 * losses.dice_ce_loss(aux[2], labels[:, ::4, ::4], 3))
    np.testing.assert_allclose(losses.supervised_loss(logits, labels, 3, aux=aux), expected,
                               rtol=1e-6)
    np.testing.assert_array_equal(losses.downsample_labels(labels, (4, 4)),
                                  labels[:, ::2, ::2])


def test_class_oversampling_draws_slices_of_every_class(tmp_path):
    from conftest import tiny_config

    config = tiny_config()
    _, _, samples = cache.prepare(config, str(tmp_path))
    train_samples = samples["train"]
    assert train_samples.classes.shape == (len(train_samples), 2)
    np.testing.assert_array_equal(train_samples.classes[:, 1], train_samples.foreground)
    a = loader.epoch_indices(train_samples, 8, 20, 0, 3, 0.5, "class")
    b = loader.epoch_indices(train_samples, 8, 20, 0, 3, 0.5, "class")
    np.testing.assert_array_equal(a, b)  # a function of (seed, epoch)
    assert train_samples.foreground[a[:, :4].ravel()].all()
    # One foreground class: drawing a class first changes nothing.
    np.testing.assert_array_equal(loader.epoch_indices(train_samples, 8, 20, 0, 3, 0.5), a)

    class Rare:  # 100 slices with class 1, 2 with class 2 (a small organ)
        foreground = np.ones(102, bool)
        classes = np.zeros((102, 3), bool)
        classes[:100, 1] = classes[100:, 2] = True

        def __len__(self):
            return 102

    by_class = loader.epoch_indices(Rare(), 8, 500, 0, 0, 0.5, "class")[:, :4]
    by_voxel = loader.epoch_indices(Rare(), 8, 500, 0, 0, 0.5)[:, :4]
    assert 0.4 < (by_class >= 100).mean() < 0.6  # half the draws: the rare class
    assert (by_voxel >= 100).mean() < 0.05


def test_class_centred_patches(tmp_path):
    """A patch drawn for a class is centred on a voxel of that class."""
    from conftest import tiny_config

    config = tiny_config(**{"model.spatial_dims": 3, "data.image_size": (8, 8, 4),
                            "model.depth": 2})
    _, _, samples = cache.prepare(config, str(tmp_path))
    volumes = samples["train"]
    coords, classes, bounds = volumes.class_coordinates(0)
    assert list(classes) == [1] and bounds[-1] == len(coords)
    records = loader.patch_records(volumes, 4, 3, 0, 0, 1.0, "class")
    assert (records[..., 1] == loader.CLASS).all()
    patch = loader._Patch(volumes, (8, 8, 4))
    for record in records.reshape(-1, 3):
        out = patch(record)
        if len(volumes.case(int(record[0]))[2]):  # (a tiny lesion may vanish in resampling)
            assert out["label"].any()  # centred on a labelled voxel: it is in the patch


def test_a_planned_run_fills_the_fields_left_to_the_plan(tmp_path):
    from conftest import tiny_recipe_config

    workdir = str(tmp_path / "run")
    config = tiny_recipe_config(**{"train.num_epochs": 1})
    meta = train.train(config, workdir)
    assert meta["epoch"] == 0
    with open(os.path.join(workdir, "plans.json")) as f:
        saved = json.load(f)
    fields = saved["fields"]
    assert fields["data.image_size"]["source"] == "plan"
    assert fields["train.batch_size"] == {"value": 8, "source": "config"}  # explicit wins
    assert fields["model.base_features"] == {"value": 4, "source": "config"}
    assert fields["model.depth"]["source"] == "plan"
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["data"]["image_size"] == fields["data.image_size"]["value"]
    assert recorded["model"]["pool_sizes"] == fields["model.pool_sizes"]["value"]
    assert recorded["data"]["in_plane"] == "spacing"
    assert "reasons" in saved["plan"] and saved["summary"]
    # A later run reads the run's plans.json (not the planner): edit it and see.
    resolved, _ = planning.resolve(config, workdir)
    assert list(resolved.data.image_size) == fields["data.image_size"]["value"]
    saved["plan"]["patch_size"] = [32, 32]
    with open(os.path.join(workdir, "plans.json"), "w") as f:
        json.dump(saved, f)
    assert tuple(planning.resolve(config, workdir)[0].data.image_size) == (32, 32)
    assert planning.resolve(default_config(), workdir) == (default_config(), None)


def test_budget_minutes_sets_the_epochs_and_a_resume_keeps_them(tmp_path, make_tiny_config):
    workdir = str(tmp_path / "run")
    config = make_tiny_config(**{"train.budget_minutes": 0.5, "train.num_epochs": 1,
                                 "train.patience": 0})
    train.train(config, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        epochs = json.load(f)["train"]["num_epochs"]
    assert 1 <= epochs <= 1000
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert len([r for r in rows if "val_loss" in r]) == epochs
    # Resuming (here: a finished run) keeps the measured epochs instead of measuring again.
    config2 = make_tiny_config(**{"train.budget_minutes": 0.5, "train.num_epochs": 1})
    out, budget = train._fit_budget(config2, workdir, None, None, None, None, 2)
    assert out.train.num_epochs == epochs and budget is None


def test_budget_times_steps_on_batches_read_once_before(tmp_path, make_tiny_config,
                                                      monkeypatch):
    """The budget's timed batches are read once, untimed, before any step: on a cold page
    cache the first read of a case costs more than the step (measured on OpenKBP)."""
    events = []
    epoch_batches, jit_steps = loader.epoch_batches, state_lib.jit_steps

    def reading(*args, **kwargs):
        for batch in epoch_batches(*args, **kwargs):
            events.append(("read", int(np.asarray(batch["label"]).sum())))
            yield batch

    def stepping(*args, **kwargs):
        train_fn, eval_fn = jit_steps(*args, **kwargs)

        def step(state, batch):
            events.append(("step", None))
            return train_fn(state, batch)
        return step, eval_fn

    monkeypatch.setattr(loader, "epoch_batches", reading)
    monkeypatch.setattr(state_lib, "jit_steps", stepping)
    config = make_tiny_config(**{"train.budget_minutes": 0.5, "train.num_epochs": 1})
    dataset, _, samples = cache.prepare(config, str(tmp_path))
    train._fit_budget(config, str(tmp_path), sharding.make_mesh(), dataset, samples["train"],
                      samples["val"], 4)
    n = 1 + train._BUDGET_WARMUP + train._BUDGET_STEPS
    kinds = [kind for kind, _ in events]
    assert kinds[:n + 1] == ["read"] * (n + 1) and kinds[n + 1] == "step"
    timed = [e[1] for e in events[n:] if e[0] == "read"]
    assert timed == [e[1] for e in events[:n]]  # the same batches, read again


def test_recipe_configs_are_short_and_valid():
    import runpy

    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("unet_3d.py", "unet_2d_planned.py", "benchmark_recipe.py"):
        path = os.path.join(here, name)
        assert len(open(path).read().splitlines()) < 40, name
        config = runpy.run_path(path)["get_config"]()
        assert config.data.plan == "auto" and config.model.deep_supervision
        assert config.train.lr_schedule == "poly" and config.data.oversample == "class"
        assert config.augment.p_blur > 0 and config.augment.p_lowres > 0


def test_jitted_step_with_deep_supervision_learns():
    from conftest import tiny_recipe_config
    from medseg_jax import sharding

    config = tiny_recipe_config()
    config.data.image_size, config.model.depth = (16, 16), 3
    config.augment.enabled = False  # the same batch every step: the loss must fall
    mesh = sharding.make_mesh()
    model = state_lib.build_model(config, 3)
    state = state_lib.init_state(config, model, (8, 16, 16, 1), 10, mesh)
    step, _ = state_lib.jit_steps(config, mesh, 3)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 16, 16, 1)).astype(np.float32)
    label = (image[..., 0] > 0.5).astype(np.uint8) + (image[..., 0] > 1.5)
    batch = sharding.to_global({"image": image, "label": label}, mesh)
    first = None
    for _ in range(8):
        state, out = step(state, batch)
        first = float(out["loss"]) if first is None else first
    assert float(out["loss"]) < first
    assert optax.tree.norm(state.params) > 0
    assert jax.tree.leaves(state.params)


def test_planned_runs_fail_in_one_line_naming_the_field_or_file(tmp_path):
    """Bad input to a planned run: an unknown budget names the field; a damaged
    plans.json names the file and how to recover; nothing the workdir holds changes."""
    from conftest import tiny_recipe_config

    config = tiny_recipe_config(**{"train.num_epochs": 1})
    config.data.plan_budget = "tpu"
    with pytest.raises(ValueError, match="config.data.plan_budget: 'tpu' is not one of"):
        planning.resolve(config, str(tmp_path / "a"))
    workdir = tmp_path / "b"
    workdir.mkdir()
    (workdir / "plans.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"plans.json: not valid JSON .*\(the run's plan\); "
                                         "delete it to plan again"):
        train.train(tiny_recipe_config(), str(workdir))
    assert (workdir / "plans.json").read_text() == "{not json"
    (workdir / "plans.json").write_text('{"fields": {}}')
    with pytest.raises(ValueError, match="plans.json: not a plan written by this package"):
        planning.resolve(tiny_recipe_config(), str(workdir))


@pytest.mark.parametrize("planned", [True, False])
def test_a_damaged_image_read_for_its_spacing_is_named_in_one_line(tmp_path, planned):
    """The plan's fingerprint and the median target spacing read NIfTI headers before any
    case is loaded: a damaged file there is a ValueError naming it, as everywhere else."""
    from conftest import tiny_config, tiny_recipe_config

    from medseg_jax.data import synthetic

    roots = synthetic.make_synthetic(str(tmp_path / "data"), seed=0, num_cases=4, size=16,
                                     depth=4)
    root = next(r for r in roots if r.endswith("SynthMRI"))
    images = sorted(os.listdir(os.path.join(root, "imagesTr")))
    for name in images:  # whichever case lands in the training split
        with open(os.path.join(root, "imagesTr", name), "wb") as f:
            f.write(b"not a NIfTI file" * 10)
    overrides = {"data.root": root, "train.num_epochs": 1}
    config = (tiny_recipe_config(**overrides) if planned else
              tiny_config(**overrides, **{"data.in_plane": "spacing"}))
    with pytest.raises(ValueError, match=r"imagesTr/.*\.nii\.gz: cannot read NIfTI header"):
        train.train(config, str(tmp_path / "run"))


def test_eval_of_a_planned_config_in_an_empty_workdir_writes_nothing(tmp_path):
    """A mistyped --workdir on eval: refused before planning could open the data set
    (which would write a split, or generate the synthetic data, into it)."""
    from conftest import tiny_recipe_config

    workdir = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="splits.json not found: train in this "
                                                "workdir first"):
        state_lib.restore_run(tiny_recipe_config(), str(workdir))
    assert not workdir.exists()
