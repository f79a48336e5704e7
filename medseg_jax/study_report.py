"""The study's report: ``report.md`` (per data set and a summary across data sets, the
study's own figures beside ours), ``results.csv`` and the figures. ``study.py`` runs the
study and calls these.
"""

from __future__ import annotations

import itertools
import math
import os

import ml_collections
import numpy as np

from medseg_jax import evaluate, metrics, postprocess, report, stats
from medseg_jax import state as state_lib
from medseg_jax.config import SWEEP_FIELDS

# Reported by the study on its own data (brain-tumour MRI, lung-nodule CT, liver-lesion
# images): mean Dice, IoU and Hausdorff distance (mm). Not comparable to other data.
STUDY = {"unet": (0.85, 0.76, 3.2), "fcn": (0.82, 0.73, 3.8),
         "attention_unet": (0.78, 0.69, 4.1)}
_VERSIONED = ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
              "numpy", "scipy", "nibabel", "medseg_jax")



def per_case(info: dict, cls: str, metric: str) -> dict[str, float]:
    return {c["case"]: c["metrics"][cls][metric] for c in info["per_case"]
            if cls in c["metrics"]}


def class_mean(info: dict, metric: str) -> dict[str, float]:
    """Per case, the mean of ``metric`` over the classes scored in it (nan if none)."""
    return {c["case"]: evaluate.class_mean(c["metrics"], metric) for c in info["per_case"]}


def results_csv(infos: list[dict]) -> str:
    """Each entry's ``<split>_summary.csv`` rows, prefixed by the entry (and its data set
    when the study has several)."""
    partial = any(report.partial_labels(info["aggregate"]) for info in infos)
    several = any(info.get("dataset") for info in infos)
    rows = [[*([info["dataset"]] if several else []), info["label"], info["model"],
             info["dims"], *row]
            for info in infos for row in report.summary_rows(info["aggregate"], partial)]
    header = [*(["dataset"] if several else []), "entry", "model", "dims",
              *report.SUMMARY_HEADER]
    return report.csv_text(header + (["n_not_annotated"] if partial else []), rows)


def _mean_ci(values: dict[str, float], digits: int, seed: int = 0) -> str:
    """``mean [95% CI]`` of the finite per-case values."""
    arr = np.asarray([v for v in values.values() if math.isfinite(v)])
    if not arr.size:
        return "n/a"
    lo, hi = stats.bootstrap_ci(arr, seed=seed)
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) else ""
    return f"{arr.mean():.{digits}f}{ci}"


def summary_table(infos: list[dict]) -> list[str]:
    """Architecture x data set: per-case class-mean Dice and HD95, mean [95% CI]; a last
    row with each run's epochs."""
    names = list(dict.fromkeys(i["dataset"] for i in infos))
    labels = list(dict.fromkeys(i["label"] for i in infos))
    by = {(i["dataset"], i["label"]): i for i in infos}
    rows = []
    for label in labels:
        row = [label]
        for name in names:
            info = by.get((name, label))
            row.append("-" if info is None else
                       f"{_mean_ci(class_mean(info, 'dice'), 3)} / "
                       f"{_mean_ci(class_mean(info, 'hd95'), 2)}")
        model = by[next(k for k in by if k[1] == label)]["model"]
        ours = STUDY.get(model)
        row.append(f"{ours[0]:.2f} / {ours[2]:.1f}" if ours else "-")
        rows.append(row)
    # With a time budget the runs differ in epochs: the row that says how far each got.
    rows.append([f"epochs run ({' / '.join(labels)})", *[
        " / ".join(str(by[(name, label)]["epochs_run"]) if (name, label) in by else "-"
                   for label in labels) for name in names], ""])
    return report.markdown_table(["architecture", *[f"{n}: Dice / HD95 (mm)" for n in names],
                                  "the study (theirs): Dice / HD (mm)"], rows)


def per_run_fields(results: dict) -> set[str]:
    """The train fields the study's runs do not share: those its runs' configs differ in,
    and those its sweep trials differ in (the report must not state one run's value for
    all)."""
    configs = [(i.get("run_config") or i["config"])["train"] for i in results["entries"]]
    keys = [key for _, key, _ in SWEEP_FIELDS] + ["budget_minutes"]
    return {k for k in keys
            if len({repr(t.get(k)) for t in configs}) > 1
            or len({repr(t.get(k)) for t in results.get("trials", [])}) > 1}


