"""Where XLA's CPU backend spends medseg_jax's train step: thread time per op and per op
kind, from a jax.profiler trace (the thunk events), plus wall and process CPU time.

  python benchmarks/xla_cpu_profile.py [--layer_impl=auto] [--dtype=float32] [--top=25]
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/xla_cpu_profile.py

U-Net 2D base 32, 128x128, batch 16, augmentation off: torch_compare.py's network. With
``XLA_FLAGS=--xla_dump_to=DIR`` the optimised HLO names each fusion (e.g. ynn_fusion.88).
"""

import argparse
import collections
import glob
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layer_impl", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax._src.profiler import ProfileData  # noqa: PLC0415

    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import sharding  # noqa: PLC0415
    from medseg_jax import state as state_lib  # noqa: PLC0415
    from medseg_jax import timing  # noqa: PLC0415

    config = config_lib.default_config()
    config.model.base_features, config.model.depth = 32, 4
    config.model.layer_impl, config.model.dtype = args.layer_impl, args.dtype
    config.data.image_size, config.train.batch_size = (128, 128), 16
    config.augment.enabled = False
    mesh = sharding.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 128, 128, 1)).astype(np.float32)
    y = rng.integers(0, 2, (16, 128, 128)).astype(np.int32)
    setup = state_lib.initialize(config, 2, 1, 1000, mesh)
    state, step = setup.state, setup.train_fn
    batch = sharding.to_global({"image": x, "label": y}, mesh)
    # The same steps on two clocks: wall time and the process's CPU time.
    wall, cpu = timing.StepTimer(warmup=2), timing.StepTimer(warmup=2, clock=time.process_time)

    def one_step(state):
        state, out = step(state, batch)
        jax.block_until_ready(out)
        return state, out

    for _ in range(2 + args.steps):
        state, out = cpu.call(lambda state=state: wall.call(lambda: one_step(state)))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.2f}")
    print(f"step: wall {1e3 * wall.median():.0f} ms, process CPU "
          f"{1e3 * cpu.median():.0f} ms (cores busy: "
          f"{cpu.median() / wall.median():.2f})")
    trace = tempfile.mkdtemp(prefix="xla_cpu_profile_")
    with jax.profiler.trace(trace):
        for _ in range(2):
            state, out = step(state, batch)
            jax.block_until_ready(out)
    data = ProfileData.from_file(glob.glob(f"{trace}/**/*.xplane.pb", recursive=True)[0])
    per_op, per_kind = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # the backend's worker threads
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    continue
                per_op[ev.name] += ev.duration_ns / 2
                per_kind[ev.name.split(".")[0]] += ev.duration_ns / 2
    total = sum(per_kind.values()) or 1
    print("thread time per step, by kind (both threads):")
    for name, ns in per_kind.most_common(args.top):
        print(f"  {ns / 1e6:8.1f} ms {100 * ns / total:5.1f}%  {name}")
    print("by op:")
    for name, ns in per_op.most_common(args.top):
        print(f"  {ns / 1e6:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
