"""Tests for medseg_jax.plan: fingerprints and plans of data sets with known geometry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medseg_jax import planning as P


def _fp(spacings, shapes, modalities=("MRI",), labels=None, name=""):
    cases = [P.case_record(sp, sh, modalities=modalities) for sp, sh in zip(spacings, shapes)]
    if labels is not None:
        for c in cases:
            c["class_voxels"] = dict(labels)
    return P.fingerprint(cases, name=name)


def _same(n, spacing, shape, **kw):
    return _fp([spacing] * n, [shape] * n, **kw)


def hippocampus_like():
    rng = np.random.default_rng(0)
    shapes = [(36 + d, 50 + e, 35 + f) for d, e, f in rng.integers(-4, 5, size=(200, 3))]
    return _fp([(1.0, 1.0, 1.0)] * 200, shapes, labels={0: 97, 1: 2, 2: 1})


def prostate_like():  # 0.8 x 0.8 mm in plane, 3 mm slices (2.5 to 4 mm over cases)
    z = np.linspace(2.5, 4.0, 30)
    z[len(z) // 2] = 3.0
    return _fp([(0.8, 0.8, s) for s in z], [(256, 256, 40)] * 30)


def openkbp_like():
    return _same(170, (3.9, 3.9, 2.5), (128, 128, 128), modalities=("CT",),
                 labels={0: 90, 1: 5, 2: 5}, name="OpenKBP")


def hc18_like():
    return _same(316, (0.13, 0.13), (800, 540), modalities=("US",), labels={0: 70, 1: 30})


def _all_plans():
    return {
        "hippocampus_3d": P.plan_3d(hippocampus_like()),
        "hippocampus_2d": P.plan_2d(hippocampus_like()),
        "prostate_3d": P.plan_3d(prostate_like()),
        "prostate_2d": P.plan_2d(prostate_like()),
        "openkbp_3d": P.plan_3d(openkbp_like()),
        "openkbp_small_budget": P.plan_3d(openkbp_like(), {"feature_voxels": 1e8}),
        "hc18_2d": P.plan_2d(hc18_like()),
        "hc18_small_budget": P.plan_2d(hc18_like(), {"feature_voxels": 5e7}),
    }


PLANS = _all_plans()


def _first_pool(plan, axis):
    return next((i for i, p in enumerate(plan["pool_sizes"]) if p[axis] == 2), None)


# ---------------------------------------------------------------------------- fingerprint


def test_case_record_and_fingerprint():
    label = np.zeros((4, 5, 6))
    label[0, :2, :3] = 1
    label[1, 0, 0] = 2
    image = np.arange(120, dtype=float).reshape(4, 5, 6)
    rec = P.case_record((1, 1, 2), (4, 5, 6), label=label, modalities=("CT",), image=image,
                        num_samples=100)
    assert rec["class_voxels"] == {0: 113, 1: 6, 2: 1}
    fg = set(image[label > 0].tolist())
    assert len(rec["foreground_intensity"][0]) == 100 and set(rec["foreground_intensity"][0]) <= fg
    other = P.case_record((1, 1, 4), (4, 5, 12), modalities=("CT",))
    fp = P.fingerprint([rec, other], name="toy")
    assert fp["dims"] == 3 and fp["num_cases"] == 2 and fp["modalities"] == ["CT"]
    assert fp["median_spacing"] == [1.0, 1.0, 3.0] and fp["median_shape"] == [4.0, 5.0, 9.0]
    assert fp["spacing_percentiles"]["p10"][2] == pytest.approx(2.2)
    assert fp["num_voxels"] == 120 + 240
    assert fp["labels"] == [0, 1, 2] and fp["num_labelled_cases"] == 1
    assert fp["class_voxel_share"] == {0: 113 / 120, 1: 6 / 120, 2: 1 / 120}
    (stats,) = fp["foreground_intensity"]
    assert min(fg) <= stats["p00_5"] <= stats["p99_5"] <= max(fg)
    json.dumps(fp)


def test_record_and_fingerprint_errors():
    with pytest.raises(ValueError, match="2 or 3"):
        P.case_record((1.0,), (4,))
    with pytest.raises(ValueError, match="positive"):
        P.case_record((1, 0, 1), (4, 4, 4))
    with pytest.raises(ValueError, match="label shape"):
        P.case_record((1, 1, 1), (4, 4, 4), label=np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="non-integer"):
        P.case_record((1, 1, 1), (2, 2, 2), label=np.full((2, 2, 2), 0.5))
    with pytest.raises(ValueError, match="label as well"):
        P.case_record((1, 1, 1), (2, 2, 2), image=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="no cases"):
        P.fingerprint([])
    with pytest.raises(ValueError, match="2 channels, not 1"):
        P.fingerprint([P.case_record((1, 1), (4, 4)),
                       P.case_record((1, 1), (4, 4), modalities=("CT", "MRI"))])
    # Several tasks of other modalities: one fingerprint, the modalities named together.
    mixed = P.fingerprint([P.case_record((1, 1), (4, 4)),
                           P.case_record((1, 1), (4, 4), modalities=("CT",))])
    assert mixed["modalities"] == ["CT/MRI"]
    with pytest.raises(ValueError, match="3D data set"):
        P.plan_3d(hc18_like())
    with pytest.raises(ValueError, match="unknown budget"):
        P.plan_3d(openkbp_like(), {"voxels": 1})


# ---------------------------------------------------------------------------- topology rules


def test_anisotropic_target_spacing_and_pooling():
    fp = prostate_like()
    plan = PLANS["prostate_3d"]
    z10 = float(np.percentile([s[2] for s in fp["spacings"]], 10))
    assert fp["median_spacing"][2] > 3 * 0.8
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, z10])
    assert plan["reasons"]["target_spacing"]["inputs"]["adjusted"] is True
    # z is pooled later than x and y, and kernels are 1 on z at the first level only.
    assert _first_pool(plan, 0) == _first_pool(plan, 1) == 0
    assert _first_pool(plan, 2) > 0
    assert plan["kernel_sizes"][0] == [3, 3, 1]
    assert all(k == [3, 3, 3] for k in plan["kernel_sizes"][1:])
    # z is never pooled below the minimum feature map size, and pooled fewer times.
    d = plan["divisor"]
    assert plan["patch_size"][2] // d[2] >= 4 and d[2] < d[0] == d[1]
    assert all(n // k >= 4 for n, k in zip(plan["patch_size"], d))
    assert plan["depth"] == len(plan["pool_sizes"]) + 1 <= 6
    assert plan["features_per_level"] == [32, 64, 128, 256, 320, 320][:plan["depth"]]


def test_the_plan_records_how_cases_are_resampled():
    """Anisotropic data: the coarse axis is resampled separately (order 0), and the plan
    says so with its reason; isotropic data: all axes together."""
    resampling = PLANS["prostate_3d"]["resampling"]
    ratio = np.median([s[2] for s in prostate_like()["spacings"]]) / 0.8
    assert resampling["separate_z"] is True and resampling["lowres_axis"] == 2
    assert resampling["reason"] == f"case spacing ratio {ratio:.2f} > 3"
    assert (resampling["image_order"], resampling["label_order"],
            resampling["axis_order"]) == (3, 1, 0)
    why = PLANS["prostate_3d"]["reasons"]["resampling"]["why"]
    assert "axis 2 separately with order 0" in why and resampling["reason"] in why
    iso = PLANS["hippocampus_3d"]["resampling"]
    assert iso["separate_z"] is False and iso["lowres_axis"] is None
    assert "<= 3" in iso["reason"]


def test_thick_slices_wait_for_in_plane_to_catch_up():
    # 0.5 mm in plane, 5 mm slices: in-plane must reach 2.5 mm (>5/2) before z is pooled.
    topo = P.unet_topology((0.5, 0.5, 5.0), (512, 512, 40), max_pools=7)
    assert _first_pool(topo, 2) == 3
    assert [k[2] for k in topo["kernel_sizes"][:4]] == [1, 1, 1, 3]
    # Axes that cannot be pooled (size < 8) never are, and nothing is pooled past max_pools.
    topo = P.unet_topology((1.0, 1.0, 1.0), (64, 64, 7), max_pools=3)
    assert topo["pool_sizes"] == [[2, 2, 1]] * 3 and topo["divisor"] == [8, 8, 1]
    assert P.unet_topology((1.0, 1.0), (5, 5))["pool_sizes"] == []


def test_isotropic_hippocampus_like_covers_median_shape():
    plan = PLANS["hippocampus_3d"]
    median = plan["median_shape"]
    assert plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert all(p == [2, 2, 2] for p in plan["pool_sizes"]) and plan["depth"] == 4
    assert all(k == [3, 3, 3] for k in plan["kernel_sizes"])
    # The whole median crop, rounded up to the pooling factor (8): nnU-Net's 40x56x40.
    assert plan["patch_size"] == [math.ceil(m / 8) * 8 for m in median] == [40, 56, 40]
    # Batch limited to 5% of the data set's voxels, at least 2.
    assert plan["batch_size"] == round(0.05 * 200 * np.prod(median) / np.prod([40, 56, 40]))
    assert plan["num_classes"] == 3 and plan["normalization"] == [{"scheme": "zscore"}]


def test_openkbp_like_plan():
    plan = PLANS["openkbp_3d"]
    assert plan["target_spacing"] == [3.9, 3.9, 2.5]
    assert plan["median_shape"] == [128, 128, 128] and plan["patch_size"] == [128, 128, 128]
    assert plan["pool_sizes"] == [[2, 2, 2]] * 5 and plan["batch_size"] == 2
    (norm,) = plan["normalization"]
    assert norm["scheme"] == "ct" and norm["mean"] is None
    # Header-only fingerprints have no intensities: the run's preprocessing computes them
    # from the training cases (cache.intensity_plans), which is no reason for a warning.
    assert not any("CT" in w for w in P.check_plan(plan))
    assert "computed from the training cases" in plan["reasons"]["normalization"]["why"]
    small = PLANS["openkbp_small_budget"]
    assert np.prod(small["patch_size"]) < 128**3 and small["batch_size"] == 2


def test_ct_normalization_from_foreground_samples():
    rng = np.random.default_rng(1)
    cases = []
    for i in range(4):
        label = np.zeros((16, 16, 8), np.uint8)
        label[4:12, 4:12, 2:6] = 1
        image = rng.normal(1000 + 10 * i, 50, size=label.shape)
        cases.append(P.case_record((1, 1, 2), label.shape, label=label, modalities=("CT",),
                                   image=image, seed=i))
    plan = P.plan_3d(P.fingerprint(cases))
    (norm,) = plan["normalization"]
    assert norm["scheme"] == "ct" and norm["lo"] < 1000 < norm["hi"]
    assert 990 < norm["mean"] < 1030 and 30 < norm["std"] < 70
    assert P.check_plan(plan) == []


def test_2d_plans():
    plan = PLANS["hc18_2d"]
    assert plan["dims"] == 2 and plan["axes"] == [0, 1] and plan["slice_axis"] is None
    assert plan["target_spacing"] == [0.13, 0.13] and plan["median_shape"] == [800, 540]
    assert plan["depth"] - 1 <= 7 and max(plan["features_per_level"]) <= 512
    assert all(k == [3, 3] for k in plan["kernel_sizes"])
    assert plan["batch_size"] >= 2
    # 2D plans of volumes drop the slice axis.
    hip = PLANS["hippocampus_2d"]
    assert hip["axes"] == [0, 1] and hip["slice_axis"] == 2
    assert hip["median_shape"] == PLANS["hippocampus_3d"]["median_shape"][:2]
    assert hip["patch_size"] == [40, 56]
    sag = P.plan_2d(hippocampus_like(), slice_axis=0)
    assert sag["axes"] == [1, 2] and sag["patch_size"] == [56, 40]
    # 2D batches are large (many small patches), capped by 5% of the data set's voxels.
    assert hip["batch_size"] == round(0.05 * 200 * np.prod(PLANS["hippocampus_3d"]["median_shape"])
                                      / (40 * 56))
    capped = P.plan_2d(hippocampus_like(), {"max_batch_size": 64})
    assert capped["batch_size"] == 64
    # The anisotropic volume planned in plane: no kernel 1, both axes pooled alike.
    pro = PLANS["prostate_2d"]
    assert pro["target_spacing"] == [0.8, 0.8] and pro["pool_sizes"][0] == [2, 2]


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_invariants(name):
    plan = PLANS[name]
    assert P.check_plan(plan) is not None  # raises on any inconsistency
    d = plan["divisor"]
    assert all(n % k == 0 for n, k in zip(plan["patch_size"], d))
    assert d == [int(np.prod([p[a] for p in plan["pool_sizes"]])) for a in range(plan["dims"])]
    # The budget is respected, at the plan's batch size.
    cost = P.estimate_cost(plan)
    assert not plan["over_budget"]
    assert cost["feature_voxels"] <= plan["budget"]["feature_voxels"]
    assert plan["batch_size"] >= plan["budget"]["min_batch_size"]
    assert cost == plan["cost"]
    assert plan["estimated_gflops_per_step"] == cost["estimated_gflops_per_step"] > 0
    assert plan["estimated_activation_mib"] == cost["estimated_activation_mib"] > 0
    # A reason (sentence + inputs) for every decision.
    for key in P.DECISIONS:
        reason = plan["reasons"][key]
        assert isinstance(reason["why"], str) and reason["why"].endswith(".")
        assert isinstance(reason["inputs"], dict) and reason["inputs"]
    json.loads(json.dumps(plan))
    text = P.plan_summary(plan)
    assert "x".join(map(str, plan["patch_size"])) in text and "batch" in text


def test_budget_shrinks_the_relatively_largest_axis():
    fp = _same(10, (1.0, 1.0, 1.0), (160, 160, 80))
    full = P.plan_3d(fp)
    small = P.plan_3d(fp, {"feature_voxels": 2e8})
    assert full["patch_size"] == [160, 160, 80]
    assert small["cost"]["feature_voxels"] <= 2e8 and small["batch_size"] == 2
    # Shrunk towards the median shape's aspect ratio: z (half of x, y) stays half.
    x, y, z = small["patch_size"]
    assert x == y and abs(z / x - 0.5) < 0.25
    assert small["reasons"]["patch_size"]["inputs"]["shrinks"] > 0


def test_impossible_budget_is_flagged():
    plan = P.plan_3d(_same(4, (1, 1, 1), (64, 64, 64)), {"feature_voxels": 1e3})
    assert plan["over_budget"] and "OVER BUDGET" in plan["reasons"]["patch_size"]["why"]
    assert any("over budget" in w for w in P.check_plan(plan))


def test_check_plan_rejects_inconsistent_plans():
    plan = json.loads(json.dumps(PLANS["hippocampus_3d"]))
    bad = dict(plan, patch_size=[41, 56, 40])
    with pytest.raises(ValueError, match="multiple of the total pooling"):
        P.check_plan(bad)
    bad = dict(plan, kernel_sizes=[[3, 3, 5]] + plan["kernel_sizes"][1:])
    with pytest.raises(ValueError, match="kernel sizes"):
        P.check_plan(bad)
    bad = dict(plan, reasons={k: v for k, v in plan["reasons"].items() if k != "batch_size"})
    with pytest.raises(ValueError, match="no reason"):
        P.check_plan(bad)
    bad = dict(plan, features_per_level=plan["features_per_level"][:-1])
    with pytest.raises(ValueError, match="depth"):
        P.check_plan(bad)


def test_estimate_cost_by_hand():
    # 2D, patch 8x8, one pooling, features 2 and 4, 1 input channel, 3 classes, batch 5.
    plan = {"patch_size": [8, 8], "pool_sizes": [[2, 2]], "kernel_sizes": [[3, 3], [3, 1]],
            "features_per_level": [2, 4], "batch_size": 5, "num_channels": 1, "num_classes": 3}
    c = P.estimate_cost(plan)
    v0, v1 = 64, 16
    macs = (v0 * 9 * (1 * 2 + 2 * 2) + v1 * 3 * (2 * 4 + 4 * 4)  # encoder
            + v0 * 4 * 2 + v0 * 9 * (4 * 2 + 2 * 2)  # up-conv, decoder convs
            + v0 * 2 * 3)  # head
    outputs = 2 * v0 * 2 + 2 * v1 * 4 + 3 * v0 * 2 + v0 * 3
    params = (9 * 6 + 4 + 3 * 24 + 8) + (4 * 4 * 2 + 2 + 9 * 12 + 4) + (2 * 3 + 3)
    assert c["feature_voxels_per_sample"] == outputs and c["feature_voxels"] == 5 * outputs
    assert c["estimated_gflops_per_step"] == pytest.approx(6 * macs * 5 / 1e9)
    assert c["estimated_activation_mib"] == pytest.approx(5 * outputs * 3 * 4 / 2**20)
    assert c["parameters"] == params
    assert P.estimate_cost(plan, num_classes=4)["feature_voxels_per_sample"] == outputs + v0


# ---------------------------------------------------------------------------- real data


def _nifti_record(image_path, label_path):
    """Record from a NIfTI header (RAS axis order, as the loader reorients) and its label."""
    import nibabel as nib
    from nibabel import orientations

    img = nib.load(image_path)
    ornt = orientations.io_orientation(img.affine)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    spacing, shape = [0.0] * 3, [0] * 3
    for axis, (world, _) in enumerate(ornt):
        spacing[int(world)] = float(zooms[axis])
        shape[int(world)] = int(img.shape[axis])
    label = nib.as_closest_canonical(nib.load(label_path))
    return P.case_record(spacing, shape, label=np.asarray(label.dataobj), modalities=("MRI",))


def test_real_hippocampus_plan(hippocampus_dir):
    root = hippocampus_dir
    names = sorted(p.name for p in (root / "imagesTr").glob("hippocampus_*.nii.gz"))
    records = [_nifti_record(root / "imagesTr" / n, root / "labelsTr" / n) for n in names]
    fp = P.fingerprint(records, name="Task04_Hippocampus")
    plan3, plan2 = P.plan_3d(fp), P.plan_2d(fp)
    print(P.plan_summary(plan3), P.plan_summary(plan2, reasons=False), sep="\n")
    assert fp["num_cases"] == len(names) >= 100 and fp["labels"] == [0, 1, 2]
    assert fp["class_voxel_share"][0] > 0.9
    assert plan3["target_spacing"] == [1.0, 1.0, 1.0] and plan3["num_classes"] == 3
    assert plan3["depth"] == 4 and all(p == [2, 2, 2] for p in plan3["pool_sizes"])
    assert all(n >= m and n % 8 == 0 for n, m in zip(plan3["patch_size"], plan3["median_shape"]))
    assert all(30 <= m <= 60 for m in plan3["median_shape"])
    assert 2 <= plan3["batch_size"] <= 16 and plan2["batch_size"] > plan3["batch_size"]
    for plan in (plan3, plan2):
        assert P.check_plan(plan) == []
        assert plan["cost"]["feature_voxels"] <= plan["budget"]["feature_voxels"]
