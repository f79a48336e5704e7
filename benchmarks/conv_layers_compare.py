"""One 3x3 convolution (no bias) of each U-Net level, JAX (XLA:CPU) against PyTorch (NCHW and
channels-last): forward, and forward + both gradients; ms and GFLOP/s (forward + backward
counted as 3x the forward FLOPs). Needs PyTorch (the optional extra).

  python benchmarks/conv_layers_compare.py
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/conv_layers_compare.py
"""

import os
import statistics
import time

BATCH = 16
SHAPES = [(128, 1, 32), (128, 32, 32), (128, 64, 32), (64, 64, 64), (32, 128, 128),
          (16, 256, 256)]  # (size, in, out): torch_compare.py's U-Net, base 32, 128x128


def median_s(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    print("| layer | GFLOP | JAX fwd ms | JAX fwd+bwd ms | torch fwd+bwd ms | torch CL fwd+bwd "
          "ms | GFLOP/s f+b: JAX / torch / CL |\n|---|---|---|---|---|---|---|")
    for s, cin, cout in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((BATCH, s, s, cin)).astype(np.float32)
        w = (0.1 * rng.standard_normal((3, 3, cin, cout))).astype(np.float32)
        g = rng.standard_normal((BATCH, s, s, cout)).astype(np.float32)
        flops = 2 * BATCH * s * s * cin * cout * 9
        xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)
        fwd = jax.jit(conv)
        both = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) * gj), argnums=(0, 1)))
        j_f = median_s(lambda: fwd(xj, wj).block_until_ready())
        j_b = median_s(lambda: jax.block_until_ready(both(xj, wj)))
        t_b = {}
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt)
            gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
            xt.requires_grad_(True)
            wt.requires_grad_(True)

            def step(xt=xt, wt=wt, gt=gt):
                y = torch.nn.functional.conv2d(xt, wt, padding=1)
                torch.autograd.grad((y * gt).sum(), (xt, wt))
            t_b[cl] = median_s(step)
        print(f"| {s}x{s} {cin}->{cout} | {flops / 1e9:.2f} | {1e3 * j_f:.0f} | {1e3 * j_b:.0f} | "
              f"{1e3 * t_b[False]:.0f} | {1e3 * t_b[True]:.0f} | {3 * flops / j_b / 1e9:.0f} / "
              f"{3 * flops / t_b[False] / 1e9:.0f} / {3 * flops / t_b[True] / 1e9:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
