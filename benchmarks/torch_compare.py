"""medseg_jax's U-Net training step against the same network in PyTorch, in one run.

Builds medseg_jax's 2D U-Net (``state_lib.initialize``, stepped by the package's own jitted
``train_step``, augmentation off) and the same network in PyTorch: the same layers
(3x3 conv without bias -> BatchNorm -> ReLU, twice per block; 2x2 max-pool; 2x2
stride-2 transposed conv with bias; skip concatenation; 1x1 head), the same Dice + CE
loss and Adam. Before timing it checks that the two have the same parameter count, the
same convolution FLOPs (PyTorch's FlopCounterMode against the convolutions and matmuls
of the JAX program) and, with the JAX weights copied into PyTorch, the same logits.
Then it times both on the same inputs and batch, interleaved round by round (eager
NCHW, eager channels-last, MONAI BasicUNet when MONAI is installed), and prints the
median step time, images/s and the ratio medseg_jax / PyTorch (> 1: JAX is faster).

Variants. JAX (``--jax_variants``, ``dtype[:layer_impl]``): ``float32``, ``bfloat16``
(mixed precision, ``model.dtype``), with ``:reshape`` / ``:lax`` for ``model.layer_impl``
(``:lax`` is what Flax's ``nn.ConvTranspose`` / ``nn.max_pool`` compute). PyTorch
(``--torch_variants``): ``eager`` (NCHW), ``channels_last``, ``eager_bf16`` /
``channels_last_bf16`` (bf16 autocast for the forward pass; loss, gradients and Adam in
float32, as JAX's mixed precision), ``compile`` / ``compile_bf16`` (``torch.compile`` of the
channels-last network, ``--torch_compile_backend``), ``monai``. ``--dtype=bfloat16`` switches
the defaults of both lists to the bf16 variants. A variant that fails (``torch.compile``
without a compiler, say) is reported and left out; the others are still timed.

``--device=cuda`` runs both on the GPU (JAX on its GPU backend): the checks run at full
float32 precision (no TF32), the timing in each framework's default (TF32 convolutions in
both; cuDNN autotuning on in PyTorch, as XLA autotunes); every step ends with the loss
fetched to the host, which synchronises the device in both frameworks. ``--json_out``
writes every figure as JSON (``benchmarks/gpu_suite.py`` reads it).

PyTorch is an optional extra, never a dependency of the package:

  pip install -e '.[torch]'        # torch==2.13.0, the CPU build cached on these machines
  python benchmarks/torch_compare.py                       # base 32, batch 16, 128x128
  python benchmarks/torch_compare.py --base_features=16 --image_size=64 --rounds=3
  python benchmarks/torch_compare.py --dtype=bfloat16      # JAX bf16 vs PyTorch bf16 autocast
  python benchmarks/torch_compare.py --device=cuda --image_size=256 --batch_size=32 \
      --jax_variants=float32,bfloat16 --torch_variants=eager,channels_last_bf16,compile_bf16
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

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
flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"],
                  "Where both frameworks run: cpu, or cuda (JAX on its GPU backend).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Default variant lists: float32, or bfloat16 (JAX model.dtype=bfloat16, "
                  "PyTorch bf16 autocast). Explicit --jax_variants / --torch_variants win.")
flags.DEFINE_list("jax_variants", None,
                  "JAX steps, dtype[:layer_impl] (float32 | bfloat16; auto | reshape | lax); "
                  "the first is the reference of the ratio column. Default: float32, "
                  "float32:lax (bfloat16, bfloat16:lax with --dtype=bfloat16).")
flags.DEFINE_list("torch_variants", None,
                  "PyTorch steps: eager, channels_last, eager_bf16, channels_last_bf16, compile, "
                  "compile_bf16, monai (skipped if absent). Default: eager, channels_last, "
                  "monai (channels_last_bf16, eager_bf16 with --dtype=bfloat16).")
flags.DEFINE_string("torch_compile_backend", "inductor",
                    "torch.compile backend for the compile variants (aot_eager: no code "
                    "generation, for a quick check of the path).")
flags.DEFINE_string("torch_compile_mode", "default", "torch.compile mode.")
flags.DEFINE_bool("xla_cpu_ynn", False,
                  "As the config's train.xla_cpu_ynn: False (the default) sets the XLA:CPU "
                  "flag training sets (YNNPACK for reductions only; sharding.set_cpu_flags), "
                  "True keeps XLA's defaults. An XLA_FLAGS naming the YNN flag wins.")
flags.DEFINE_string("json_out", "", "Also write all figures to this JSON file.")

TORCH_VARIANTS = ("eager", "channels_last", "eager_bf16", "channels_last_bf16", "compile",
                  "compile_bf16", "monai")


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


def torch_stepper(torch, net, x_np, y_np, num_classes: int, channels_last: bool,
                  device: str = "cpu", bf16: bool = False, compile_backend: str = "",
                  compile_mode: str = "default"):
    """One PyTorch training step (forward, Dice + CE, backward, Adam) as a function that
    returns the loss as a float (which waits for the device)."""
    dev = torch.device(device)
    net = net.to(dev)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(dev)
    y = torch.from_numpy(y_np.astype("int64")).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    forward = (torch.compile(net, backend=compile_backend, mode=compile_mode)
               if compile_backend else net)

    def autocast():
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = forward(x)
        loss = torch_dice_ce(torch, logits, y, num_classes)  # float32, as in JAX
        loss.backward()
        opt.step()
        return loss.item()  # synchronises (the device too)

    return step


def monai_stepper(torch, x_np, y_np, num_classes: int, base: int, device: str = "cpu"):
    try:
        from monai.networks.nets import BasicUNet  # noqa: PLC0415
    except ImportError:
        return None, "MONAI not installed"
    f = (base, base, 2 * base, 4 * base, 8 * base, base)
    net = BasicUNet(spatial_dims=2, in_channels=x_np.shape[-1], out_channels=num_classes,
                    features=f)
    n = sum(p.numel() for p in net.parameters())
    return (torch_stepper(torch, net, x_np, y_np, num_classes, False, device),
            f"{n:,} params")


# --------------------------------------------------------------------------------------
# JAX side and checks.


def parse_jax_variant(text: str) -> tuple[str, str]:
    """'bfloat16:lax' -> ('bfloat16', 'lax'); the layer_impl defaults to 'auto'."""
    dtype, _, impl = text.strip().partition(":")
    impl = impl or "auto"
    if dtype not in ("float32", "bfloat16") or impl not in ("auto", "reshape", "lax"):
        raise app.UsageError(f"--jax_variants: {text!r} is not dtype[:layer_impl] with dtype "
                             "float32 | bfloat16 and layer_impl auto | reshape | lax")
    return dtype, impl


def jax_setup(x_np, y_np, dtype: str = "float32", layer_impl: str = "auto"):
    import jax  # noqa: PLC0415

    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415

    config = config_lib.default_config()
    config.model.base_features, config.model.depth = FLAGS.base_features, FLAGS.depth
    config.model.dtype, config.model.layer_impl = dtype, layer_impl
    config.data.image_size = (FLAGS.image_size, FLAGS.image_size)
    config.train.batch_size = FLAGS.batch_size
    config.augment.enabled = False  # PyTorch's step has none either
    config_lib.validate(config)
    state_lib.setup_compilation_cache(config)
    mesh = sharding.make_mesh(jax.devices()[:1])
    setup = state_lib.initialize(config, FLAGS.num_classes, x_np.shape[-1], 1000, mesh)
    state, train_fn = setup.state, setup.train_fn
    batch = sharding.to_global({"image": x_np, "label": y_np}, mesh)
    params = jax.device_get(state.params)
    holder = {"state": state}

    def step():
        holder["state"], out = train_fn(holder["state"], batch)
        return float(jax.device_get(out["loss"]))

    return setup.model, params, state.batch_stats, step


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


def check_same_network(torch, model, params, batch_stats, x_np) -> list[tuple]:
    """Parameter count, convolution FLOPs and logits of the two implementations, on
    ``--device`` at full float32 precision (TF32 off in both frameworks for the logits)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from medseg_jax.models import count_params  # noqa: PLC0415

    dev = torch.device(FLAGS.device)
    net = torch_unet(torch, x_np.shape[-1], FLAGS.num_classes, FLAGS.base_features,
                     FLAGS.depth)
    n_jax, n_torch = count_params(params), sum(p.numel() for p in net.parameters())
    variables = {"params": params, "batch_stats": batch_stats}
    f_jax = jax_conv_flops(model, variables, x_np)
    load_jax_weights(torch, net, params)
    net = net.to(dev)
    x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(dev)
    net.train()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x_t)
    f_torch = float(counter.get_total_flops())
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.reset_running_stats()  # the FLOP pass above updated them
        with torch.no_grad():
            logits_t = net(x_t).cpu().numpy().transpose(0, 2, 3, 1)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    with jax.default_matmul_precision("highest"):
        logits_j = np.asarray(model.apply(variables, x_np, train=True,
                                          mutable=["batch_stats"])[0])
    err = float(np.abs(logits_t - logits_j).max() / max(np.abs(logits_j).max(), 1e-12))
    checks = [("parameters", n_jax == n_torch, f"{n_jax:,} (JAX) / {n_torch:,} (PyTorch)"),
              ("forward conv+matmul FLOPs", abs(f_jax - f_torch) <= 1e-6 * f_torch,
               f"{f_jax / 1e9:.3f} / {f_torch / 1e9:.3f} GFLOP"),
              # cuDNN's float32 algorithms round differently from XLA's: 1e-3 there.
              ("logits, same weights (train mode)",
               err < (1e-3 if FLAGS.device == "cuda" else 1e-4),
               f"max relative difference {err:.1e}")]
    checks = [(name, bool(ok), text) for name, ok, text in checks]
    for name, ok, text in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {text}")
    if not all(ok for _, ok, _ in checks):
        write_json({"checks": [dict(zip(("name", "ok", "text"), c)) for c in checks],
                    "error": "the two networks differ: no timing"})
        raise SystemExit("the two networks differ: no timing")
    return checks


