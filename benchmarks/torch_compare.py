"""medseg_jax's U-Net training step against the same network in PyTorch, in one run.

Builds medseg_jax's 2D U-Net (``state_lib.build_model``, stepped by the package's own jitted
``train_step``, augmentation off) and the same network in PyTorch: the same layers
(3x3 conv without bias -> BatchNorm -> ReLU, twice per block; 2x2 max-pool; 2x2
stride-2 transposed conv with bias; skip concatenation; 1x1 head), the same Dice + CE
loss and Adam. Before timing it checks that the two have the same parameter count, the
same convolution FLOPs (PyTorch's FlopCounterMode against the convolutions and matmuls
of the JAX program) and, with the JAX weights copied into PyTorch, the same logits.
Then it times both on the same inputs and batch, interleaved round by round (eager
NCHW, eager channels-last, MONAI BasicUNet when MONAI is installed), and prints the
median step time, images/s and the ratio medseg_jax / PyTorch (> 1: JAX is faster).

PyTorch is an optional extra, never a dependency of the package:

  pip install -e '.[torch]'        # torch==2.13.0, the CPU build cached on these machines
  python benchmarks/torch_compare.py                       # base 32, batch 16, 128x128
  python benchmarks/torch_compare.py --base_features=16 --image_size=64 --rounds=3
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("base_features", 32, "U-Net width (features of the first level).")
flags.DEFINE_integer("depth", 4, "U-Net levels.")
flags.DEFINE_integer("image_size", 128, "Square input size.")
flags.DEFINE_integer("batch_size", 16, "Batch size (both frameworks).")
flags.DEFINE_integer("num_classes", 2, "Output classes (2 = the default data's).")
flags.DEFINE_integer("steps", 5, "Timed steps per framework per round.")
flags.DEFINE_integer("rounds", 4, "Interleaved rounds; medians are over all timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per framework before the first round.")
flags.DEFINE_list("torch_variants", ["eager", "channels_last", "monai"],
                  "PyTorch variants: eager (NCHW), channels_last, monai (skipped if absent).")
flags.DEFINE_bool("flax_reference", True,
                  "Also time the same JAX step with Flax's own nn.ConvTranspose and nn.max_pool "
                  "(what medseg_jax used before its CPU formulations of those layers).")


# --------------------------------------------------------------------------------------
# PyTorch side.


def torch_unet(torch, in_channels: int, num_classes: int, base: int, depth: int):
    """The U-Net of medseg_jax.models.unet in PyTorch (NCHW)."""
    nn = torch.nn

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=0.1),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=0.1),
            nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            f = [base * 2**i for i in range(depth)]
            self.enc = nn.ModuleList(
                [block(in_channels if i == 0 else f[i - 1], f[i]) for i in range(depth)])
            self.up = nn.ModuleList(
                [nn.ConvTranspose2d(f[i + 1], f[i], 2, stride=2) for i in range(depth - 1)])
            self.dec = nn.ModuleList([block(2 * f[i], f[i]) for i in range(depth - 1)])
            self.head = nn.Conv2d(f[0], num_classes, 1)

        def forward(self, x):
            skips = []
            for i, enc in enumerate(self.enc):
                if i:
                    x = torch.nn.functional.max_pool2d(x, 2)
                x = enc(x)
                skips.append(x)
            x = skips[-1]
            for i in reversed(range(len(self.up))):
                x = self.dec[i](torch.cat([skips[i], self.up[i](x)], 1))
            return self.head(x)

    return UNet()


def torch_dice_ce(torch, logits, labels, num_classes: int, smooth: float = 1e-5):
    """medseg_jax.losses.dice_ce_loss (batch Dice without background + mean CE), NCHW."""
    F = torch.nn.functional
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1).float()[:, 1:]
    dims = (0, *range(2, probs.ndim))
    inter, p_sum, y_sum = (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)
    dice = 1 - ((2 * inter + smooth) / (p_sum + y_sum + smooth).clamp_min(1e-8)).mean()
    return dice + F.cross_entropy(logits.float(), labels)


def load_jax_weights(torch, net, params) -> None:
    """Copies medseg_jax U-Net parameters into ``torch_unet`` (HWIO -> OIHW)."""
    import numpy as np  # noqa: PLC0415

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    def conv_block(seq, p):
        seq[0].weight.data = t(np.transpose(p["Conv_0"]["kernel"], (3, 2, 0, 1)))
        seq[3].weight.data = t(np.transpose(p["Conv_1"]["kernel"], (3, 2, 0, 1)))
        for bn, name in ((seq[1], "BatchNorm_0"), (seq[4], "BatchNorm_1")):
            bn.weight.data, bn.bias.data = t(p[name]["scale"]), t(p[name]["bias"])

    for i, enc in enumerate(net.enc):
        conv_block(enc, params[f"enc_{i}"])
    for i, (up, dec) in enumerate(zip(net.up, net.dec)):
        k = np.asarray(params[f"up_{i}"]["kernel"])[::-1, ::-1]  # (kh, kw, in, out), flipped
        up.weight.data, up.bias.data = t(np.transpose(k, (2, 3, 0, 1))), t(params[f"up_{i}"]["bias"])
        conv_block(dec, params[f"dec_{i}"])
    net.head.weight.data = t(np.transpose(params["head"]["kernel"], (3, 2, 0, 1)))
    net.head.bias.data = t(params["head"]["bias"])


def torch_stepper(torch, net, x_np, y_np, num_classes: int, channels_last: bool):
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(y_np.astype("int64"))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_dice_ce(torch, net(x), y, num_classes)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises

    return step


def monai_stepper(torch, x_np, y_np, num_classes: int, base: int):
    try:
        from monai.networks.nets import BasicUNet  # noqa: PLC0415
    except ImportError:
        return None, "MONAI not installed"
    f = (base, base, 2 * base, 4 * base, 8 * base, base)
    net = BasicUNet(spatial_dims=2, in_channels=x_np.shape[-1], out_channels=num_classes,
                    features=f)
    n = sum(p.numel() for p in net.parameters())
    return torch_stepper(torch, net, x_np, y_np, num_classes, False), f"{n:,} params"


# --------------------------------------------------------------------------------------
# JAX side and checks.


@contextlib.contextmanager
def flax_reference_layers():
    """medseg_jax's U-Net built with nn.ConvTranspose and nn.max_pool (same parameters)."""
    import flax.linen as nn  # noqa: PLC0415

    from medseg_jax.models import layers  # noqa: PLC0415

    saved = layers.up_conv, layers.max_pool
    layers.up_conv = lambda f, d, dtype, name=None: nn.ConvTranspose(
        f, (2,) * d, strides=(2,) * d, padding="VALID", dtype=dtype, name=name)
    layers.max_pool = lambda x, d: nn.max_pool(x, (2,) * d, strides=(2,) * d)
    try:
        yield
    finally:
        layers.up_conv, layers.max_pool = saved


