"""Command line: check Decathlon / nnU-Net data folders before training.

``python -m medseg_jax.tools.check_data --root=/path/to/Task04_Hippocampus [--root=...]``
prints one line per problem, then a summary; exits 1 if there is any error. What is
checked: ``medseg_jax/data/check.py``.
"""

from __future__ import annotations

import sys

from medseg_jax.data import decathlon
from medseg_jax.data.check import check


def _main(argv: list[str]) -> int:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    roots = decathlon.split_roots(flags.FLAGS.root or [])
    if not roots:
        raise app.UsageError("--root is required")

    def progress(message: str) -> None:
        print(f"[check] {message}", file=sys.stderr, flush=True)

    report = check(roots, workers=flags.FLAGS.workers, progress=progress)
    for problem in report.problems:
        print(problem)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


def run() -> None:
    """Command-line entry point (flags are defined here, not on import)."""
    from absl import app, flags

    flags.DEFINE_multi_string(
        "root", None, "Data folder with dataset.json; repeat or comma-separate for several.")
    flags.DEFINE_integer("workers", None, "Threads reading cases (default: min(4, CPUs), >= 2).")
    app.run(_main)


if __name__ == "__main__":
    run()
