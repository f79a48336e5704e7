"""Letting the program choose (configs/auto.py, medseg_jax/choose.py): both planned
configurations trained on one split, every validation score and the choice in
choice.json, the rule, evaluation and prediction with the choice, a rerun that does not
train again, one-line errors."""

import json
import math
import os
from pathlib import Path

import pytest

from conftest import override, snapshot
from medseg_jax import choose
from medseg_jax import config as config_lib

BUDGET = 0.02  # minutes: one epoch of two steps per configuration


def auto_config(data, **overrides):
    """configs/auto.py on tiny data: a tiny network, two steps an epoch, no TTA."""
    config = config_lib.auto_config()
    return override(config, {
        "data.root": str(data), "model.base_features": 4, "train.batch_size": 8,
        "train.steps_per_epoch": 2, "train.log_every_steps": 1, "eval.batch_size": 8,
        "eval.tta": False, "eval.figures": False, "choose.budget_minutes": BUDGET,
        "train.compilation_cache_dir": os.environ["JAX_COMPILATION_CACHE_DIR"],
        **overrides})


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    """Four synthetic MRI cases and a workdir where the command ran once."""
    from medseg_jax.data import synthetic

    base = tmp_path_factory.mktemp("choose")
    roots = synthetic.make_synthetic(str(base / "data"), seed=0, num_cases=4, size=16,
                                     depth=4)
    data = Path(next(r for r in roots if r.endswith("SynthMRI")))
    workdir = base / "run"
    choice = choose.run(auto_config(data), str(workdir))
    return data, workdir, choice


def test_both_configurations_train_on_one_split_with_a_share_of_the_budget(chosen):
    _, workdir, _ = chosen
    records = {}
    for name, dims in (("2d", 2), ("3d", 3)):
        folder = workdir / name
        for file in ("config.json", "plans.json", "splits.json", "preprocess.json"):
            assert (folder / file).is_file(), f"{name}/{file}"
        assert any((folder / "checkpoints").iterdir())
        records[name] = json.loads((folder / "config.json").read_text())
        assert records[name]["model"]["spatial_dims"] == dims
        assert records[name]["train"]["budget_minutes"] == pytest.approx(
            choose.TRAIN_SHARE * BUDGET / 2)
        assert records[name]["model"]["base_features"] == 4  # the override, in both
    assert (json.loads((workdir / "2d" / "splits.json").read_text())
            == json.loads((workdir / "3d" / "splits.json").read_text()))
    assert records["3d"]["paths"]["data.splits_file"] == os.path.realpath(
        workdir / "2d" / "splits.json")
    assert records["2d"]["data"]["splits_file"] == ""
    # each configuration's own recipe: 3D's sliding-window batch, 3D augmentation ranges
    assert records["3d"]["augment"] != records["2d"]["augment"]


def test_choice_json_holds_every_score_and_the_best_by_the_rule(chosen):
    _, workdir, returned = chosen
    choice = json.loads((workdir / "choice.json").read_text())
    assert choice == returned
    assert list(choice["validation"]) == ["2d", "3d", "ensemble"]
    for name, row in choice["validation"].items():
        assert list(row["dice"]) == ["lesion"]
        assert row["mean_dice"] == pytest.approx(row["dice"]["lesion"])
        metrics = json.loads((workdir / row["metrics"]).read_text())
        assert metrics["split"] == "val"
        assert metrics["aggregate"]["all"]["lesion"]["dice"]["mean"] == pytest.approx(
            row["dice"]["lesion"])
    assert choice["validation"]["ensemble"]["members"] == ["3d", "2d"]
    assert choice["validation"]["ensemble"]["metrics"] == "3d/val_ensemble_2d_metrics.json"
    assert choice["chosen"] == choose.pick(choice["validation"])
    best = max(r["mean_dice"] for r in choice["validation"].values())
    assert choice["validation"][choice["chosen"]]["mean_dice"] == best
    assert choice["folders"] == {"2d": "2d", "3d": "3d"}
    assert choice["members"] == choice["validation"][choice["chosen"]]["members"]
    assert choice["date"].endswith("+00:00") and "T" in choice["date"]
    test = json.loads((workdir / choice["test"]["metrics"]).read_text())
    assert test["split"] == "test"
    assert choice["test"]["mean_dice"] == pytest.approx(
        test["aggregate"]["all"]["lesion"]["dice"]["mean"])


@pytest.mark.parametrize("means, expected", [
    ({"2d": 0.5, "3d": 0.7, "ensemble": 0.6}, "3d"),
    ({"2d": 0.7, "3d": 0.7, "ensemble": 0.7}, "2d"),  # a tie: the cheaper single
    ({"2d": 0.5, "3d": 0.6, "ensemble": 0.6}, "3d"),  # the ensemble loses its ties
    ({"2d": 0.5, "3d": 0.6, "ensemble": 0.61}, "ensemble"),
    ({"2d": math.nan, "3d": 0.1, "ensemble": math.nan}, "3d"),  # nan never wins
])
def test_the_rule(means, expected):
    assert choose.pick({n: {"mean_dice": v} for n, v in means.items()}) == expected