def jax_setup(x_np, y_np):
    import jax  # noqa: PLC0415

    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import sharding, train  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415

    config = config_lib.default_config()
    config.model.base_features, config.model.depth = FLAGS.base_features, FLAGS.depth
    config.data.image_size = (FLAGS.image_size, FLAGS.image_size)
    config.train.batch_size = FLAGS.batch_size
    config.augment.enabled = False  # PyTorch's step has none either
    config_lib.validate(config)
    state_lib.setup_compilation_cache(config)
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = state_lib.build_model(config, FLAGS.num_classes)
    state = state_lib.init_state(config, model, x_np.shape, 1000, mesh)
    train_fn, _ = train.jit_steps(config, mesh, FLAGS.num_classes)
    batch = sharding.to_global({"image": x_np, "label": y_np}, mesh)
    params = jax.device_get(state.params)
    holder = {"state": state}

    def step():
        holder["state"], out = train_fn(holder["state"], batch)
        return float(jax.device_get(out["loss"]))

    return model, params, state.batch_stats, step


def jax_conv_flops(model, variables, x_np) -> float:
    """FLOPs of the convolutions and matmuls of the JAX forward pass (from its jaxpr)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    def fwd(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0]

    total = 0.0

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *window) axes
                k = np.prod([rhs[d] for d in spec[1:]])  # in-features x kernel window
                total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
            elif eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
                    [lhs[d] for d in lc])
            for p in eqn.params.values():  # nested jaxprs (pjit, custom_vjp, remat)
                if hasattr(p, "eqns"):
                    walk(p)
                elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                    walk(p.jaxpr)

    walk(jax.make_jaxpr(fwd)(variables, x_np).jaxpr)
    return total


def check_same_network(torch, model, params, batch_stats, x_np) -> list[str]:
    """Parameter count, convolution FLOPs and logits of the two implementations."""
    import numpy as np  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from medseg_jax.models import count_params  # noqa: PLC0415

    net = torch_unet(torch, x_np.shape[-1], FLAGS.num_classes, FLAGS.base_features,
                     FLAGS.depth)
    n_jax, n_torch = count_params(params), sum(p.numel() for p in net.parameters())
    variables = {"params": params, "batch_stats": batch_stats}
    f_jax = jax_conv_flops(model, variables, x_np)
    x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    with FlopCounterMode(display=False) as counter:
        net(x_t)
    f_torch = float(counter.get_total_flops())
    load_jax_weights(torch, net, params)
    net.train()
    with torch.no_grad():
        logits_t = net(x_t).numpy().transpose(0, 2, 3, 1)
    logits_j = np.asarray(model.apply(variables, x_np, train=True, mutable=["batch_stats"])[0])
    err = float(np.abs(logits_t - logits_j).max() / max(np.abs(logits_j).max(), 1e-12))
    checks = [("parameters", n_jax == n_torch, f"{n_jax:,} (JAX) / {n_torch:,} (PyTorch)"),
              ("forward conv+matmul FLOPs", abs(f_jax - f_torch) <= 1e-6 * f_torch,
               f"{f_jax / 1e9:.3f} / {f_torch / 1e9:.3f} GFLOP"),
              ("logits, same weights (train mode)", err < 1e-4,
               f"max relative difference {err:.1e}")]
    lines = [f"  {'ok  ' if ok else 'FAIL'} {name}: {text}" for name, ok, text in checks]
    if not all(ok for _, ok, _ in checks):
        print("\n".join(lines))
        raise SystemExit("the two networks differ: no timing")
    return lines


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise SystemExit("PyTorch is not installed: pip install -e '.[torch]' "
                         "(torch==2.13.0)") from None
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    x_np = rng.standard_normal((FLAGS.batch_size, size, size, 1)).astype(np.float32)
    y_np = rng.integers(0, FLAGS.num_classes, (FLAGS.batch_size, size, size)).astype(np.int32)

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    print(f"network: U-Net 2D, base {FLAGS.base_features}, depth {FLAGS.depth}, BatchNorm, "
          f"{FLAGS.num_classes} classes; batch {FLAGS.batch_size} x {size}x{size} x 1; "
          "Dice + CE; Adam 1e-3; float32")
    model, params, batch_stats, jax_step = jax_setup(x_np, y_np)
    for line in check_same_network(torch, model, params, batch_stats, x_np):
        print(line)

    torch.manual_seed(0)
    steppers = {"medseg_jax (jit)": jax_step}
    if FLAGS.flax_reference:
        with flax_reference_layers():  # traced and compiled while the layers are swapped
            _, _, _, reference_step = jax_setup(x_np, y_np)
            reference_step()
        steppers["JAX, Flax nn.ConvTranspose + nn.max_pool"] = reference_step
    notes = {}
    for variant in FLAGS.torch_variants:
        if variant == "monai":
            step, note = monai_stepper(torch, x_np, y_np, FLAGS.num_classes,
                                       FLAGS.base_features)
            notes["PyTorch MONAI BasicUNet"] = note
            if step:
                steppers["PyTorch MONAI BasicUNet"] = step
            continue
        net = torch_unet(torch, 1, FLAGS.num_classes, FLAGS.base_features, FLAGS.depth)
        name = f"PyTorch eager{' channels-last' if variant == 'channels_last' else ''}"
        steppers[name] = torch_stepper(torch, net, x_np, y_np, FLAGS.num_classes,
                                       variant == "channels_last")
    t0 = time.perf_counter()
    jax_step()
    print(f"medseg_jax first step (compilation, or the persistent cache): "
          f"{time.perf_counter() - t0:.1f} s")
    for step in steppers.values():
        for _ in range(FLAGS.warmup):
            step()
    times = {name: [] for name in steppers}
    for _ in range(FLAGS.rounds):
        for name, step in steppers.items():
            for _ in range(FLAGS.steps):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    jax_median = statistics.median(times["medseg_jax (jit)"])
    print(f"\n{FLAGS.rounds} interleaved rounds x {FLAGS.steps} steps each (median, "
          f"device-synchronised):")
    print("| implementation | ms/step | images/s | medseg_jax / this |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / jax_median
        print(f"| {name} | {1e3 * med:.0f} | {FLAGS.batch_size / med:.1f} | {ratio:.2f} |")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    print(f"end: load average {os.getloadavg()[0]:.2f} (a shared CPU: figures vary)")


if __name__ == "__main__":
    app.run(main)
