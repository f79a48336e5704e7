"""The benchmark: several architectures, the sweep's selection rule, the report."""

import csv
import json
import re
import runpy
from pathlib import Path

import pytest
from conftest import tiny_config

from medseg_jax import evaluate, train
from medseg_jax import study

ROOT = Path(__file__).resolve().parents[1]


def bench_config(**benchmark_fields):
    config = tiny_config(**{"train.num_epochs": 1})
    config.benchmark = runpy.run_path(str(ROOT / "configs" / "benchmark.py"))[
        "get_config"]().benchmark
    for key, value in benchmark_fields.items():
        node = config.benchmark
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_benchmark_with_sweep_never_chooses_on_the_test_split(tmp_path, monkeypatch):
    calls = []  # (kind, workdir, split) in call order
    real_fit, real_eval = train.train_and_evaluate, evaluate.evaluate

    def fit(config, workdir):
        calls.append(("fit", workdir, config.eval.split))
        return real_fit(config, workdir)

    def ev(config, workdir, split=None, checkpoint=None):
        calls.append(("eval", workdir, split or config.eval.split))
        return real_eval(config, workdir, split, checkpoint)

    monkeypatch.setattr(train, "train_and_evaluate", fit)
    monkeypatch.setattr(evaluate, "evaluate", ev)
    # num_epochs and patience are not swept (empty lists): the trials keep the config's.
    config = bench_config(**{"models": "unet,fcn", "sweep.enabled": True,
                             "sweep.learning_rates": "1e-3,3e-2", "sweep.batch_sizes": "8",
                             "sweep.num_epochs": "", "sweep.patience": ""})
    config.train.patience = 3
    workdir = tmp_path / "bench"
    results = study.run(config, str(workdir))
    assert [(t["learning_rate"], t["batch_size"], t["num_epochs"], t["patience"])
            for t in results["trials"]] == [(1e-3, 8, 1, 3), (3e-2, 8, 1, 3)] * 2
    trial = json.loads((workdir / "unet" / "trial_1" / "config.json").read_text())["train"]
    assert (trial["learning_rate"], trial["batch_size"], trial["patience"]) == (3e-2, 8, 3)

    # Every trial is trained and scored on the validation split; the test split is
    # evaluated once per architecture, for the chosen trial, after all of its trials.
    assert [c[2] for c in calls if c[0] == "fit"] == ["val"] * 4
    tests = [i for i, c in enumerate(calls) if c[2] == "test"]
    assert len(tests) == 2
    for label, test_index in zip(("unet", "fcn"), tests):
        trials = [t for t in results["trials"] if t["entry"] == label]
        chosen = [t for t in trials if t.get("chosen")]
        assert len(chosen) == 1
        assert chosen[0]["val_dice"] == max(t["val_dice"] for t in trials)
        assert calls[test_index][1] == chosen[0]["workdir"]
        last_trial = max(i for i, c in enumerate(calls) if label + "/trial_" in c[1]
                         and c[2] == "val")
        assert last_trial < test_index

    # The report and its files.
    text = (workdir / "report.md").read_text()
    for heading in ("## Test metrics", "## Cost", "## Paired comparisons",
                    "## The study's figures", "## Sweep trials", "## Figures"):
        assert heading in text
    assert "0.85" in text and "Wilcoxon" in text and results["environment"]["jax"] in text
    for name in ("training_curves.png", "boxplots.png", "test_cases.png"):
        assert (workdir / "figures" / name).stat().st_size > 1000
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["entry"] for r in rows} == {"unet", "fcn"}
    dice = [r for r in rows if r["entry"] == "unet" and r["data"] == "all"
            and r["metric"] == "dice"]
    assert float(dice[0]["mean"]) == results["entries"][0]["aggregate"]["all"]["lesion"]["dice"]["mean"]
    saved = json.loads((workdir / "results.json").read_text())
    comparison = saved["comparisons"][0]
    assert (comparison["a"], comparison["b"]) == ("unet", "fcn")
    assert comparison["cases"] == len(results["entries"][0]["per_case"])
    assert saved["entries"][1]["params"] > 0


