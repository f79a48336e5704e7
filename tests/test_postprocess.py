"""Post-processing: the spec, the component filter, the per-class choice on validation
and the choice file (postprocess.py), through evaluation and prediction."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config

from medseg_jax import config as config_lib
from medseg_jax import evaluate, postprocess, predict, train

LABELS = {0: "background", 1: "Liver", 2: "Spleen", 3: "Kidney"}


def test_spec_parsing_and_errors():
    assert postprocess.parse("") is None
    assert postprocess.parse("largest") == ()
    assert postprocess.parse("largest:7, 1,7") == (1, 7)
    for bad, what in (("largest:0", "'0'"), ("largest:a", "'a'"), ("largest:", "''"),
                      ("biggest", "'biggest'")):
        with pytest.raises(ValueError, match="config.eval.postprocess") as e:
            postprocess.parse(bad)
        assert what in str(e.value)
    config = tiny_config(**{"eval.postprocess": "largest:x"})
    with pytest.raises(ValueError, match="config.eval.postprocess: 'largest:x'"):
        config_lib.validate(config)
    for ok in ("", "largest", "largest:1", "choose", "auto"):
        config_lib.validate(tiny_config(**{"eval.postprocess": ok}))


def test_largest_components_of_some_classes():
    labels = np.zeros((8, 8), np.uint8)
    labels[0:3, 0:3] = 1
    labels[6:8, 6:8] = 1  # class 1: a stray blob
    labels[0:2, 5:8] = 2
    labels[5, 0] = 2  # class 2: a stray voxel
    only_2 = postprocess.largest_components(labels, (2,))
    assert (only_2 == 1).sum() == 13 and (only_2 == 2).sum() == 6 and only_2[5, 0] == 0
    both = postprocess.apply(labels, "largest")
    assert (both == 1).sum() == 9 and (both == 2).sum() == 6
    np.testing.assert_array_equal(postprocess.apply(labels, ""), labels)


def _agg(**dice):
    return {name: {"dice": {"mean": d, "n": 5}, "hd95": {"mean": 10 * d, "n": 5}}
            for name, d in dice.items()}


def test_choice_keeps_only_classes_whose_mean_dice_rises():
    base = _agg(Liver=0.80, Spleen=0.70, Kidney=0.60)
    cand = _agg(Liver=0.82, Spleen=0.70, Kidney=0.59)  # up / tie / down
    choice = postprocess.choose(base, cand, LABELS)
    assert choice["largest"] == [1] and choice["spec"] == "largest:1"
    assert [row["largest"] for row in choice["classes"].values()] == [True, False, False]
    assert choice["classes"]["Kidney"]["dice_largest"] == pytest.approx(0.59)
    # A class with no Dice on the split (never annotated there) is never chosen.
    nan = _agg(Liver=float("nan"))
    assert postprocess.choose(nan, _agg(Liver=0.9), LABELS)["largest"] == []
    assert "| Liver | 5 | 0.8000 | 0.8200 |" in postprocess.choice_table(choice)


def test_auto_reads_the_choice_file_and_names_its_problems(tmp_path):
    path = tmp_path / postprocess.CHOICE_FILE
    with pytest.raises(ValueError, match=f"{path}: missing .*postprocess=choose"):
        postprocess.resolve("auto", str(tmp_path), LABELS)
    with pytest.raises(ValueError, match=f"{path}: missing"):
        postprocess.require_choice("auto", str(tmp_path))
    postprocess.require_choice("", str(tmp_path))  # nothing to check
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        postprocess.resolve("auto", str(tmp_path), LABELS)
    path.write_text(json.dumps({"largest": [1]}))
    for call in (lambda: postprocess.resolve("auto", str(tmp_path), LABELS),
                 lambda: postprocess.require_choice("auto", str(tmp_path))):
        with pytest.raises(ValueError, match=f"{path}: not a post-processing choice"):
            call()
    choice = postprocess.choose(_agg(Liver=0.8, Spleen=0.7), _agg(Liver=0.9, Spleen=0.8),
                                LABELS)
    postprocess.write_choice(str(tmp_path), dict(choice, checkpoint="best", step=40))
    assert postprocess.resolve("auto", str(tmp_path), LABELS, "best", 40) == "largest:1,2"
    with pytest.raises(ValueError, match="step 40, but the best checkpoint is step 60"):
        postprocess.resolve("auto", str(tmp_path), LABELS, "best", 60)
    with pytest.raises(ValueError, match="class 2 is 'Spleen' there but 'Pancreas'"):
        postprocess.resolve("auto", str(tmp_path), {**LABELS, 2: "Pancreas"})
    with pytest.raises(ValueError, match="class 2 is 'Spleen' there but no such class"):
        postprocess.resolve("auto", str(tmp_path), {0: "background", 1: "Liver"})
    # Another checkpoint has its own file: the best one's choice is not used for it.
    with pytest.raises(ValueError, match="postprocessing_step20.json: missing"):
        postprocess.resolve("auto", str(tmp_path), LABELS, "20", 20)
    with pytest.raises(ValueError, match="no class with label value 9"):
        postprocess.resolve("largest:9", str(tmp_path), LABELS)
    assert postprocess.resolve("largest:3, 1,3", str(tmp_path), LABELS) == "largest:1,3"
    assert postprocess.suffix("largest:1,3") == "_largest1-3"
    assert postprocess.suffix("largest") == "_largest" and postprocess.suffix("") == ""
    with pytest.raises(ValueError, match="'choose' is made by an evaluation"):
        postprocess.resolve("choose", str(tmp_path), LABELS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2D U-Net; 'choose' at training time: chosen on val, applied to test."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(**{"eval.figures": False, "eval.postprocess": "choose"})
    results = train.train_and_evaluate(config, str(workdir))
    return config, workdir, results


def _per_case(workdir, prefix):
    with open(os.path.join(workdir, f"{prefix}_metrics.json")) as f:
        return {c["case"]: c["metrics"] for c in json.load(f)["per_case"]}


def test_choose_on_val_then_auto_on_test(trained):
    config, workdir, results = trained
    choice = json.loads((workdir / postprocess.CHOICE_FILE).read_text())
    assert choice["split"] == "val" and choice["checkpoint"] == "best"
    assert results["split"] == "test" and results["postprocess"].startswith("auto")
    assert results["applied"] == choice["spec"]
    for prefix in ("val", "val_largest", "val_auto", "test_auto"):
        assert (workdir / f"{prefix}_metrics.json").exists(), prefix
    assert not (workdir / "test_metrics.json").exists()  # the test split saw no choice
    none, largest, auto = (_per_case(workdir, p) for p in ("val", "val_largest", "val_auto"))
    assert none != largest  # the tiny network's maps have stray islands: a real choice
    with open(workdir / "val_largest_metrics.json") as f:
        assert json.load(f)["applied"] == "largest"
    # The auto files are what applying the choice gives: evaluate val with it.
    chosen = {name for name, row in choice["classes"].items() if row["largest"]}
    os.rename(workdir / "val_auto_metrics.json", workdir / "chosen.json")
    evaluate.evaluate(tiny_config(**{"eval.figures": False, "eval.postprocess": "auto"}),
                      str(workdir), split="val")
    assert _per_case(workdir, "val_auto") == auto
    for case, classes in auto.items():
        for name, values in classes.items():
            assert values == (largest if name in chosen else none)[case][name]


def test_choose_scores_match_a_separate_largest_evaluation(trained):
    """The shortcut (classes the filter does not change keep their metrics) gives what
    an evaluation with eval.postprocess=largest gives."""
    config, workdir, _ = trained
    from_choose = _per_case(workdir, "val_largest")
    config = tiny_config(**{"eval.figures": False, "eval.postprocess": "largest"})
    evaluate.evaluate(config, str(workdir), split="val")
    assert _per_case(workdir, "val_largest") == from_choose


def test_predict_applies_the_choice(trained, tmp_path):
    config, workdir, _ = trained
    inputs = workdir / "synthetic_data" / "SynthMRI" / "imagesTr"
    spec = json.loads((workdir / postprocess.CHOICE_FILE).read_text())["spec"]
    plain = tiny_config(**{"eval.figures": False})
    predict.predict(plain, str(workdir), str(inputs), str(tmp_path / "plain"), task="SynthMRI")
    auto = tiny_config(**{"eval.figures": False, "eval.postprocess": "auto"})
    summary = predict.predict(auto, str(workdir), str(inputs), str(tmp_path / "out"),
                              task="SynthMRI")
    assert summary["postprocess"] == spec
    changed = 0
    for name in os.listdir(inputs):
        before = np.asarray(nib.load(tmp_path / "plain" / name).dataobj)
        after = np.asarray(nib.load(tmp_path / "out" / name).dataobj)
        np.testing.assert_array_equal(after, postprocess.apply(before, spec))
        changed += int((after != before).any())
    assert changed or not spec
    (workdir / postprocess.CHOICE_FILE).rename(workdir / "moved.json")
    try:
        with pytest.raises(ValueError, match="postprocessing.json: missing"):
            predict.predict(auto, str(workdir), str(inputs), str(tmp_path / "o2"),
                            task="SynthMRI")
        with pytest.raises(ValueError, match="postprocessing.json: missing"):
            train.train_and_evaluate(auto, str(workdir))
    finally:
        (workdir / "moved.json").rename(workdir / postprocess.CHOICE_FILE)


def test_choose_never_uses_the_test_split(trained, monkeypatch):
    """eval.split=test with 'choose': the choice is made on val, then test is scored with
    it; the test split is never evaluated in the choosing pass."""
    config, workdir, _ = trained
    (workdir / postprocess.CHOICE_FILE).unlink()
    calls = []
    real = evaluate._evaluate

    def spy(run, split, spec, label, suffix, choose=False):
        calls.append((split, choose, spec))
        return real(run, split, spec, label, suffix, choose)

    monkeypatch.setattr(evaluate, "_evaluate", spy)
    choose = tiny_config(**{"eval.figures": False, "eval.postprocess": "choose"})
    results = evaluate.evaluate(choose, str(workdir), split="test")
    spec = json.loads((workdir / postprocess.CHOICE_FILE).read_text())["spec"]
    assert calls == [("val", True, ""), ("test", False, spec)]
    assert results["split"] == "test" and results["applied"] == spec


def test_another_checkpoint_gets_its_own_choice_file(trained):
    config, workdir, _ = trained
    before = (workdir / postprocess.CHOICE_FILE).read_text()
    latest = tiny_config(**{"eval.figures": False, "eval.postprocess": "choose",
                            "eval.checkpoint": "latest"})
    evaluate.evaluate(latest, str(workdir), split="val")
    assert (workdir / postprocess.CHOICE_FILE).read_text() == before
    assert list(workdir.glob("postprocessing_step*.json"))
