import itertools

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import inference, sharding


def _voxelwise(state, x):
    """A stand-in network that works voxel by voxel: p(fg) = sigmoid(x)."""
    p = jax.nn.sigmoid(x[..., :1])
    return jnp.concatenate([1 - p, p], axis=-1)


def test_sliding_window_equals_whole_volume_for_a_voxelwise_model():
    mesh = sharding.make_mesh()
    predict = jax.jit(_voxelwise)
    volume = np.random.default_rng(0).normal(size=(13, 9, 6, 1)).astype(np.float32)
    probs, n = inference.sliding_window(predict, None, volume, (8, 8, 8), 0.5, 8, mesh)
    assert probs.shape == (13, 9, 6, 2)
    assert n == 3 * 2 * 1
    np.testing.assert_allclose(probs, np.asarray(_voxelwise(None, volume)), rtol=1e-5, atol=1e-6)


def test_2d_windows_over_a_volume_equal_the_whole_volume():
    """A one-slice-thick window reshaped to the 2D input and back: the 2D sliding
    window of data.in_plane='spacing'."""
    mesh = sharding.make_mesh()
    seen = []

    def two_d(state, x):
        seen.append(x.shape)
        return _voxelwise(state, x)

    volume = np.random.default_rng(1).normal(size=(13, 9, 5, 1)).astype(np.float32)
    probs, n = inference.sliding_window(jax.jit(two_d), None, volume, (8, 8, 1), 0.5, 8,
                                        mesh, input_size=(8, 8))
    assert seen[0] == (8, 8, 8, 1)  # 2D inputs
    assert n == 3 * 2 * 5  # windows in plane x slices
    np.testing.assert_allclose(probs, np.asarray(_voxelwise(None, volume)), rtol=1e-5, atol=1e-6)


def _gaussian_by_hand(patch):
    """nnU-Net's importance map: exp(-d^2 / 2) with d the distance from the patch centre
    in units of sigma = patch / 8 per axis, divided by its maximum (centre 1), at least
    1e-3 (no voxel without weight)."""
    grid = np.meshgrid(*[np.arange(p, dtype=np.float64) for p in patch], indexing="ij")
    d2 = sum(((g - (p - 1) / 2) / (p / 8)) ** 2 for g, p in zip(grid, patch))
    w = np.exp(-0.5 * d2)
    return np.maximum(w / w.max(), 1e-3)


def test_sliding_window_weights_are_the_gaussian_importance_map():
    from medseg_jax.data import preprocess

    for patch in [(9, 9), (8, 6), (7, 5, 3), (16, 16, 8)]:
        weight = preprocess.gaussian_importance(patch)
        assert weight.shape == patch and weight.dtype == np.float32
        np.testing.assert_allclose(weight, _gaussian_by_hand(patch), rtol=1e-6, atol=0)
    assert preprocess.gaussian_importance((16, 16)).min() == np.float32(1e-3)  # corners

    # A network that predicts one value per window (from the window's mean): each voxel
    # gets the Gaussian-weighted mean of the windows that cover it.
    def per_window(state, x):
        p = jax.nn.sigmoid(jnp.mean(x, axis=(1, 2, 3), keepdims=True))
        p = jnp.broadcast_to(p, x.shape[:-1] + (1,))
        return jnp.concatenate([1 - p, p], axis=-1)

    mesh = sharding.make_mesh()
    volume = np.random.default_rng(2).normal(size=(13, 9, 6, 1)).astype(np.float32)
    patch = (8, 6, 4)
    probs, n = inference.sliding_window(jax.jit(per_window), None, volume, patch, 0.5, 8,
                                        mesh)
    weight = _gaussian_by_hand(patch)
    acc, norm = np.zeros(volume.shape[:-1]), np.zeros(volume.shape[:-1])
    starts = [preprocess.window_starts(s, p, 0.5) for s, p in zip(volume.shape, patch)]
    assert n == len(starts[0]) * len(starts[1]) * len(starts[2]) == 3 * 2 * 2
    for i, j, k in itertools.product(*starts):
        box = (slice(i, i + 8), slice(j, j + 6), slice(k, k + 4))
        value = 1 / (1 + np.exp(-volume[box].mean()))
        acc[box] += value * weight
        norm[box] += weight
    np.testing.assert_allclose(probs[..., 1], acc / norm, rtol=1e-5, atol=1e-6)
    assert np.ptp(acc / norm) > 0.01  # the windows' values differ: the weights matter


def test_largest_component_post_processing():
    import ml_collections
    import numpy as np

    from medseg_jax import inference

    probs = np.zeros((8, 8, 3), np.float32)
    probs[..., 0] = 1.0
    probs[1:4, 1:4] = (0, 1, 0)  # class 1: 9 voxels ...
    probs[6:8, 6:8] = (0, 1, 0)  # ... and a stray 4-voxel blob
    probs[5, 0] = (0, 0, 1)  # class 2: a single voxel (its largest component)
    config = ml_collections.ConfigDict({"eval": {"postprocess": ""}})
    plain = inference.label_map(probs, config)
    assert (plain == 1).sum() == 13 and (plain == 2).sum() == 1
    config.eval.postprocess = "largest"
    kept = inference.label_map(probs, config)
    assert (kept == 1).sum() == 9 and kept[6:8, 6:8].max() == 0 and (kept == 2).sum() == 1


