"""The whole path on real data: Task04_Hippocampus from ../shared/data (or $MEDSEG_DATA)."""

import json

import nibabel as nib
import numpy as np

from medseg_jax import predict, train


def test_hippocampus_trains_and_evaluates_in_mm(make_tiny_config, hippocampus_dir, tmp_path):
    root = hippocampus_dir
    cases = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006",
             "hippocampus_007", "hippocampus_243"]  # 003 and 243 store float32 labels
    keys = [f"Hippocampus/{c}" for c in cases]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": keys[:4], "val": keys[4:5], "test": keys[5:]}))
    config = make_tiny_config(**{"data.root": str(root), "data.splits_file": str(splits),
                                 "data.image_size": (32, 32), "train.num_epochs": 1})
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    (case,) = results["per_case"]
    assert case["case"] == "Hippocampus/hippocampus_243"
    assert case["spacing"] == [1.0, 1.0, 1.0]
    assert set(case["metrics"]) == {"Anterior", "Posterior"}
    assert set(results["aggregate"]["all"]) == {"Anterior", "Posterior"}

    # Prediction writes label maps in each input's own geometry, label values as dataset.json.
    out = tmp_path / "pred"
    inputs = [root / "imagesTr" / f"{c}.nii.gz" for c in ("hippocampus_243", "hippocampus_004")]
    for path in inputs:
        predict.predict(config, str(tmp_path / "run"), str(path), str(out))
        src, dst = nib.load(path), nib.load(out / path.name)
        assert dst.shape == src.shape and dst.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(dst.affine, src.affine)
        assert set(np.unique(np.asarray(dst.dataobj))) <= {0, 1, 2}