def test_a_forced_ensemble_is_used_by_eval_and_predict_and_a_rerun_trains_nothing(
        chosen, tmp_path, monkeypatch):
    data, workdir, _ = chosen
    trained = snapshot(*(workdir / n / "checkpoints" for n in ("2d", "3d")))
    logs = {n: (workdir / n / "metrics.jsonl").read_bytes() for n in ("2d", "3d")}
    scores = choose._scores  # noqa: SLF001

    def ensemble_wins(results, path):
        row = scores(results, path)
        return dict(row, mean_dice=0.9 if "ensemble" in path else 0.1)

    monkeypatch.setattr(choose, "_scores", ensemble_wins)
    choice = choose.run(auto_config(data), str(workdir))
    assert choice["chosen"] == "ensemble" and choice["members"] == ["3d", "2d"]
    assert choice["test"]["metrics"] == "3d/test_ensemble_2d_metrics.json"
    assert (workdir / "3d" / "test_ensemble_2d_metrics.json").is_file()
    # nothing trained again: the same checkpoints, no new epoch logged
    assert snapshot(*(workdir / n / "checkpoints" for n in ("2d", "3d"))) == trained
    assert {n: (workdir / n / "metrics.jsonl").read_bytes() for n in ("2d", "3d")} == logs
    monkeypatch.undo()

    results = choose.evaluate_choice(auto_config(data, **{"eval.split": "val"}),
                                     str(workdir))
    assert results["split"] == "val"
    assert [m["workdir"] for m in results["ensemble"]] == [str(workdir / "2d")]
    # the command's settings apply (here: none of data.root's; the runs' recorded one)
    cases = data / "imagesTr"
    summary = choose.predict_choice(config_lib.auto_config(), str(workdir), str(cases),
                                    str(tmp_path / "out"))
    assert summary["ensemble"] == [str(workdir / "2d")]
    assert len(summary["written"]) == len(list(cases.iterdir()))
    with pytest.raises(ValueError, match=r"--output .*: is the workdir of the choice; give "
                       "another --output"):
        choose.predict_choice(config_lib.auto_config(), str(workdir), str(cases), str(workdir))


def test_a_single_choice_is_evaluated_alone(chosen, tmp_path):
    data, workdir, _ = chosen
    work = tmp_path / "run"
    work.mkdir()
    os.symlink(workdir / "2d", work / "2d")
    (work / "choice.json").write_text(json.dumps(
        {"chosen": "2d", "members": ["2d"], "folders": {"2d": "2d", "3d": "3d"}}))
    results = choose.evaluate_choice(auto_config(data), str(work))
    assert results["split"] == "test" and "ensemble" not in results
    assert results["model"] == "unet"


@pytest.mark.parametrize("overrides, message", [
    ({"choose.configurations": "2d,4d"}, "config.choose.configurations: unknown "
     "configuration '4d' in '2d,4d'; valid: 2d, 3d"),
    ({"choose.configurations": " , "}, "config.choose.configurations: empty"),
    ({"choose.configurations": "3d,3d"}, "listed twice"),
    ({"model.spatial_dims": 3}, "config.model.spatial_dims: set per configuration"),
    ({"train.budget_minutes": 5.0}, "config.train.budget_minutes: set per configuration"),
    ({"eval.ensemble": "runs/x"}, "config.eval.ensemble: the choice says"),
    ({"eval.postprocess": "choose"}, "config.eval.postprocess='choose': a post-processing"),
    ({"data.root": ""}, "config.data.root: empty; name the data set folder"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=None) as e:
        choose.run(auto_config(tmp_path / "data", **overrides), str(workdir))
    assert message in str(e.value)
    assert not workdir.exists()


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_a_budget_that_is_not_positive_is_refused(value):
    config = config_lib.auto_config()
    config.choose.budget_minutes = value
    with pytest.raises(ValueError, match=r"config.choose.budget_minutes: must be > 0, got"):
        config_lib.check_numbers(config)


def test_eval_and_predict_without_a_choice_say_to_train_first(tmp_path):
    tmp_path.joinpath("run").mkdir()
    before = snapshot(tmp_path)
    for call in (lambda: choose.evaluate_choice(config_lib.auto_config(), str(tmp_path / "run")),
                 lambda: choose.predict_choice(config_lib.auto_config(), str(tmp_path / "run"),
                                               str(tmp_path), str(tmp_path / "out"))):
        with pytest.raises(FileNotFoundError, match="choice.json: not found .*train first"):
            call()
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_the_metrics_file_is_named_as_evaluation_names_it(tmp_path):
    folders = {"2d": str(tmp_path / "2d"), "3d": str(tmp_path / "3d")}
    (tmp_path / "3d").mkdir()
    name = "val_step4_whole_ensemble_2d_largest_metrics.json"
    (tmp_path / "3d" / name).write_text("{}")
    results = {"checkpoint": "4", "split": "val", "step": 4, "sw_window": "whole",
               "postprocess": "largest", "applied": "largest"}
    assert choose._metrics_path(results, folders, ["3d", "2d"], str(tmp_path)) == (  # noqa: SLF001
        f"3d/{name}")
    results = dict(results, checkpoint="latest", postprocess="auto (none)", applied="")
    assert choose._metrics_path(results, folders, ["3d", "2d"], str(tmp_path)) == ""  # noqa: SLF001