def protocol(c: dict, seed: int, per_run: set[str] = frozenset()) -> str:
    """The training protocol of a run's config (as a dict), in one sentence; the train
    fields in ``per_run`` are said to vary by run instead of given one run's value."""
    t, d, m = c["train"], c["data"], c["model"]
    if t.get("optimizer", "adam") == "sgd":
        optimizer = f"SGD with Nesterov momentum {t['momentum']:g}"
    else:
        optimizer = "Adam"
    schedule = {"constant": "", "cosine": ", cosine decay",
                "poly": ", polynomial decay"}[t.get("lr_schedule", "constant")]
    steps = f" of {t['steps_per_epoch']} steps" if t.get("steps_per_epoch") else ""
    if per_run & {"num_epochs", "budget_minutes"}:
        epochs = f"epochs{steps} per run ('epochs run' in the cost tables" + (
            "; fitted to the run's share of the time budget, budget.json)"
            if t.get("budget_minutes") or "budget_minutes" in per_run else ")")
    else:
        epochs = f"at most {t['num_epochs']} epochs{steps}" + (
            f" (fitted to {t['budget_minutes']:.3g} min per run)"
            if t.get("budget_minutes") else "")
    if "patience" in per_run:
        stop = "early stopping patience per run"
    elif t["patience"] > 0:
        stop = f"early stopping on validation loss (patience {t['patience']})"
    else:
        stop = "no early stopping"
    lr = "lr per run" if "learning_rate" in per_run else f"lr {t['learning_rate']:g}"
    if d.get("plan") == "auto":
        size = "batch, input and network size from each data set's plan (plans.json)"
    elif "batch_size" in per_run:
        size = f"batch per run, input {tuple(d['image_size'])}"
    else:
        size = f"batch {t['batch_size']}, input {tuple(d['image_size'])}"
    return (f"split {'/'.join(f'{x:g}' for x in d['split_fractions'])} by case (seed {seed}), "
            f"{optimizer} {lr}{schedule}, {size}, {epochs}, {stop}, "
            "Dice + CE loss" + (" with deep supervision" if m.get("deep_supervision") else "")
            + ", on-device augmentation; best checkpoint by validation Dice")


def report_markdown(results: dict) -> str:
    infos = results["entries"]
    env = results["environment"]
    names = list(dict.fromkeys(i.get("dataset", "") for i in infos))
    lines = ["# Benchmark report", "",
             f"Command: `{results['command']}`  ",
             f"Device: {env['devices']} ({env['backend']}, {env['cpu_count']} CPU cores, "
             f"{env['processes']} process(es)); seed {results['seed']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k in _VERSIONED)
             + "  ",
             "Data: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in results["data"].items()),
             ""]
    if infos:
        first = infos[0].get("run_config") or infos[0]["config"]
        lines += [f"Protocol: {protocol(first, results['seed'], per_run_fields(results))}"
                  + (" (each run's sweep trials set the fields their lists name, and the "
                     "chosen trial's are its run's: see below)" if results["trials"] else "")
                  + "  "]
    if "wall_seconds" in results:
        lines += [f"Wall time of this invocation: {results['wall_seconds'] / 60:.1f} min", ""]
    else:
        lines += [""]

    if len(names) > 1:
        lines += ["## Summary across data sets", "",
                  "Test split. Per case, the mean over its (annotated) classes; then mean "
                  "[95% bootstrap interval] over cases. The study's figures are theirs, on "
                  "their own data, for reference only.", ""]
        lines += summary_table(infos) + [""]
    for name in names:
        level = "###" if len(names) > 1 else "##"
        if len(names) > 1:
            lines += [f"## {name}", ""]
        lines += _section([i for i in infos if i.get("dataset", "") == name],
                          [c for c in results["comparisons"] if c.get("dataset", "") == name],
                          level)

    lines += ["## The study's figures (their data, for reference only)", "",
              "Reported by the study on its own MRI, CT and ultrasound data; not the same "
              "data or split as above, so not directly comparable.", ""]
    lines += report.markdown_table(["architecture", "Dice", "IoU", "HD (mm)"],
                                   [[k, *v] for k, v in STUDY.items()]) + [""]

    if results["trials"]:
        lines += ["## Sweep trials (validation split only)", ""]
        several = len(names) > 1
        rows = [[*([t["dataset"]] if several else []), t["entry"], t["trial"],
                 t["learning_rate"], t["batch_size"], t["num_epochs"], t["patience"],
                 t["epochs_run"], f"{t['val_dice']:.4f}", "yes" if t.get("chosen") else ""]
                for t in results["trials"]]
        lines += report.markdown_table([*(["data set"] if several else []), "architecture",
                                        "trial", "lr", "batch", "max epochs", "patience",
                                        "epochs run", "val Dice", "chosen"], rows) + [""]

    figures = results.get("figures", {})
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({path})" for name, path in figures.items()] + [""]
    return "\n".join(lines)