def test_whole_case_windows():
    """eval.sw_window="whole": one window per slice (2D) or case (3D), each axis rounded
    up to the network's total pooling and never below the patch; "patch" is the patch."""
    from medseg_jax.config import default_config

    config = default_config()
    config.model.depth = 3  # total pooling 4 per axis
    config.data.image_size = (8, 8)
    config.data.slice_axis = 2
    assert inference.window(config, (13, 9, 5)) == ((8, 8), (8, 8, 1))
    config.eval.sw_window = "whole"
    assert inference.window(config, (13, 9, 5)) == ((16, 12), (16, 12, 1))
    assert inference.window(config, (6, 20, 5)) == ((8, 20), (8, 20, 1))  # never below
    config.data.slice_axis = 0
    assert inference.window(config, (13, 9, 5)) == ((12, 8), (1, 12, 8))
    config.model.spatial_dims, config.data.image_size = 3, (8, 8, 8)
    assert inference.window(config, (13, 9, 6)) == ((16, 12, 8), (16, 12, 8))
    config.model.pool_sizes = ((2, 2, 1), (2, 2, 1))  # no pooling along the last axis
    assert inference.window(config, (13, 9, 6)) == ((16, 12, 8), (16, 12, 8))
    assert inference.window(config, (13, 9, 11)) == ((16, 12, 11), (16, 12, 11))

    # The whole-slice window through the 2D sliding window: one input per slice.
    config = default_config()
    config.model.depth, config.data.image_size, config.eval.sw_window = 3, (8, 8), "whole"
    seen = []

    def two_d(state, x):
        seen.append(x.shape)
        return _voxelwise(state, x)

    volume = np.random.default_rng(2).normal(size=(13, 9, 5, 1)).astype(np.float32)
    size, patch = inference.window(config, volume.shape[:-1])
    probs, n = inference.sliding_window(jax.jit(two_d), None, volume, patch, 0.5, 8,
                                        sharding.make_mesh(), input_size=size)
    assert seen[0] == (8, 16, 12, 1) and n == 5
    np.testing.assert_allclose(probs, np.asarray(_voxelwise(None, volume)), rtol=1e-5, atol=1e-6)

    # A 3D case in one window: batches fitted to the windows (rounded up to the mesh's
    # devices), not eval.batch_size padded copies of the case; the same probabilities.
    mesh, seen[:] = sharding.make_mesh(), []
    config.model.spatial_dims, config.data.image_size = 3, (8, 8, 8)
    size, patch = inference.window(config, volume.shape[:-1])
    batch = 4 * mesh.devices.size
    fitted, n = inference.sliding_window(jax.jit(two_d), None, volume, patch, 0.5, batch, mesh,
                                         input_size=size, fit_batch=True)
    assert n == 1 and seen == [(mesh.devices.size, 16, 12, 8, 1)]
    padded, _ = inference.sliding_window(jax.jit(two_d), None, volume, patch, 0.5, batch, mesh,
                                         input_size=size)
    assert seen[-1][0] == batch
    np.testing.assert_array_equal(fitted, padded)


def test_whole_windows_in_an_evaluation_write_their_own_files(tmp_path):
    """A patch-based run evaluated with eval.sw_window="whole": fewer network inputs, the
    files ``test_whole_*`` beside the patch windows' ``test_*``, which stay as they were."""
    import json

    from conftest import tiny_config

    from medseg_jax import evaluate, train

    config = tiny_config(**{"data.in_plane": "spacing", "data.image_size": (8, 8),
                            "eval.figures": False, "train.num_epochs": 1})
    workdir = tmp_path / "run"
    patch = train.train_and_evaluate(config, str(workdir))
    before = (workdir / "test_metrics.json").read_bytes()
    config.eval.sw_window = "whole"
    whole = evaluate.evaluate(config, str(workdir))
    assert (workdir / "test_metrics.json").read_bytes() == before
    saved = json.loads((workdir / "test_whole_metrics.json").read_text())
    assert saved["network_inputs"] == whole["network_inputs"] < patch["network_inputs"]
    assert len(saved["per_case"]) == len(patch["per_case"])
    # Post-processing chosen with each window: two choice files, neither replaces the other;
    # "auto" applies the window's own choice, the patch one where whole windows made none.
    from medseg_jax import postprocess

    for window in ("patch", "whole"):
        config.eval.sw_window, config.eval.postprocess = window, "choose"
        evaluate.evaluate(config, str(workdir), split="val")
    patch_choice = json.loads((workdir / "postprocessing.json").read_text())
    whole_choice = json.loads((workdir / "postprocessing_whole.json").read_text())
    assert (patch_choice["sw_window"], whole_choice["sw_window"]) == ("patch", "whole")
    assert (workdir / "val_whole_auto_metrics.json").exists()
    labels = {int(row["value"]): name for name, row in whole_choice["classes"].items()}
    labels[0] = "background"
    every = sorted(v for v in labels if v)  # tell the two files apart
    kept = [] if patch_choice["largest"] == every else every
    whole_choice["largest"] = kept
    (workdir / "postprocessing_whole.json").write_text(json.dumps(whole_choice))
    assert postprocess.resolve("auto", str(workdir), labels, window="whole") == \
        ("largest:" + ",".join(map(str, kept)) if kept else "")
    assert postprocess.resolve("auto", str(workdir), labels) == patch_choice["spec"]
    (workdir / "postprocessing_whole.json").unlink()
    assert postprocess.resolve("auto", str(workdir), labels, window="whole") == \
        patch_choice["spec"]
    postprocess.require_choice("auto", str(workdir), "whole")  # the patch one will do
    config.eval.postprocess = "auto"  # says whose choice it applied, and the window
    auto = evaluate.evaluate(config, str(workdir), split="val")
    assert auto["postprocess"].startswith("auto (the patch windows' choice: ")
    assert auto["sw_window"] == "whole" and saved["sw_window"] == "whole"
    assert json.loads((workdir / "test_metrics.json").read_text())["sw_window"] == "patch"
