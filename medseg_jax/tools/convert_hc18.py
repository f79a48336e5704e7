"""Command line: convert the HC18 challenge's training set into a Decathlon folder.

``python -m medseg_jax.tools.convert_hc18 --src=../shared/data/HC18 --dst=/tmp/HC18_decathlon
[--limit=N] [--only=186_HC,010_2HC] [--overwrite]``; what it writes: ``medseg_jax/data/hc18.py``.
"""

from __future__ import annotations

import sys

from absl import logging

from medseg_jax.data.hc18 import convert


def _define_flags() -> None:
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("src", None, "HC18 folder (training_set/ and the pixel size CSV).")
    flags.DEFINE_string("dst", None, "Decathlon folder to write.")
    flags.DEFINE_integer("limit", None, "Convert only the first N images (file-number order).")
    flags.DEFINE_list("only", None, "Convert only these images, e.g. 186_HC,010_2HC.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty dst not written by this tool.")
    flags.mark_flags_as_required(["src", "dst"])


def main(argv: list[str]) -> None:
    from absl import app, flags  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().setFormatter(None)
    fl = flags.FLAGS
    try:
        summary = convert(fl.src, fl.dst, limit=fl.limit, only=fl.only, overwrite=fl.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError) as e:
        print(f"convert_hc18: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"wrote {summary['num_cases']} cases to {summary['dst']} in {summary['seconds']:.1f} s; "
        f"head circumference of the masks vs the CSV: median relative error "
        f"{100 * summary['hc_rel_error_median']:.3f}%, max "
        f"{100 * summary['hc_rel_error_max']:.3f}% ({summary['hc_rel_error_max_image']}), "
        f"{len(summary['hc_over_5_percent'])} above 5% (outlines: median "
        f"{100 * summary['hc_outline_rel_error_median']:.4f}%, max "
        f"{100 * summary['hc_outline_rel_error_max']:.4f}%); filled by ellipse fit: "
        f"{', '.join(summary['ellipse_fit']) or 'none'}"
    )


def run() -> None:
    from absl import app  # noqa: PLC0415

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