def write_json(payload: dict) -> None:
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        tmp = FLAGS.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, FLAGS.json_out)


def variant_lists() -> tuple[list[str], list[str]]:
    bf16 = FLAGS.dtype == "bfloat16"
    jax_variants = FLAGS.jax_variants or (["bfloat16", "bfloat16:lax"] if bf16 else
                                          ["float32", "float32:lax"])
    torch_variants = FLAGS.torch_variants
    if torch_variants is None:
        torch_variants = (["channels_last_bf16", "eager_bf16"] if bf16 else
                          ["eager", "channels_last", "monai"])
    unknown = [v for v in torch_variants if v not in TORCH_VARIANTS]
    if unknown:
        raise app.UsageError(f"--torch_variants: unknown {', '.join(unknown)}; valid: "
                             f"{', '.join(TORCH_VARIANTS)}")
    return jax_variants, torch_variants


def torch_variant_name(variant: str) -> str:
    names = {"eager": "PyTorch eager", "channels_last": "PyTorch eager channels-last",
             "eager_bf16": "PyTorch eager, bf16 autocast",
             "channels_last_bf16": "PyTorch channels-last, bf16 autocast",
             "compile": "PyTorch torch.compile channels-last",
             "compile_bf16": "PyTorch torch.compile channels-last, bf16 autocast",
             "monai": "PyTorch MONAI BasicUNet"}
    name = names[variant]
    if variant.startswith("compile") and FLAGS.torch_compile_backend != "inductor":
        name += f" (backend {FLAGS.torch_compile_backend})"
    return name


