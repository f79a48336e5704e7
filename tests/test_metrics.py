"""Tests for medseg_jax.metrics."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg_jax import metrics


def _blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 2.0) -> np.ndarray:
    """Random smooth blob mask (may touch the image border)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, rng.uniform(0.6, 0.9))


def _brute_force_distances(a, b, spacing):
    """Directed surface distances by explicit pairwise search."""
    pa = np.argwhere(metrics.surface(a)) * np.asarray(spacing)
    pb = np.argwhere(metrics.surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


# ---- overlap ------------------------------------------------------------- #


def test_dice_iou_hand_computed():
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    gt = np.array([[0, 1, 1, 0], [0, 1, 1, 0]])
    # |A|=4, |B|=4, |A&B|=2, |A|B|=6
    assert metrics.dice(pred, gt) == pytest.approx(0.5)
    assert metrics.iou(pred, gt) == pytest.approx(2 / 6)
    assert metrics.dice(pred, pred) == 1.0
    assert metrics.iou(pred.astype(bool), pred) == 1.0


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        metrics.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff(np.ones((4, 4)), np.ones((4, 4)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate_case(np.zeros((3, 3)), np.zeros((3, 4)), None, {1: "a"})


# ---- surface ------------------------------------------------------------- #


def test_surface_cross_erosion_and_border():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    surf = metrics.surface(mask)
    expected = mask.copy()
    expected[2:5, 2:5] = False
    np.testing.assert_array_equal(surf, expected)
    # Border counts as background: a full image is all surface on its rim.
    full = metrics.surface(np.ones((4, 4), bool))
    ring = np.ones((4, 4), bool)
    ring[1:3, 1:3] = False
    np.testing.assert_array_equal(full, ring)


# ---- Hausdorff / ASSD ---------------------------------------------------- #


def test_hausdorff_points_anisotropic():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0, 0] = True
    b[3, 4] = True
    assert metrics.hausdorff(a, b) == pytest.approx(5.0)
    expected = math.hypot(3 * 2.0, 4 * 1.0)
    assert metrics.hausdorff(a, b, spacing=(2.0, 1.0)) == pytest.approx(expected)
    assert metrics.hausdorff(a, b, spacing=(2.0, 1.0), percentile=95) == pytest.approx(expected)
    assert metrics.average_surface_distance(a, b, (2.0, 1.0)) == pytest.approx(expected)


def test_hausdorff_shifted_square_and_cube():
    a = np.zeros((16, 16), bool)
    a[2:9, 2:9] = True
    b = np.roll(a, 3, axis=1)
    assert metrics.hausdorff(a, b) == pytest.approx(3.0)
    assert metrics.hausdorff(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)
    c = np.zeros((12, 12, 12), bool)
    c[2:7, 2:7, 2:7] = True
    assert metrics.hausdorff(c, np.roll(c, 2, axis=0)) == pytest.approx(2.0)


def test_hd95_differs_from_max():
    gt = np.zeros((40, 40), bool)
    gt[5:20, 5:20] = True  # 56 surface voxels
    pred = gt.copy()
    pred[35, 35] = True  # one far outlier voxel
    outlier = math.hypot(35 - 19, 35 - 19)
    assert metrics.hausdorff(pred, gt) == pytest.approx(outlier)
    # d(pred->gt) is 56 zeros and one outlier: its 95th percentile is 0.
    assert metrics.hausdorff(pred, gt, percentile=95) == pytest.approx(0.0)
    assert metrics.average_surface_distance(pred, gt) == pytest.approx(outlier / (57 + 56))


def test_against_brute_force():
    rng = np.random.default_rng(0)
    for shape, spacing in [((24, 30), (1.5, 0.7)), ((14, 16, 12), (1.0, 1.0, 2.5))]:
        a, b = _blob(rng, shape), _blob(rng, shape)
        d_ab, d_ba = _brute_force_distances(a, b, spacing)
        hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
        assert metrics.hausdorff(a, b, spacing) == pytest.approx(max(d_ab.max(), d_ba.max()))
        assert metrics.hausdorff(a, b, spacing, percentile=95) == pytest.approx(hd95)
        assert metrics.average_surface_distance(a, b, spacing) == pytest.approx(
            np.concatenate([d_ab, d_ba]).mean()
        )


@pytest.mark.parametrize(
    "shape,spacing",
    [((48, 40), (1.0, 1.0)), ((48, 40), (0.8, 2.0)), ((20, 24, 18), (1.0, 1.0, 1.5))],
)
def test_bbox_equals_full_volume(shape, spacing):
    rng = np.random.default_rng(len(shape) * 7 + int(spacing[-1] * 10))
    for i in range(6):
        sigma = 1.5 if i % 2 else 3.0
        a, b = _blob(rng, shape, sigma), _blob(rng, shape, sigma)
        if i == 0:  # small blobs well inside the volume: the crop is much smaller
            a = np.zeros(shape, bool)
            b = np.zeros(shape, bool)
            a[(slice(5, 9),) * len(shape)] = True
            b[(slice(6, 12),) * len(shape)] = True
        crop = metrics.surface_distances(a, b, spacing, crop=True)
        full = metrics.surface_distances(a, b, spacing, crop=False)
        for c, f in zip(crop, full):
            np.testing.assert_array_equal(c, f)
        for p in (100, 95):
            assert metrics.hausdorff(a, b, spacing, p) == metrics.hausdorff(
                a, b, spacing, p, crop=False
            )


def test_empty_conventions():
    empty = np.zeros((8, 8), bool)
    some = empty.copy()
    some[2:4, 2:4] = True
    # Both empty: the class is absent, nothing to score (MONAI / DeepMind / nnU-Net).
    for fn in (metrics.dice, metrics.iou, metrics.hausdorff, metrics.average_surface_distance,
               metrics.normalized_surface_dice):
        assert math.isnan(fn(empty, empty))
    both = metrics.binary_metrics(empty, empty)
    assert all(math.isnan(v) for k, v in both.items() if k != "vol_diff_ml")
    for pred, gt in [(some, empty), (empty, some)]:
        assert metrics.dice(pred, gt) == 0.0
        assert metrics.iou(pred, gt) == 0.0
        assert metrics.normalized_surface_dice(pred, gt) == 0.0
        assert math.isnan(metrics.hausdorff(pred, gt))
        assert math.isnan(metrics.hausdorff(pred, gt, percentile=95))
        assert math.isnan(metrics.average_surface_distance(pred, gt))
    false_positive = metrics.binary_metrics(some, empty)
    assert false_positive["precision"] == 0.0 and math.isnan(false_positive["recall"])
    missed = metrics.binary_metrics(empty, some)
    assert missed["recall"] == 0.0 and math.isnan(missed["precision"])


def _shifted_squares():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    pred = np.zeros_like(gt)
    pred[3:7, 2:6] = True  # one row down
    return pred, gt


def test_nsd_hand_computed():
    # Each 12-voxel square outline: 6 voxels lie on the other outline (distance 0);
    # 4 (the far row) are one step along axis 0 from it, 2 (inner voxels of the
    # near row) one step along either axis.
    pred, gt = _shifted_squares()
    assert metrics.normalized_surface_dice(pred, gt, (1.0, 1.0), tolerance=0.5) == 0.5
    assert metrics.normalized_surface_dice(pred, gt, (1.0, 1.0), tolerance=1.0) == 1.0
    # Axis 0 at 2 mm: the far rows are 2 mm away, the inner near-row voxels 1 mm.
    assert metrics.normalized_surface_dice(pred, gt, (2.0, 1.0), tolerance=1.0) == 8 / 12
    assert metrics.normalized_surface_dice(pred, gt, (2.0, 1.0), tolerance=2.0) == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        metrics.normalized_surface_dice(pred, gt, tolerance=-1)


def test_nsd_against_brute_force():
    rng = np.random.default_rng(11)
    spacing = (1.5, 0.7, 2.0)
    for _ in range(3):
        a, b = _blob(rng, (12, 14, 10)), _blob(rng, (12, 14, 10))
        d_ab, d_ba = _brute_force_distances(a, b, spacing)
        for tol in (0.5, 1.0, 2.5):
            expected = (np.sum(d_ab <= tol) + np.sum(d_ba <= tol)) / (d_ab.size + d_ba.size)
            assert metrics.normalized_surface_dice(a, b, spacing, tol) == pytest.approx(expected)
            assert metrics.binary_metrics(a, b, spacing, tol)["nsd"] == pytest.approx(expected)


def test_precision_recall_volume_hand_computed():
    pred, gt = _shifted_squares()  # 12 of 16 voxels shared
    m = metrics.binary_metrics(pred, gt, (1.0, 1.0))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (0.75, 12 / 20, 0.75, 0.75)
    assert math.isnan(m["vol_diff_ml"])  # 2D: no volume
    gt3 = np.zeros((6, 6, 6), bool)
    gt3[2:3, 2:4, 2:4] = True  # 4 voxels
    pred3 = np.zeros_like(gt3)
    pred3[2:4, 2:4, 2:4] = True  # 8 voxels, all 4 of gt inside
    m3 = metrics.binary_metrics(pred3, gt3, (2.0, 1.0, 0.5))  # 1 mm^3 voxels
    assert m3["precision"] == 0.5 and m3["recall"] == 1.0
    assert m3["vol_diff_ml"] == pytest.approx(4 / 1000)
    m3 = metrics.binary_metrics(gt3, pred3, (4.0, 5.0, 5.0))  # 100 mm^3 voxels
    assert m3["vol_diff_ml"] == pytest.approx(-0.4)
    assert tuple(m3) == metrics.METRIC_NAMES


# ---- evaluate_case / aggregate ------------------------------------------- #


def test_evaluate_case_and_aggregate():
    gt = np.zeros((10, 10), np.int32)
    gt[1:4, 1:4] = 1
    gt[6:9, 6:9] = 2
    labels = {0: "background", 1: "liver", 2: "tumour"}
    perfect = metrics.evaluate_case(gt, gt, (1.0, 1.0), labels)
    assert set(perfect) == {"liver", "tumour"}
    liver = perfect["liver"]
    assert {k: liver[k] for k in ("dice", "iou", "hd", "hd95", "assd", "nsd")} == {
        "dice": 1.0, "iou": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}

    missed = gt.copy()
    missed[missed == 2] = 0  # tumour missed: dice 0, distances nan
    case2 = metrics.evaluate_case(missed, gt, (1.0, 1.0), labels)
    assert case2["tumour"]["dice"] == 0.0
    assert math.isnan(case2["tumour"]["hd95"])

    agg = metrics.aggregate([perfect, case2])
    dice = agg["liver"]["dice"]
    assert {k: dice[k] for k in ("mean", "std", "median", "n", "n_nan")} == {
        "mean": 1.0, "std": 0.0, "median": 1.0, "n": 2, "n_nan": 0}
    assert dice["ci_low"] == dice["ci_high"] == 1.0
    assert agg["tumour"]["dice"]["mean"] == pytest.approx(0.5)
    assert agg["tumour"]["dice"]["std"] == pytest.approx(0.5)
    assert agg["tumour"]["dice"]["ci_low"] == 0.0 and agg["tumour"]["dice"]["ci_high"] == 1.0
    hd = agg["tumour"]["hd"]
    assert (hd["mean"], hd["n"], hd["n_nan"]) == (0.0, 1, 1)
    assert math.isnan(hd["ci_low"])  # one finite value: no interval
    only_nan = metrics.aggregate([case2])["tumour"]["assd"]
    assert only_nan["n"] == 0 and only_nan["n_nan"] == 1 and math.isnan(only_nan["mean"])


# ---- JAX dice counts ----------------------------------------------------- #


def test_dice_counts_matches_numpy():
    rng = np.random.default_rng(3)
    k = 4
    pred = rng.integers(0, k, size=(3, 6, 7))
    gt = rng.integers(0, k, size=(3, 6, 7))
    pred[pred == 3] = 0
    gt[gt == 3] = 0  # class 3 absent everywhere -> dice nan, as the numpy one
    counts = metrics.dice_counts(jnp.asarray(pred), jnp.asarray(gt), k)
    assert all(c.shape == (k,) and c.dtype == jnp.float32 for c in counts)
    got = metrics.dice_from_counts(*[np.asarray(c) for c in counts])
    expected = [metrics.dice(pred == c, gt == c) for c in range(k)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # nan == nan here
    assert math.isnan(got[3])

    # Padding: the mask drops sample 2, and counts sum over batches.
    mask = jnp.array([1.0, 1.0, 0.0])
    masked = metrics.dice_counts(jnp.asarray(pred), jnp.asarray(gt), k, mask)
    first = metrics.dice_counts(jnp.asarray(pred[:2]), jnp.asarray(gt[:2]), k)
    for m, f in zip(masked, first):
        np.testing.assert_allclose(np.asarray(m), np.asarray(f))
    expected = [metrics.dice(pred[:2] == c, gt[:2] == c) for c in range(k)]
    np.testing.assert_allclose(metrics.dice_from_counts(*masked), expected, rtol=1e-6)
