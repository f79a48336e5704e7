"""Command line of the OpenKBP converter: flags, ``main`` and the printed summary.

``python -m medseg_jax.tools.convert_openkbp --src=../shared/data/OpenKBP --dst=/tmp/OpenKBP``

The conversion itself (format, volumes, affine, labels, checks) is
``medseg_jax.data.openkbp``; read its docstring for the output. Bad input ends
with one line ``convert_openkbp: error: <file>: <what is wrong>`` and exit
status 1; ``dst`` is then left as it was.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from medseg_jax.data import openkbp


def define_flags() -> None:
    """The command's flags (defined on demand, as in the other tools)."""
    flags.DEFINE_string("src", None, "OpenKBP folder (train-pats/, validation-pats/).")
    flags.DEFINE_string("dst", None, "Decathlon folder to write.")
    flags.DEFINE_integer("limit", None, "Convert only the first N patients (train first, then "
                         "validation, by patient number).")
    flags.DEFINE_list("only", None, "Convert only these patients, e.g. pt_1,pt_201.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty dst not written by this tool.")
    flags.mark_flags_as_required(["src", "dst"])


def describe(summary: dict) -> str:
    """The summary as a few printed lines."""
    pairs = ", ".join(f"{pair} {s['patients']}" for pair, s in summary["overlap_pairs"].items())
    organs = ", ".join(f"{o} {n}" for o, n in summary["contoured_patients"].items())
    splits = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
    disagree = summary["orientation_disagree"]
    unchecked = summary["orientation_unchecked"]
    return "\n".join([
        f"wrote {summary['num_cases']} cases ({splits}) to {summary['dst']} in "
        f"{summary['seconds']:.1f} s, {summary['output_bytes'] / 1e6:.1f} MB",
        f"contoured patients: {organs}",
        f"overlapping contours in {summary['patients_with_overlap']} patients: {pairs or 'none'} "
        f"(priority {', '.join(summary['overlap_priority'])})",
        f"orientation: {summary['orientation_agree']} of {summary['num_cases']} agree"
        + (f"; disagree: {', '.join(disagree)}" if disagree else "")
        + (f"; {len(unchecked)} without organs to check" if unchecked else ""),
        f"CT values {summary['ct_value_min']:g}..{summary['ct_value_max']:g} "
        f"({summary['ct_clipped_voxels']} voxels in {summary['ct_clipped_patients']} patients "
        f"clipped to {openkbp.CT_MAX}); HU {summary['hu_min']}..{summary['hu_max']}",
    ])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().setFormatter(None)
    fl = flags.FLAGS
    try:
        summary = openkbp.convert(fl.src, fl.dst, limit=fl.limit, only=fl.only,
                                  overwrite=fl.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError) as e:
        print(f"convert_openkbp: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    print(describe(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
