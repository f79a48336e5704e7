"""Ensembles (eval.ensemble): the class probabilities of several runs averaged before the
argmax, in evaluation and prediction; the members' checks (state.restore_members)."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config

from medseg_jax import evaluate, inference, metrics, predict, train
from medseg_jax import state as state_lib


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny 2D U-Net and a tiny FCN on the same synthetic data and split."""
    base = tmp_path_factory.mktemp("ensemble")
    out = {}
    for name in ("unet", "fcn"):
        config = tiny_config(**{"model.name": name, "eval.figures": False})
        train.train(config, str(base / name))
        out[name] = (config, base / name)
    return out


def _ensemble(config, member, **more):
    config = tiny_config(**{"model.name": config.model.name, "eval.figures": False,
                            "eval.ensemble": str(member), **more})
    return config


def test_evaluation_averages_the_members_probabilities(runs):
    (config, unet), (_, fcn) = runs["unet"], runs["fcn"]
    alone = evaluate.evaluate(config, str(unet), split="val")
    results = evaluate.evaluate(_ensemble(config, fcn), str(unet), split="val")
    saved = json.loads((unet / "val_ensemble_fcn_metrics.json").read_text())
    assert saved["ensemble"][0]["model"] == "fcn" and "fcn" in saved["ensemble"][0]["workdir"]
    assert json.loads((unet / "val_metrics.json").read_text())["aggregate"] == \
        json.loads(json.dumps(alone["aggregate"]))  # the run's own files stay
    assert results["network_inputs"] == 2 * alone["network_inputs"]
    # By hand: each run's probabilities, their mean, the argmax, the metrics.
    restored = [state_lib.restore_run(c, str(w)) for c, w in (runs["unet"], runs["fcn"])]
    by_case = {c["case"]: c["metrics"] for c in results["per_case"]}
    differs = 0.0
    for key in restored[0].dataset.splits["val"]:
        case = restored[0].dataset.load(key)
        probs = [inference.predict_probs(case, r.plans, r.config, r.state, r.predict_fn,
                                         r.mesh)[0] for r in restored]
        pred = np.argmax((probs[0] + probs[1]) / 2, axis=-1).astype(np.uint8)
        expected = metrics.evaluate_case(pred, case.label, case.spacing, restored[0].labels,
                                         config.eval.nsd_tolerance_mm)
        assert json.loads(json.dumps(expected)) == json.loads(json.dumps(by_case[key]))
        differs = max(differs, float(np.max(np.abs(probs[0] - probs[1]))))
    assert differs > 1e-3  # two different networks: a real average


def test_prediction_writes_the_mean_probabilities(runs, tmp_path):
    (config, unet), (fcn_config, fcn) = runs["unet"], runs["fcn"]
    inputs = unet / "synthetic_data" / "SynthCT" / "imagesTr"
    probs = {}
    for name, cfg, workdir in (("unet", config, unet), ("fcn", fcn_config, fcn),
                               ("both", _ensemble(config, fcn), unet)):
        summary = predict.predict(cfg, str(workdir), str(inputs), str(tmp_path / name),
                                  task="SynthCT", save_probabilities=True)
        probs[name] = {os.path.basename(p): np.asarray(nib.load(
            p.replace(".nii.gz", "_probabilities.nii.gz")).dataobj) for p in summary["written"]}
    assert summary["ensemble"] == [str(fcn)]
    for case, p in probs["both"].items():
        np.testing.assert_allclose(p, (probs["unet"][case] + probs["fcn"][case]) / 2,
                                   atol=1e-6)
        labels = np.asarray(nib.load(tmp_path / "both" / case).dataobj)
        np.testing.assert_array_equal(labels, np.argmax(p, axis=-1))


def test_members_that_cannot_be_averaged_are_one_line_errors(runs, tmp_path):
    (config, unet), (_, fcn) = runs["unet"], runs["fcn"]
    cases = [(str(unet), "is the evaluated run itself"),
             (f"{fcn},{fcn}/", "listed twice"),
             (str(tmp_path / "none"), "config.json: not found")]
    other = tmp_path / "other_split"  # the FCN with its val and test cases swapped
    shutil.copytree(fcn, other)
    splits = json.loads((other / "splits.json").read_text())
    splits["val"], splits["test"] = splits["test"], splits["val"]
    (other / "splits.json").write_text(json.dumps(splits))
    cases.append((str(other), "other_split/splits.json: its val split is not"))
    for ensemble, expected in cases:
        with pytest.raises(ValueError, match="config.eval.ensemble") as error:
            evaluate.evaluate(_ensemble(config, ensemble), str(unet), split="val")
        assert expected in str(error.value) and "\n" not in str(error.value)
    for mode in ("choose", "auto"):
        with pytest.raises(ValueError, match=f"postprocess='{mode}' with config.eval.ensemble"):
            evaluate.evaluate(_ensemble(config, fcn, **{"eval.postprocess": mode}), str(unet),
                              split="val")
    assert not list(unet.glob("val_ensemble_other*"))