def test_sweep_trials_with_a_budget_share_the_epochs_of_their_batch_size(tmp_path,
                                                                         monkeypatch):
    """With a time budget, the first trial of each batch size fits its epochs; the later
    ones (only the learning rate differs) train as many, not a new measurement's."""
    import ml_collections

    measured = []

    def fake_fit(config, workdir, *args, **kwargs):
        measured.append((config.train.learning_rate, config.train.batch_size))
        out = ml_collections.ConfigDict(config.to_dict())
        out.train.num_epochs = {8: 1, 16: 2}[config.train.batch_size]
        return out, None

    monkeypatch.setattr(train, "_fit_budget", fake_fit)
    config = bench_config(**{"models": "unet", "sweep.enabled": True,
                             "sweep.learning_rates": "1e-3,3e-2", "sweep.batch_sizes": "8,16",
                             "sweep.num_epochs": "", "sweep.patience": "",
                             "budget_minutes": 2.0})
    results = study.run(config, str(tmp_path / "bench"))
    assert measured == [(1e-3, 8), (1e-3, 16)]
    assert [(t["learning_rate"], t["batch_size"], t["num_epochs"], t["epochs_run"])
            for t in results["trials"]] == [(1e-3, 8, 1, 1), (1e-3, 16, 2, 2),
                                            (3e-2, 8, 1, 1), (3e-2, 16, 2, 2)]


def test_choose_trial_by_validation_dice():
    trials = [{"val_dice": 0.5}, {"val_dice": float("nan")}, {"val_dice": 0.7},
              {"val_dice": 0.7}]
    assert study.choose_trial(trials) == 2


def test_sweep_grid_sweeps_only_the_lists_given():
    config = bench_config(**{"sweep.learning_rates": "1e-3, 3e-3", "sweep.batch_sizes": "",
                             "sweep.num_epochs": "", "sweep.patience": "0"})
    assert study.sweep_grid(config) == [{"learning_rate": 1e-3, "patience": 0},
                                        {"learning_rate": 3e-3, "patience": 0}]
    recipe = runpy.run_path(str(ROOT / "configs" / "benchmark_recipe.py"))["get_config"]()
    assert study.sweep_grid(recipe) == [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}]


@pytest.mark.parametrize("fields, message", [
    ({"models": "unet,resnet"}, "config.benchmark.models: unknown model 'resnet'"),
    ({"models": "unet,unet"}, "'unet' is listed twice"),
    ({"models": " , "}, "config.benchmark.models: empty"),
    ({"sweep.enabled": True, "sweep.learning_rates": "1e-3,fast"},
     "config.benchmark.sweep.learning_rates: '1e-3,fast' is not a comma-separated list"),
    ({"sweep.enabled": True, "sweep.learning_rates": " ", "sweep.batch_sizes": "",
      "sweep.num_epochs": "", "sweep.patience": ""},
     "config.benchmark.sweep: every list is empty"),
])
def test_bad_benchmark_fields_are_named(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        study.run(bench_config(**fields), str(tmp_path))


def test_entries_with_3d_and_fine_tuning():
    entries = study.parse_entries(bench_config(models="unet,fcn_3d", init_from="/old"))
    assert [(e.label, e.name, e.dims, e.init_from) for e in entries] == [
        ("unet", "unet", 2, ""), ("fcn_3d", "fcn", 3, ""),
        ("unet_finetuned", "unet", 2, "/old/unet"), ("fcn_3d_finetuned", "fcn", 3, "/old/fcn_3d")]


def test_study_on_several_data_sets_with_a_budget(tmp_path):
    """Two data sets with their own label sets: one section each, a summary table across
    them, runs in <workdir>/<data set>/<architecture>, a time budget shared by the runs."""
    from medseg_jax.data import synthetic

    roots = synthetic.make_synthetic(str(tmp_path / "data"), num_cases=4, size=16, depth=4)
    mri = next(r for r in roots if r.endswith("SynthMRI"))
    us = next(r for r in roots if r.endswith("SynthUS"))
    config = bench_config(**{"models": "unet,fcn", "datasets": f"mri:{mri},us:{us}",
                             "budget_minutes": 1.0})
    workdir = tmp_path / "bench"
    results = study.run(config, str(workdir))
    assert sorted((i["dataset"], i["label"]) for i in results["entries"]) == [
        ("mri", "fcn"), ("mri", "unet"), ("us", "fcn"), ("us", "unet")]
    for info in results["entries"]:
        assert Path(info["workdir"]) == workdir / info["dataset"] / info["label"]
        recorded = json.loads((Path(info["workdir"]) / "config.json").read_text())
        assert recorded["train"]["budget_minutes"] > 0
        # As budget.json fixed it at the start, for a rerun to give every run the same.
        shared = json.loads((workdir / study.BUDGET_JSON).read_text())["per_run_minutes"]
        assert recorded["train"]["budget_minutes"] == shared[
            f"{info['dataset']}/{info['label']}"]
    assert {c["dataset"] for c in results["comparisons"]} == {"mri", "us"}
    report = (workdir / "report.md").read_text()
    assert "## Summary across data sets" in report and "## mri" in report
    assert "## us" in report and "the study (theirs)" in report
    epochs = {(i["dataset"], i["label"]): i["epochs_run"] for i in results["entries"]}
    assert (f"| epochs run (unet / fcn) | {epochs['mri', 'unet']} / {epochs['mri', 'fcn']} | "
            f"{epochs['us', 'unet']} / {epochs['us', 'fcn']} |  |") in report
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["dataset"] for r in rows} == {"mri", "us"}
    assert (workdir / "figures" / "mri" / "boxplots.png").exists()
    # With several data sets, the sweep trials' table says whose each trial is.
    from medseg_jax import study_report

    trial = {"entry": "unet", "trial": 0, "learning_rate": 1e-3, "batch_size": 8,
             "num_epochs": 1, "patience": 0, "epochs_run": 1, "val_dice": 0.5}
    results["trials"] = [dict(trial, dataset="mri"), dict(trial, dataset="us")]
    text = study_report.report_markdown(results)
    assert "| data set | architecture | trial | lr |" in text
    assert "| mri | unet | 0 | 0.001 |" in text and "| us | unet | 0 | 0.001 |" in text


