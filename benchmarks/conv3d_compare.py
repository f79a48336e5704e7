"""3D convolutions on XLA:CPU: native against 2D convolutions summed over the first axis.

  python benchmarks/conv3d_compare.py            # one 3x3x3 layer, then a whole 3D U-Net step
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/conv3d_compare.py

The layer: B=2, 40x56x40, 32 -> 32 features, forward and forward + backward, native
``lax.conv_general_dilated`` against the sum over the three taps of the first axis of 2D
convolutions of the shifted input (what ``models.layers.Conv`` computes), interleaved, after
checking that both give the same values. The step: a 3D U-Net (base 16, depth 4, 40x56x40,
batch 2, 3 classes, augmentation off) trained by the package's jitted step with
``model.layer_impl=reshape`` (the CPU forms) and ``lax`` (native), interleaved.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medseg_jax import timing


def layer(rounds: int = 3) -> None:
    b, d, h, w, c, f = 2, 40, 56, 40, 32, 32
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, d, h, w, c)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, c, f)) * 0.05, jnp.float32)

    def native(x, k):
        return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME",
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    def as_2d(x, k):
        xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
        out = 0
        for tap in range(3):
            planes = xp[:, tap:tap + d].reshape(b * d, h, w, c)
            out = out + lax.conv_general_dilated(planes, k[tap], (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out.reshape(b, d, h, w, f)

    np.testing.assert_allclose(as_2d(x, k), native(x, k), rtol=2e-4, atol=2e-4)
    flops = 2 * b * d * h * w * c * f * 27
    fns = {}
    for name, fn in (("native 3D", native), ("2D sums", as_2d)):
        grad = jax.jit(jax.value_and_grad(lambda x, k, fn=fn: (fn(x, k) ** 2).mean(), (0, 1)))
        fwd = jax.jit(fn)
        jax.block_until_ready((fwd(x, k), grad(x, k)))
        fns[name] = (fwd, grad, timing.StepTimer(), timing.StepTimer())
    for _ in range(rounds):
        for name, (fwd, grad, tf, tg) in fns.items():
            tf.call(lambda fwd=fwd: jax.block_until_ready(fwd(x, k)))
            tg.call(lambda grad=grad: jax.block_until_ready(grad(x, k)))
    print("3x3x3 convolution, B=2, 40x56x40, 32 -> 32 (median of interleaved rounds):")
    for name, (_, _, tf, tg) in fns.items():
        f_s, g_s = tf.median(), tg.median()
        print(f"  {name:9s} forward {1e3 * f_s:7.1f} ms ({flops / f_s / 1e9:5.1f} GFLOP/s), "
              f"forward + backward {1e3 * g_s:7.1f} ms ({3 * flops / g_s / 1e9:5.1f} GFLOP/s)")


def step(rounds: int = 4) -> None:
    from medseg_jax import sharding
    from medseg_jax import state as state_lib
    from medseg_jax.config import default_config

    config = default_config()
    config.model.spatial_dims, config.data.image_size, config.train.batch_size = 3, (40, 56, 40), 2
    config.augment.enabled = False
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    batch = sharding.to_global({"image": rng.normal(size=(2, 40, 56, 40, 1)).astype(np.float32),
                                "label": rng.integers(0, 3, (2, 40, 56, 40)).astype(np.uint8)},
                               mesh)
    runs = {}
    for impl in ("reshape", "lax"):
        c = config.copy_and_resolve_references()
        c.model.layer_impl = impl
        setup = state_lib.initialize(c, 3, 1, 100, mesh)
        state, fn = setup.state, setup.train_fn
        (state, _), first = timing.timed(lambda fn=fn, state=state: jax.block_until_ready(
            fn(state, batch)))
        runs[impl] = [fn, state, timing.StepTimer(), first]

    def two_steps(r):
        for _ in range(2):
            r[1], out = r[0](r[1], batch)
        jax.block_until_ready(out)

    for _ in range(rounds):
        for r in runs.values():
            r[2].call(lambda r=r: two_steps(r), steps=2)
    print("3D U-Net train step (base 16, depth 4, 40x56x40, batch 2):")
    for impl, r in runs.items():
        print(f"  layer_impl={impl:8s} first step (compilation) {r[3]:.1f} s, "
              f"step {r[2].median():.2f} s")


if __name__ == "__main__":
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}; jax {jax.__version__}")
    layer()
    step()