def _section(infos: list[dict], comparisons: list[dict], level: str) -> list[str]:
    """Test metrics, cost and paired comparisons of the entries on one data set."""
    lines = [f"{level} Test metrics", "",
             "Mean ± std over test cases [95% bootstrap interval of the mean]; distances in "
             "mm. 'undef.': cases where the metric is undefined (a distance with an empty "
             "mask), left out; 'not annotated': cases where the class was not contoured "
             "(partial labels), not scored.", ""]
    rows = []
    for info in infos:
        for group, classes in info["aggregate"].items():
            for cls, m in classes.items():
                n = m["dice"]["n"] + m["dice"]["n_nan"]
                rows.append([info["label"], group, cls, n]
                            + [report.stats_cell(m[k.name], k.digits, ci=True)
                               for k in metrics.TABLE_METRICS])
    lines += report.markdown_table(["architecture", "data", "class", "cases"]
                                   + [k.title for k in metrics.TABLE_METRICS], rows) + [""]

    lines += [f"{level} Cost", ""]
    rows = [[i["label"], f"{i['params']:,}", f"{i['train_seconds'] / 60:.1f}",
             i["epochs_run"], i["checkpoint_epoch"], f"{i['images_per_second']:.1f}",
             f"{i['infer_seconds_per_case']:.3f}"] for i in infos]
    lines += report.markdown_table(["architecture", "parameters", "training (min)",
                                    "epochs run", "best epoch", "train images/s",
                                    "inference s/case"], rows) + [""]
    if any(i.get("postprocess") for i in infos):
        lines += ["Post-processing of the test predictions (`eval.postprocess`; 'auto': "
                  "chosen per class on the validation split): "
                  + "; ".join(f"{i['label']}: {i.get('postprocess') or 'none'}" for i in infos),
                  ""]

    if comparisons:
        lines += [f"{level} Paired comparisons", "",
                  "Wilcoxon signed-rank test, two-sided, on the per-case values of the test "
                  "cases both architectures were scored on ('mean': the per-case mean over "
                  "classes); n counts the non-zero, defined differences. Median difference "
                  "is A - B (Dice: > 0 favours A; HD95: < 0 favours A).", ""]
        rows = [[c["a"], c["b"], c["class"], c["metric"], c["n"], f"{c['median_diff']:+.4f}",
                 "n/a" if not math.isfinite(c["p_value"]) else f"{c['p_value']:.4g}"]
                for c in comparisons]
        lines += report.markdown_table(["A", "B", "class", "metric", "n", "median A - B", "p"],
                                       rows) + [""]
    return lines


def write_figures(infos: list[dict], workdir: str) -> dict[str, str]:
    """Per data set: curves of all entries, per-case box plots and side-by-side case
    overlays (in ``figures/`` or, with several data sets, ``figures/<data set>/``)."""
    out = {}
    names = list(dict.fromkeys(i.get("dataset", "") for i in infos))
    for name in names:
        sub = [i for i in infos if i.get("dataset", "") == name]
        made = _figures(sub, os.path.join(workdir, "figures", name))
        out.update({f"{name}: {k}" if name else k: v for k, v in made.items()})
    return {name: os.path.relpath(path, workdir) for name, path in out.items()}


def _figures(infos: list[dict], folder: str) -> dict[str, str]:
    """Curves of all entries, per-case box plots and side-by-side case overlays."""
    out = {"training curves": os.path.join(folder, "training_curves.png"),
           "per-case Dice and HD95": os.path.join(folder, "boxplots.png")}
    report.plot_curves({i["label"]: i["workdir"] for i in infos}, out["training curves"])
    classes = list(infos[0]["aggregate"]["all"])
    panels = {}
    for cls, (metric, name) in itertools.product(classes, (("dice", "Dice"),
                                                           ("hd95", "HD95 (mm)"))):
        panels[f"{name}, {cls}"] = {i["label"]: list(per_case(i, cls, metric).values())
                                    for i in infos}
    report.plot_boxplots(panels, out["per-case Dice and HD95"])
    rows = case_rows(infos)
    if rows:
        out["test cases"] = os.path.join(folder, "test_cases.png")
        report.plot_cases(rows, out["test cases"], "best, median and worst test case by "
                          "Dice averaged over the architectures")
    return out


def case_rows(infos: list[dict]) -> list[dict]:
    """Views of the same best / median / worst test cases through every architecture."""
    dice = [{c["case"]: evaluate.class_mean(c["metrics"]) for c in i["per_case"]}
            for i in infos]
    scores = {}
    for key in set.intersection(*(set(d) for d in dice)):
        finite = [d[key] for d in dice if math.isfinite(d[key])]
        scores[key] = float(np.mean(finite)) if finite else float("nan")
    picks = evaluate.select_cases(scores)
    if not picks:
        return []
    runs = []
    for info in infos:
        c = ml_collections.ConfigDict(info["config"])
        runs.append((info["label"], postprocess.resolved_run(
            state_lib.restore_run(c, info["workdir"]))))
    rows = []
    for title, key in picks:
        row, index = None, None
        for label, run in runs:
            view = evaluate.case_view(run, key, title, index)
            index = view["index"]
            if row is None:
                row = {"title": view["title"], "image": view["image"], "gt": view["gt"],
                       "preds": {}, "maps": {}}
            row["preds"][label] = view["preds"][run.config.model.name]
            for name, values in view["maps"].items():
                row["maps"][f"{label} {name}"] = values
        rows.append(row)
    return rows