def test_study_budget_is_shared_by_weight_and_kept_for_reruns(tmp_path):
    runs = [("mri", "unet"), ("mri", "fcn"), ("ct", "unet"), ("ct", "fcn")]
    config = bench_config(budget_minutes=10.0, budget_shares="ct:3")
    budgets = study.run_budgets(config, str(tmp_path), runs, elapsed_minutes=2.0)
    assert budgets == pytest.approx([0.85 * 8 / 8, 0.85 * 8 / 8, 0.85 * 8 * 3 / 8,
                                     0.85 * 8 * 3 / 8])
    recorded = json.loads((tmp_path / study.BUDGET_JSON).read_text())
    assert recorded["per_run_minutes"]["ct/fcn"] == pytest.approx(2.55)
    # A rerun (conversion cached: less start-up) keeps the figures every run fitted to.
    assert study.run_budgets(config, str(tmp_path), runs, elapsed_minutes=0.1) == budgets
    # A new budget, new shares or other runs share it again.
    config.benchmark.budget_shares = ""
    assert study.run_budgets(config, str(tmp_path), runs, 0.0) == pytest.approx([2.125] * 4)
    assert study.run_budgets(config, str(tmp_path), runs[:2], 0.0) == pytest.approx([4.25] * 2)
    # Without a budget: no file is needed, every run trains its configured epochs.
    assert study.run_budgets(bench_config(), str(tmp_path / "none"), runs, 0.0) == [0.0] * 4
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("shares, message", [
    ("ct", "'ct' is not name:weight"), ("ct:0", "'ct:0' is not name:weight"),
    ("ct:x", "'ct:x' is not name:weight"), ("us:2", "'us' is not a data set of "
                                            "config.benchmark.datasets (ct, mri)")])
def test_study_budget_shares_field_is_checked(tmp_path, shares, message):
    config = bench_config(budget_shares=shares)
    with pytest.raises(ValueError, match=f"config.benchmark.budget_shares: {re.escape(message)}"):
        study.run_budgets(config, str(tmp_path), [("mri", "unet"), ("ct", "unet")], 0.0)