def jax_variant_name(dtype: str, impl: str) -> str:
    return f"medseg_jax (jit) {dtype}" + ("" if impl == "auto" else f", layer_impl={impl}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    jax_variants, torch_variants = variant_lists()
    jax_parsed = [parse_jax_variant(v) for v in jax_variants]
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        write_json({"skipped": "PyTorch is not installed (pip install -e '.[torch]')"})
        raise SystemExit("PyTorch is not installed: pip install -e '.[torch]' "
                         "(torch==2.13.0)") from None
    import jax  # noqa: PLC0415

    if FLAGS.device == "cpu":
        from medseg_jax import config as config_lib, sharding  # noqa: PLC0415

        jax.config.update("jax_platforms", "cpu")  # also on a machine with a GPU
        cpu_config = config_lib.default_config()
        cpu_config.train.xla_cpu_ynn = FLAGS.xla_cpu_ynn
        sharding.set_cpu_flags(cpu_config)  # before the backend starts, as training does
    elif not torch.cuda.is_available() or jax.default_backend() != "gpu":
        raise SystemExit(f"--device=cuda: PyTorch CUDA {torch.cuda.is_available()}, JAX "
                         f"backend {jax.default_backend()}: both need the GPU")
    import numpy as np  # noqa: PLC0415
    from medseg_jax import timing  # noqa: PLC0415
    from medseg_jax import workdir as workdir_lib  # noqa: PLC0415

    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    x_np = rng.standard_normal((FLAGS.batch_size, size, size, 1)).astype(np.float32)
    y_np = rng.integers(0, FLAGS.num_classes, (FLAGS.batch_size, size, size)).astype(np.int32)

    dev = jax.devices()[0]
    torch_device = (torch.cuda.get_device_name(0) if FLAGS.device == "cuda" else
                    f"CPU, {torch.get_num_threads()} threads")
    load_start = os.getloadavg()
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} CPU cores ({workdir_lib.cpu_model()}), load average "
          f"{load_start[0]:.2f}; jax {jax.__version__} on {dev.device_kind}; torch "
          f"{torch.__version__} on {torch_device}")
    if FLAGS.device == "cpu":
        print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '') or '(none: XLA defaults)'}")
    print(f"network: U-Net 2D, base {FLAGS.base_features}, depth {FLAGS.depth}, BatchNorm, "
          f"{FLAGS.num_classes} classes; batch {FLAGS.batch_size} x {size}x{size} x 1; "
          "Dice + CE; Adam 1e-3")
    report = {"command": command,
              "machine": {"cpu": workdir_lib.cpu_model(), "cores": os.cpu_count(),
                          "load_start": list(load_start), "jax": jax.__version__,
                          "jax_device": dev.device_kind, "torch": torch.__version__,
                          "torch_device": torch_device, "device": FLAGS.device},
              "network": {"base_features": FLAGS.base_features, "depth": FLAGS.depth,
                          "image_size": size, "batch_size": FLAGS.batch_size,
                          "num_classes": FLAGS.num_classes}}
    # The checks use a float32 model (parameters do not depend on the compute dtype).
    model, params, batch_stats, _ = jax_setup(x_np, y_np)
    checks = check_same_network(torch, model, params, batch_stats, x_np)
    report["checks"] = [dict(zip(("name", "ok", "text"), c)) for c in checks]
    write_json(report)
    if FLAGS.device == "cuda":
        torch.backends.cudnn.benchmark = True  # XLA autotunes its convolutions too
    report["machine"]["torch_settings"] = {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}

    torch.manual_seed(0)
    steppers, notes, first_step = {}, {}, {}
    for dtype, impl in jax_parsed:
        steppers[jax_variant_name(dtype, impl)] = jax_setup(x_np, y_np, dtype, impl)[3]
    for variant in torch_variants:
        name = torch_variant_name(variant)
        if variant == "monai":
            step, note = monai_stepper(torch, x_np, y_np, FLAGS.num_classes,
                                       FLAGS.base_features, FLAGS.device)
            notes[name] = note
            if step:
                steppers[name] = step
            continue
        net = torch_unet(torch, 1, FLAGS.num_classes, FLAGS.base_features, FLAGS.depth)
        compiled = variant.startswith("compile")
        steppers[name] = torch_stepper(
            torch, net, x_np, y_np, FLAGS.num_classes,
            channels_last=variant != "eager" and variant != "eager_bf16",
            device=FLAGS.device, bf16=variant.endswith("bf16"),
            compile_backend=FLAGS.torch_compile_backend if compiled else "",
            compile_mode=FLAGS.torch_compile_mode)
    for name in list(steppers):
        try:  # compilation (JAX: or the persistent cache), cuDNN autotuning
            _, first_step[name] = timing.timed(steppers[name])
        except Exception as e:  # noqa: BLE001 (torch.compile without a compiler, say)
            notes[name] = f"failed, left out: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"{name}: {notes[name]}")
            del steppers[name]
            continue
        print(f"{name}: first step (compilation, autotuning) {first_step[name]:.1f} s")
    report["first_step_s"], report["notes"] = first_step, notes
    write_json(report)
    if not steppers:
        raise SystemExit("no variant ran")
    for step in steppers.values():
        for _ in range(FLAGS.warmup):
            step()
    timers = {name: timing.StepTimer() for name in steppers}
    for _ in range(FLAGS.rounds):
        for name, step in steppers.items():
            for _ in range(FLAGS.steps):
                timers[name].call(step)
    reference = next(iter(steppers))
    ref_median = timers[reference].median()
    print(f"\n{FLAGS.rounds} interleaved rounds x {FLAGS.steps} steps each (median, "
          f"device-synchronised):")
    print(f"| implementation | ms/step | images/s | {reference} / this (speed) |")
    print("|---|---|---|---|")
    results = []
    for name, timer in timers.items():
        med = timer.median()
        results.append({"name": name, "framework": "jax" if name.startswith("medseg_jax")
                         else "torch", "step_ms": 1e3 * med,
                         "images_per_s": FLAGS.batch_size / med,
                         "ref_speed_ratio": med / ref_median,
                         "times_ms": [1e3 * t for t, _ in timer.windows]})
        print(f"| {name} | {1e3 * med:.0f} | {FLAGS.batch_size / med:.1f} | "
              f"{med / ref_median:.2f} |")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    load_end = os.getloadavg()
    print(f"end: load average {load_end[0]:.2f} (a shared CPU: figures vary)")
    report.update(reference=reference, results=results, rounds=FLAGS.rounds,
                  steps=FLAGS.steps)
    report["machine"]["load_end"] = list(load_end)
    write_json(report)


if __name__ == "__main__":
    app.run(main)
