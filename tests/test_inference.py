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
