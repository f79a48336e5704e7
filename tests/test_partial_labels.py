"""Partial labels: an organ not contoured in a case is unknown, not absent."""

import json
import os

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medseg_jax import losses, metrics, report
from medseg_jax.data import decathlon


def _logits(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def test_marginal_cross_entropy_by_hand():
    # One sample, two voxels, classes (background, organ A, organ B).
    probs = [[[0.1, 0.1, 0.8], [0.2, 0.7, 0.1]]]  # (B=1, 2 voxels, K=3)
    logits = _logits(probs)
    labels = jnp.array([[0, 1]])
    annotated_a_only = jnp.array([[1.0, 1.0, 0.0]])
    ce = float(losses.marginal_cross_entropy(logits, labels, annotated_a_only))
    # voxel 0 (background): p(bg) + p(B) = 0.9 (B is unknown, merged); voxel 1: p(A) = 0.7
    np.testing.assert_allclose(ce, -(np.log(0.9) + np.log(0.7)) / 2, rtol=1e-5)
    # Everything annotated: the plain cross-entropy.
    full = jnp.ones((1, 3))
    np.testing.assert_allclose(losses.marginal_cross_entropy(logits, labels, full),
                               losses.cross_entropy(logits, labels), rtol=1e-6)


def test_an_unannotated_organ_predicted_costs_nothing_an_annotated_one_missed_costs():
    # Four background voxels, predicted as organ B, or as background; organ A is
    # annotated (and absent) in both, with the same small probability everywhere.
    as_b = _logits([[[0.001, 0.001, 0.998]] * 4])
    as_bg = _logits([[[0.998, 0.001, 0.001]] * 4])
    labels = jnp.zeros((1, 4), jnp.int32)
    unknown_b = jnp.array([[1.0, 1.0, 0.0]])
    known_b = jnp.ones((1, 3))

    def loss(logits, annotated):
        return float(losses.partial_dice_ce_loss(logits, labels, 3, annotated))

    # B not contoured: predicting it where the map says 0 costs exactly what background does.
    np.testing.assert_allclose(loss(as_b, unknown_b), loss(as_bg, unknown_b), rtol=1e-6)
    # B contoured (so truly absent): the same prediction is a false positive.
    assert loss(as_b, known_b) > loss(as_bg, known_b) + 3.0
    # Organ A annotated and present, predicted as background: costs.
    labels_a = jnp.ones((1, 4), jnp.int32)
    missed = float(losses.partial_dice_ce_loss(as_bg, labels_a, 3, unknown_b))
    found = float(losses.partial_dice_ce_loss(_logits([[[0.001, 0.998, 0.001]] * 4]),
                                              labels_a, 3, unknown_b))
    assert missed > found + 3.0


def test_partial_dice_counts_a_class_only_where_annotated():
    logits = _logits([[[0.1, 0.1, 0.8]] * 2, [[0.1, 0.8, 0.1]] * 2])  # B=2, 2 voxels
    labels = jnp.array([[0, 0], [1, 1]])
    annotated = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # Class 2 predicted in sample 0 where it is unknown: not counted; class 2 annotated
    # in sample 1, where it is neither present nor predicted much.
    counts = metrics.dice_counts(jnp.argmax(logits, -1), labels, 3, annotated=annotated)
    inter, pred, gt = (np.asarray(c) for c in counts)
    assert pred[2] == 0 and gt[1] == 2 and inter[1] == 2
    full = metrics.dice_counts(jnp.argmax(logits, -1), labels, 3)
    assert np.asarray(full[1])[2] == 2


def test_metrics_skip_unannotated_classes_and_count_them():
    pred = np.zeros((6, 6), np.uint8)
    pred[1:3, 1:3] = 1
    pred[3:5, 3:5] = 2  # organ 2 predicted; not annotated in this case
    gt = np.zeros((6, 6), np.uint8)
    gt[1:3, 1:3] = 1
    labels = {0: "background", 1: "A", 2: "B"}
    case_partial = metrics.evaluate_case(pred, gt, (1.0, 1.0), labels, annotated=(1,))
    assert list(case_partial) == ["A"] and case_partial["A"]["dice"] == 1.0
    case_full = metrics.evaluate_case(pred, gt, (1.0, 1.0), labels)
    assert case_full["B"]["dice"] == 0.0  # scored as a false positive when annotated
    agg = metrics.aggregate([case_partial, case_full], bootstrap_samples=10)
    assert agg["B"]["dice"]["n"] == 1 and agg["B"]["dice"]["n_not_annotated"] == 1
    assert "n_not_annotated" not in agg["A"]["dice"]
    assert "(1 not annotated)" in report.stats_cell(agg["B"]["dice"], 3)
    csv_partial = report.summary_csv({"all": agg})
    assert csv_partial.splitlines()[0].endswith(",n_not_annotated")
    full_only = metrics.aggregate([case_full], bootstrap_samples=10)
    assert report.summary_csv({"all": full_only}).splitlines()[0] == ",".join(
        report.SUMMARY_HEADER)  # fully labelled data: the file as before


def _write(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_dataset_json_annotated_labels_are_read_and_checked(tmp_path):
    root = tmp_path / "task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in ("a", "b"):
        _write(str(root / "imagesTr" / f"{name}.nii.gz"), np.zeros((4, 4, 4), np.float32))
        _write(str(root / "labelsTr" / f"{name}.nii.gz"), np.zeros((4, 4, 4), np.uint8))
    meta = {"name": "T", "modality": {"0": "CT"}, "labels": {"0": "bg", "1": "A", "2": "B"},
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz",
                          "annotated_labels": [2]},
                         {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    info = decathlon.read_dataset(str(root))
    assert [c.annotated for c in info.cases] == [(2,), None] and info.partial
    meta["training"][0]["annotated_labels"] = [3]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'annotated_labels' \[3\] are not declared"):
        decathlon.read_dataset(str(root))
    meta["training"][0]["annotated_labels"] = "A"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json: 'training' entry 0"):
        decathlon.read_dataset(str(root))


@pytest.fixture(scope="module")
def partial_task(tmp_path_factory):
    """A tiny 3D task with two organs, organ 2 contoured in half of the cases only."""
    root = tmp_path_factory.mktemp("partial") / "Partial"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(8):
        image = rng.normal(size=(16, 16, 4)).astype(np.float32)
        label = np.zeros((16, 16, 4), np.uint8)
        label[3:7, 3:7] = 1
        label[9:13, 9:13] = 2
        image[label == 1] += 3
        image[label == 2] -= 3
        annotated = [1, 2] if i % 2 else [1]
        if 2 not in annotated:
            label[label == 2] = 0  # not contoured: 0 in the map, still in the image
        name = f"c{i}.nii.gz"
        _write(str(root / "imagesTr" / name), image)
        _write(str(root / "labelsTr" / name), label)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}",
                         "annotated_labels": annotated})
    meta = {"name": "Partial", "modality": {"0": "MRI"}, "tensorImageSize": "3D",
            "labels": {"0": "background", "1": "A", "2": "B"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return str(root)


def test_a_partially_labelled_run_trains_and_scores_annotated_classes_only(
        partial_task, tmp_path, make_tiny_config):
    from medseg_jax import train

    config = make_tiny_config(**{"data.root": partial_task, "train.num_epochs": 1,
                                 "data.split_fractions": (0.5, 0.25, 0.25)})
    results = train.train_and_evaluate(config, str(tmp_path))
    b = results["aggregate"]["all"]["B"]["dice"]
    n_test = len(results["per_case"])
    assert b["n"] + b["n_nan"] + b.get("n_not_annotated", 0) == n_test
    cases = {c["case"]: c["metrics"] for c in results["per_case"]}
    for key, scored in cases.items():
        index = int(key.split("/c")[1])
        assert ("B" in scored) == bool(index % 2), key  # B scored only where contoured
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        rows = [json.loads(r) for r in f]
    assert any("val_dice" in r for r in rows)


def test_train_step_gives_an_unannotated_class_no_signal_of_its_own(make_tiny_config):
    """The jitted train step on a network whose output is its input plus its parameters
    (zero), so the logits are the batch's image and the step's update is minus the
    gradient w.r.t. the logits. Sample 0 has organ B not annotated: the step cannot tell
    B from background there; its gradient moves the two only together, in proportion to
    their probabilities, and swapping the two channels of sample 0 swaps its gradient and
    leaves the loss as it was. Where B is annotated the same swap changes the loss."""
    import jax
    import optax

    from medseg_jax import sharding
    from medseg_jax import state as state_lib

    config = make_tiny_config(**{"augment.enabled": False})
    mesh = sharding.make_mesh(jax.devices()[:1])
    train_fn, _ = state_lib.jit_steps(config, mesh, 3)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    labels = np.zeros((2, 8, 8), np.int32)
    labels[:, 1:4, 1:4] = 1
    labels[1, 5:7, 5:7] = 2  # sample 0: B's voxels are 0 in its map, as not contoured
    partial = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    full = np.ones((2, 3), np.float32)

    def step(z, annotated):
        """(loss, gradient w.r.t. the logits ``z``) of one SGD step at learning rate 1."""
        state = state_lib.TrainState.create(
            apply_fn=lambda variables, x, **_: (x + variables["params"]["bias"],
                                                {"batch_stats": {}}),
            params={"bias": jnp.zeros(z.shape)}, tx=optax.sgd(1.0), batch_stats={})
        batch = {"image": z, "label": labels, "annotated": annotated}
        new, out = train_fn(state, sharding.to_global(batch, mesh))
        return float(out["loss"]), -np.asarray(new.params["bias"])

    def swap(z, sample):
        z = z.copy()
        z[sample] = z[sample][..., [2, 1, 0]]
        return z

    def apart(grad, sample):
        """Per voxel, the gradient along the direction that moves probability between B
        and background: grad_bg p_B - grad_B p_bg."""
        p = np.exp(logits[sample]) / np.exp(logits[sample]).sum(-1, keepdims=True)
        return grad[sample, ..., 0] * p[..., 2] - grad[sample, ..., 2] * p[..., 0]

    loss, grad = step(logits, partial)
    swapped_loss, swapped_grad = step(swap(logits, 0), partial)
    np.testing.assert_allclose(swapped_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(swapped_grad, swap(grad, 0), rtol=1e-5, atol=1e-9)
    _, full_grad = step(logits, full)
    assert np.abs(apart(full_grad, 0)).max() > 1e-4  # annotated: B and background apart
    assert np.abs(apart(grad, 0)).max() < 1e-4 * np.abs(apart(full_grad, 0)).max()
    assert np.abs(grad[0, ..., 2]).max() > 1e-4  # B still moves, with background
    assert abs(step(swap(logits, 1), partial)[0] - loss) > 1e-3  # sample 1: B annotated
    assert abs(step(swap(logits, 0), full)[0] - step(logits, full)[0]) > 1e-3
