"""Human-readable tables of evaluation results."""

from __future__ import annotations

import math

_COLUMNS = (("dice", "Dice", 4), ("iou", "IoU", 4), ("hd95", "HD95 (mm)", 2),
            ("hd", "HD (mm)", 2), ("assd", "ASSD (mm)", 2))


def _cell(stats: dict, digits: int) -> str:
    mean, std = stats.get("mean", math.nan), stats.get("std", math.nan)
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if stats.get("n_nan"):
        text += f" ({stats['n_nan']} undef.)"
    return text


def metrics_table(groups: dict[str, dict], title: str = "") -> str:
    """Markdown table: one row per (group, class), mean ± std over cases.

    ``groups`` maps a group name ("all", a task name, ...) to
    ``metrics.aggregate`` output {class: {metric: {mean, std, median, n, n_nan}}}.
    """
    header = ["data", "class", "cases"] + [name for _, name, _ in _COLUMNS]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, classes in groups.items():
        for cls, stats in classes.items():
            n = stats.get("dice", {}).get("n", 0) + stats.get("dice", {}).get("n_nan", 0)
            row = [group, cls, str(n)] + [_cell(stats.get(key, {}), d) for key, _, d in _COLUMNS]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "mean ± std over cases; distances in mm from the voxel spacing; "
              "'undef.' counts cases where exactly one of prediction and reference is "
              "empty (distances undefined, left out of the mean)."]
    return "\n".join(lines) + "\n"
