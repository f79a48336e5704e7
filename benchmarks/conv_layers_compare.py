"""One 3x3 convolution (no bias) of each U-Net level, JAX (XLA:CPU) against PyTorch (NCHW and
channels-last): forward, and forward + both gradients; ms and GFLOP/s (forward + backward
counted as 3x the forward FLOPs). Needs PyTorch (the optional extra).

  python benchmarks/conv_layers_compare.py
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/conv_layers_compare.py
  python benchmarks/conv_layers_compare.py --dtype=bfloat16 --jax_forms=lax,im2col,shifted

``--jax_forms`` adds other formulations of the same convolution, each checked against
``lax`` before it is timed: ``im2col`` (the nine shifted inputs concatenated along channels,
then one matmul with the 9*Cin x Cout kernel) and ``shifted`` (nine matmuls of shifted inputs,
summed); both accumulate in float32 (``preferred_element_type``), as ``lax`` does.
"""

import os

from absl import app, flags

BATCH = 16
SHAPES = [(128, 1, 32), (128, 32, 32), (128, 64, 32), (64, 64, 64), (32, 128, 128),
          (16, 256, 256)]  # (size, in, out): torch_compare.py's U-Net, base 32, 128x128
FORMS = ("lax", "im2col", "shifted")

FLAGS = flags.FLAGS
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Inputs and kernels of both frameworks (PyTorch: bfloat16 tensors, oneDNN).")
flags.DEFINE_list("jax_forms", ["lax"], f"JAX formulations to time, of {FORMS}.")


def median_s(fn, n: int = 5) -> float:
    """The median of ``n`` calls after one untimed call."""
    from medseg_jax import timing  # noqa: PLC0415

    return timing.StepTimer(warmup=1).time(fn, n)


def jax_forms():
    """name -> conv(x NHWC, w HWIO) -> NHWC in x's dtype, SAME padding, stride 1."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            preferred_element_type=jnp.float32).astype(x.dtype)

    def shifts(x, w):
        kh, kw = w.shape[:2]
        h, wd = x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        return [xp[:, i:i + h, j:j + wd, :] for i in range(kh) for j in range(kw)]

    def im2col(x, w):
        cols = jnp.concatenate(shifts(x, w), axis=-1)
        return jnp.einsum("nhwk,ko->nhwo", cols, w.reshape(-1, w.shape[-1]),
                          preferred_element_type=jnp.float32).astype(x.dtype)

    def shifted(x, w):
        taps = w.reshape(-1, *w.shape[2:])
        return sum(jnp.einsum("nhwc,co->nhwo", s, t, preferred_element_type=jnp.float32)
                   for s, t in zip(shifts(x, w), taps)).astype(x.dtype)

    return {"lax": lax_conv, "im2col": im2col, "shifted": shifted}


def main(argv) -> None:
    del argv
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    unknown = set(FLAGS.jax_forms) - set(FORMS)
    if unknown:
        raise app.UsageError(f"--jax_forms: unknown {sorted(unknown)}; choose from {FORMS}")
    forms = {k: v for k, v in jax_forms().items() if k in FLAGS.jax_forms}
    jdt = jnp.dtype(FLAGS.dtype)
    tdt = getattr(torch, FLAGS.dtype)

    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {FLAGS.dtype}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.2f}")
    jax_cols = " | ".join(f"JAX {k} fwd ms | JAX {k} fwd+bwd ms" for k in forms)
    print(f"| layer | GFLOP | {jax_cols} | torch fwd+bwd ms | torch CL fwd+bwd ms | GFLOP/s f+b: "
          f"JAX {FLAGS.jax_forms[0]} / torch / CL |\n|---|---|{'---|---|' * len(forms)}"
          "---|---|---|")
    for s, cin, cout in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((BATCH, s, s, cin)).astype(np.float32)
        w = (0.1 * rng.standard_normal((3, 3, cin, cout))).astype(np.float32)
        g = rng.standard_normal((BATCH, s, s, cout)).astype(np.float32)
        flops = 2 * BATCH * s * s * cin * cout * 9
        xj, wj, gj = (jnp.asarray(a, jdt) for a in (x, w, g))
        cells, first_b = [], None
        reference = np.asarray(forms.get("lax", jax_forms()["lax"])(xj, wj), np.float32)
        for name, conv in forms.items():
            out = np.asarray(conv(xj, wj), np.float32)
            err = float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))
            if err > (2e-2 if FLAGS.dtype == "bfloat16" else 1e-4):
                raise AssertionError(f"{name} differs from lax by {err:.2e} (relative max)")
            fwd = jax.jit(conv)
            both = jax.jit(jax.grad(
                lambda x, w, conv=conv: jnp.sum(conv(x, w).astype(jnp.float32) * gj),
                argnums=(0, 1)))
            j_f = median_s(lambda fwd=fwd: fwd(xj, wj).block_until_ready())
            j_b = median_s(lambda both=both: jax.block_until_ready(both(xj, wj)))
            first_b = j_b if first_b is None else first_b
            cells.append(f"{1e3 * j_f:.0f} | {1e3 * j_b:.0f}")
        t_b = {}
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdt).contiguous(
                memory_format=fmt)
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(tdt).contiguous(
                memory_format=fmt)
            gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy()).to(tdt).contiguous(
                memory_format=fmt)
            xt.requires_grad_(True)
            wt.requires_grad_(True)

            def step(xt=xt, wt=wt, gt=gt):
                y = torch.nn.functional.conv2d(xt, wt, padding=1)
                torch.autograd.grad((y * gt).sum(), (xt, wt))
            t_b[cl] = median_s(step)
        print(f"| {s}x{s} {cin}->{cout} | {flops / 1e9:.2f} | {' | '.join(cells)} | "
              f"{1e3 * t_b[False]:.0f} | {1e3 * t_b[True]:.0f} | {3 * flops / first_b / 1e9:.0f} / "
              f"{3 * flops / t_b[False] / 1e9:.0f} / {3 * flops / t_b[True] / 1e9:.0f} |",
              flush=True)


if __name__ == "__main__":
    app.run(main)
