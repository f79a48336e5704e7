"""Reports of evaluation results: markdown tables, CSV files and figures.

Figures use matplotlib's Agg backend (files only, no display needed). Every
file is written through ``fileio.atomic_path`` (a temporary name, then a
rename), so a report is never left half-written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

from medseg_jax import fileio, metrics
_STATS = ("mean", "std", "median", "ci_low", "ci_high", "n", "n_nan")


def stats_cell(stats: dict, digits: int, ci: bool = False) -> str:
    """``mean ± std`` (``[ci_low, ci_high]`` with ``ci``, ``(n undef.)`` when values were
    skipped), or ``n/a`` when no case had a defined value."""
    mean, std = stats.get("mean", math.nan), stats.get("std", math.nan)
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if ci and math.isfinite(stats.get("ci_low", math.nan)):
        text += f" [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"
    if stats.get("n_nan"):
        text += f" ({stats['n_nan']} undef.)"
    if stats.get("n_not_annotated"):
        text += f" ({stats['n_not_annotated']} not annotated)"
    return text


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def metrics_table(groups: dict[str, dict], title: str = "",
                  nsd_tolerance_mm: float = 1.0) -> str:
    """Markdown table: one row per (group, class), mean ± std over cases.

    ``groups`` maps a group name ("all", a task name, ...) to
    ``metrics.aggregate`` output {class: {metric: {mean, std, median, n, n_nan}}}.
    """
    header = (["data", "class", "cases"] + [m.title for m in metrics.TABLE_METRICS]
              + ["Dice 95% CI"])
    rows = []
    for group, classes in groups.items():
        for cls, stats in classes.items():
            n = stats.get("dice", {}).get("n", 0) + stats.get("dice", {}).get("n_nan", 0)
            row = [group, cls, str(n)] + [stats_cell(stats.get(m.name, {}), m.digits)
                                          for m in metrics.TABLE_METRICS]
            dice = stats.get("dice", {})
            lo, hi = dice.get("ci_low", math.nan), dice.get("ci_high", math.nan)
            digits = metrics.BY_NAME["dice"].digits
            row.append(f"{lo:.{digits}f} to {hi:.{digits}f}" if math.isfinite(lo) else "n/a")
            rows.append(row)
    lines = ([f"### {title}", ""] if title else []) + markdown_table(header, rows)
    lines += ["", "mean ± std over cases; distances in mm from the voxel spacing; NSD: share "
              f"of surface within {nsd_tolerance_mm:g} mm; 95% CI: bootstrap interval of the "
              "mean Dice; 'undef.' counts cases where the metric is undefined (a distance "
              "with one mask empty, or the class absent from both), left out of the mean."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _num(value: float) -> str:
    return "nan" if not math.isfinite(float(value)) else repr(float(value))


def per_case_csv(per_case: list[dict],
                 metric_names: tuple[str, ...] = metrics.METRIC_NAMES) -> str:
    """One row per (case, class): case, task, class, then every metric ('nan' = undefined)."""
    rows = []
    for case in per_case:
        for cls, values in case["metrics"].items():
            rows.append([case["case"], case["task"], cls]
                        + [_num(values[m]) for m in metric_names])
    return csv_text(["case", "task", "class", *metric_names], rows)


SUMMARY_HEADER = ["data", "class", "metric", *_STATS]


def partial_labels(groups: dict[str, dict]) -> bool:
    """Whether some class was not annotated in some case (partial labels)."""
    return any("n_not_annotated" in stats for classes in groups.values()
               for per_metric in classes.values() for stats in per_metric.values())


def summary_rows(groups: dict[str, dict], partial: bool | None = None) -> list[list]:
    """One row per (group, class, metric) of ``metrics.aggregate`` output:
    ``SUMMARY_HEADER`` (mean, std, median, 95% CI, n, n_nan), plus ``n_not_annotated``
    for partially labelled data."""
    partial = partial_labels(groups) if partial is None else partial
    keys = _STATS + (("n_not_annotated",) if partial else ())
    rows = []
    for group, classes in groups.items():
        for cls, per_metric in classes.items():
            for metric, stats in per_metric.items():
                rows.append([group, cls, metric] + [
                    str(stats.get(k, 0)) if k.startswith("n") else _num(stats[k])
                    for k in keys])
    return rows


def summary_csv(groups: dict[str, dict]) -> str:
    """One row per (group, class, metric) with mean, std, median, 95% CI, n, n_nan (and
    n_not_annotated for partially labelled data)."""
    partial = partial_labels(groups)
    header = SUMMARY_HEADER + (["n_not_annotated"] if partial else [])
    return csv_text(header, summary_rows(groups, partial))


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def _pyplot():
    import matplotlib  # noqa: PLC0415 (only runs that draw pay for the import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path: str) -> None:
    try:
        with fileio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.rsplit(".", 1)[-1])
    finally:
        _pyplot().close(fig)


def metrics_row(line: str) -> dict | None:
    """One row of ``metrics.jsonl``; None for a blank line or one cut short (no newline:
    a kill or a full disk mid-write) or unreadable."""
    if not line.endswith("\n") or not line.strip():
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # damaged, or nested without end
        return None
    return row if isinstance(row, dict) else None


def read_metrics_log(workdir: str) -> tuple[list[dict], list[dict]]:
    """(per-step rows, per-epoch rows) of a run's ``metrics.jsonl`` (cut lines skipped)."""
    steps, epochs = [], []
    path = os.path.join(workdir, "metrics.jsonl")
    lines = fileio.read_text_lines(path, "the run's log", "move it aside: the next training "
                                   "run starts a new log from its latest checkpoint")
    for row in filter(None, map(metrics_row, lines)):
        # A row names its section; one written before rows did is an epoch's by its keys.
        section = row.get("section", "epoch" if "val_loss" in row else "train")
        (epochs if section == "epoch" else steps).append(row)
    return steps, epochs


