"""What verifying a checkpoint costs: the digest written after each save and checked
before each restore (``checkpoint.write_digest`` / ``checkpoint.verify_digest``).

Saves real checkpoints through ``checkpoint.Checkpointer``: the TrainState (params,
BatchNorm statistics, Adam moments) of configs/unet.py as initialised (its zero Adam
moments compress: 1.8 MB on disk; trained, about 5.5 MB), and random float32 states of
about 5.5, 100 and 500 MB (incompressible); then times writing and verifying
the digest with SHA-256 and BLAKE2b (median of --repeats, files in the page cache,
as right after a save; a cold read adds the disk's read time). The choice in
``checkpoint.DIGEST_ALGORITHM`` follows from these numbers.

Usage: python benchmarks/checkpoint_digest.py [--repeats=5] [--sizes_mb=5.5,100,500]

Measured (2026-12, this 2-core CPU with SHA extensions, shared with other work):
5.5 MB (5.1 MB on disk): verify 4-6 ms with SHA-256 or BLAKE2b (file opening dominates);
100 MB (92 MB on disk): 62 ms / 112-117 ms; 500 MB: 310 ms / 568 ms (about 1.5 GB/s and
0.8 GB/s); writing the digest costs the same. SHA-256 is chosen: twice as fast on CPUs with SHA
extensions (most x86 since 2017-2019, ARMv8); without them BLAKE2b would be ~1.5x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import sharding
from medseg_jax import state as state_lib
from medseg_jax import timing


def unet_state():
    import runpy

    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "configs",
                                         "unet.py"))["get_config"]()
    mesh = sharding.make_mesh()
    return state_lib.initialize(config, 2, 1, 100, mesh).state


def random_state(megabytes: float):
    rng = np.random.default_rng(0)
    n = int(megabytes * 2**20) // 4 // 16
    return {f"w{i:02d}": jax.numpy.asarray(rng.standard_normal(n, dtype=np.float32))
            for i in range(16)}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def median_ms(fn, repeats: int) -> float:
    return 1000 * timing.StepTimer().time(fn, repeats)


def measure(state, name: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ck = ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"))
        ck.save(1, state, {"epoch": 0}, {"val_dice": 0.5})
        ck.close()  # waits for the save, writes the digest
        folder = os.path.join(tmp, "checkpoints", "1")
        size = folder_bytes(folder)
        row = {"state": name, "megabytes": round(size / 2**20, 1)}
        original = ckpt_lib.DIGEST_ALGORITHM
        try:
            for algorithm in ("sha256", "blake2b"):
                ckpt_lib.DIGEST_ALGORITHM = algorithm
                write = median_ms(lambda: ckpt_lib.write_digest(folder), repeats)
                verify = median_ms(lambda: ckpt_lib.verify_digest(folder), repeats)
                row[algorithm] = {"write_ms": round(write, 1), "verify_ms": round(verify, 1),
                                  "MB_per_s": round(size / 2**20 / (verify / 1000))}
        finally:
            ckpt_lib.DIGEST_ALGORITHM = original
            ckpt_lib.write_digest(folder)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes_mb", default="5.5,100,500")
    args = parser.parse_args()
    rows = [measure(unet_state(), "configs/unet.py TrainState", args.repeats)]
    for mb in (float(x) for x in args.sizes_mb.split(",") if x):
        rows.append(measure(random_state(mb), f"random float32, {mb} MB", args.repeats))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
