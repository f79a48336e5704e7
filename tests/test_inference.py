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