def plot_curves(runs: dict[str, str], path: str) -> None:
    """Training loss, validation loss and validation Dice per epoch, one line per run.

    ``runs`` maps a label (e.g. the architecture) to its workdir.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, workdir in runs.items():
        _, epochs = read_metrics_log(workdir)
        x = [r["epoch"] for r in epochs]
        axes[0].plot(x, [r["train_loss"] for r in epochs], label=label)
        axes[1].plot(x, [r["val_loss"] for r in epochs], label=label)
        axes[2].plot(x, [r["val_dice"] for r in epochs], label=label)
    for ax, name in zip(axes, ("training loss", "validation loss", "validation Dice")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    _save(fig, path)


_REFERENCE, _PREDICTION = "lime", "red"
_REFERENCE_RGB, _PREDICTION_RGB = (0, 255, 0), (255, 0, 0)  # the same colours


def _outlines(ax, labels: np.ndarray, color: str, style: str = "solid") -> None:
    """Draws the outline of every foreground class of a 2D label map."""
    for value in np.unique(labels):
        mask = labels == value
        if value != 0 and not mask.all():
            ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=[color],
                       linestyles=style, linewidths=1.1, origin="lower")


def plot_cases(rows: list[dict], path: str, title: str = "") -> None:
    """A grid of slices: one row per case, one overlay column per prediction, then maps.

    Each row is ``{"title", "image" (2D), "gt" (2D labels), "preds": {name: 2D labels},
    "maps": {name: 2D array}}``. Overlays draw the reference outline in green and
    the prediction in red (every class); maps are drawn with the reference
    outline for orientation. Arrays are indexed (x, y), drawn with x to the right
    and y up.
    """
    plt = _pyplot()
    cols = max(len(r["preds"]) + len(r.get("maps", {})) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.1 * cols, 3.3 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        image = row["image"].T
        lo, hi = np.percentile(image, [1, 99])
        panels = [(name, pred, None) for name, pred in row["preds"].items()]
        panels += [(name, None, values) for name, values in row.get("maps", {}).items()]
        for c, (name, pred, values) in enumerate(panels):
            ax = axes[r, c]
            if values is None:
                ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi)
                _outlines(ax, pred, _PREDICTION, "dashed")
            else:
                shown = ax.imshow(values.T, cmap="magma", origin="lower")
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            _outlines(ax, row["gt"], _REFERENCE)
            ax.set_title((row["title"] + "\n" if c == 0 else "\n") + name, fontsize=8,
                         loc="left")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r, len(panels):]:
            ax.axis("off")
    fig.suptitle((title + ": " if title else "")
                 + "reference outline green, prediction red (dashed)", fontsize=9)
    _save(fig, path)


def overlay(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray,
            scale: int = 1) -> np.ndarray:
    """A 2D slice (x, y) drawn upright (y up) as an RGB array, with the reference outline
    in green and the predicted one in red (every class), each pixel repeated ``scale``
    times: the validation overlay a training run logs per epoch (no matplotlib)."""
    from scipy import ndimage  # noqa: PLC0415

    lo, hi = np.percentile(image, [1, 99])
    gray = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    rgb = np.repeat((255 * gray)[..., None], 3, axis=-1).astype(np.uint8)
    for labels, colour in ((reference, _REFERENCE_RGB), (prediction, _PREDICTION_RGB)):
        edge = np.zeros(labels.shape, bool)
        for value in np.unique(labels):
            if value:
                mask = labels == value
                edge |= mask ^ ndimage.binary_erosion(mask)
        rgb[edge] = colour
    rgb = rgb.transpose(1, 0, 2)[::-1]  # rows = y from the top, columns = x
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return rgb


def plot_boxplots(values: dict[str, dict[str, list[float]]], path: str) -> None:
    """Box plots of per-case values: ``{metric: {model: [values]}}``, one panel per metric.

    Non-finite values are left out (the panel title says how many).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 3.6), squeeze=False)
    for ax, (metric, by_model) in zip(axes[0], values.items()):
        data, skipped = [], 0
        for vals in by_model.values():
            arr = np.asarray(vals, dtype=np.float64)
            data.append(arr[np.isfinite(arr)])
            skipped += int((~np.isfinite(arr)).sum())
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(data) + 1), list(by_model), fontsize=8)
        ax.set_title(metric + (f" ({skipped} undefined left out)" if skipped else ""),
                     fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