def test_study_budget_file_damaged_or_too_small(tmp_path):
    (tmp_path / study.BUDGET_JSON).write_text("{\"budget_minutes\": 1")
    with pytest.raises(ValueError, match=r"budget.json: not valid JSON .*per-run budgets.*"
                                         "delete it to share the budget again"):
        study.run_budgets(bench_config(budget_minutes=1.0), str(tmp_path), [("", "unet")], 0)
    (tmp_path / study.BUDGET_JSON).write_text(json.dumps(
        {"budget_minutes": 1.0, "budget_shares": "", "per_run_minutes": {"unet": "x"}}))
    with pytest.raises(ValueError, match="budget.json: per_run_minutes holds a value that "
                                         "is not a number"):
        study.run_budgets(bench_config(budget_minutes=1.0), str(tmp_path), [("", "unet")], 0)
    with pytest.raises(ValueError, match="budget_minutes=1 leaves less than 6 s"):
        study.run_budgets(bench_config(budget_minutes=1.0), str(tmp_path / "b"),
                          [("", f"m{i}") for i in range(10)], 0.0)


def test_study_datasets_field_is_checked(tmp_path):
    with pytest.raises(ValueError, match="is not name:folder"):
        study.parse_datasets(bench_config(datasets="justapath"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="x: /nonexistent is not a folder"):
        study.parse_datasets(bench_config(datasets="x:/nonexistent"), str(tmp_path))
    with pytest.raises(ValueError, match="neither a Decathlon folder"):
        study.parse_datasets(bench_config(datasets=f"x:{tmp_path}"), str(tmp_path))


def test_report_protocol_says_what_each_config_trains_with():
    from medseg_jax.config import default_config, recipe
    from medseg_jax.study_report import protocol

    study = default_config().to_dict()
    text = protocol(study, 0)
    assert "Adam lr 0.001, batch 16, input (64, 64), at most" in text
    assert "early stopping on validation loss (patience" in text
    assert "deep supervision" not in text
    planned = recipe(default_config())
    planned.train.optimizer = "sgd"
    planned.train.budget_minutes = 8.5
    text = protocol(planned.to_dict(), 0)
    assert "SGD with Nesterov momentum 0.99 lr" in text and "polynomial decay" in text
    assert "from each data set's plan" in text and "batch 0" not in text
    assert "epochs of 250 steps (fitted to 8.5 min per run)" in text
    assert "no early stopping" in text and "with deep supervision" in text
    # Runs that differ (sweep trials, budgets fitted per run) are not given one run's value.
    text = protocol(planned.to_dict(), 0, {"learning_rate", "num_epochs", "budget_minutes"})
    assert "SGD with Nesterov momentum 0.99 lr per run, polynomial" in text
    assert "epochs of 250 steps per run ('epochs run' in the cost tables; fitted to" in text
    assert "8.5 min" not in text


def test_report_per_run_fields_are_those_runs_or_trials_differ_in():
    from medseg_jax.study_report import per_run_fields

    def entry(**train):
        return {"config": {"train": {"learning_rate": 1e-3, "batch_size": 8,
                                     "num_epochs": 4, "patience": 0, **train}}}

    assert per_run_fields({"entries": [entry(), entry()], "trials": []}) == set()
    trials = [{"learning_rate": 1e-3, "batch_size": 8}, {"learning_rate": 3e-3,
                                                          "batch_size": 8}]
    assert per_run_fields({"entries": [entry(), entry(num_epochs=3)],
                           "trials": trials}) == {"learning_rate", "num_epochs"}


def test_study_with_post_processing_chosen_on_validation(tmp_path):
    """eval.postprocess=choose in the study: each run chooses on its validation split,
    its test results are those with the choice, and the report says which it applied."""
    config = bench_config(models="unet")
    config.eval.postprocess = "choose"
    workdir = tmp_path / "bench"
    results = study.run(config, str(workdir))
    info = results["entries"][0]
    run_dir = Path(info["workdir"])
    choice = json.loads((run_dir / "postprocessing.json").read_text())
    assert choice["split"] == "val" and info["postprocess"].startswith("auto")
    tested = json.loads((run_dir / "test_auto_metrics.json").read_text())
    assert tested["per_case"] == json.loads(json.dumps(info["per_case"]))  # nan as JSON
    assert f"unet: {info['postprocess']}" in (workdir / "report.md").read_text()
