"""The study (``configs/benchmark.py``): several architectures, one protocol, a report
with statistics. (Speed measurements are in ``benchmarks/``, not here.)

``python -m medseg_jax.main --config=configs/benchmark.py --workdir=runs/bench`` trains
and evaluates every architecture of ``benchmark.models`` (``unet``, ``fcn``,
``attention_unet``; ``_3d`` appended for the 3D variant) on the same data and
split, then writes to the workdir:

- ``report.md``     tables (metrics per architecture, task and class with 95%
                    bootstrap intervals; cost; paired Wilcoxon tests; the study's
                    own figures for reference; sweep trials), figures, versions,
                    device and the exact command;
- ``results.csv``   one row per architecture, data group, class and metric;
- ``results.json``  everything above, machine-readable;
- ``figures/``      training curves, per-case box plots, case overlays side by side.

Each architecture trains in ``<workdir>/<label>/`` (a normal run folder: rerunning
the command resumes or reuses it). With ``benchmark.sweep.enabled`` every
combination of the listed learning rates, batch sizes, epoch counts and
patiences is trained in ``<label>/trial_<i>/`` and scored on the validation
split only; the best by validation Dice is then evaluated once on the test
split. The test split is never used for a choice. ``benchmark.init_from`` names
an earlier benchmark workdir: each architecture is also fine-tuned from its
counterpart there (``<label>_finetuned``), side by side with the from-scratch run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import evaluate, fileio, metrics, models, report, stats, train
from medseg_jax import state as state_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import dataset as dataset_lib
from medseg_jax.data import decathlon
from medseg_jax.models import MODELS

# Reported by the study on its own data (brain-tumour MRI, lung-nodule CT, liver-lesion
# images): mean Dice, IoU and Hausdorff distance (mm). Not comparable to other data.
STUDY = {"unet": (0.85, 0.76, 3.2), "fcn": (0.82, 0.73, 3.8),
         "attention_unet": (0.78, 0.69, 4.1)}


_VERSIONED = ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
              "numpy", "scipy", "nibabel", "medseg_jax")


@dataclasses.dataclass
class Entry:
    """One architecture to run."""

    label: str
    name: str
    dims: int
    init_from: str = ""


def parse_entries(config) -> list[Entry]:
    """The entries of ``benchmark.models`` (and their fine-tuned twins with ``init_from``)."""
    text = str(config.benchmark.models)
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if not labels:
        raise ValueError("config.benchmark.models: empty; list architectures, e.g. "
                         "'unet,fcn,attention_unet'")
    entries = []
    for label in labels:
        name, dims = label, 2
        for suffix, d in (("_3d", 3), ("_2d", 2)):
            if label.endswith(suffix):
                name, dims = label[: -len(suffix)], d
        if name not in MODELS:
            raise ValueError(f"config.benchmark.models: unknown model {label!r} in {text!r}; "
                             f"valid: {', '.join(sorted(MODELS))} (append _3d for 3D)")
        if any(e.label == label for e in entries):
            raise ValueError(f"config.benchmark.models: {label!r} is listed twice in {text!r}")
        entries.append(Entry(label, name, dims))
    source = str(config.benchmark.init_from)
    if source:
        tuned = [Entry(f"{e.label}_finetuned", e.name, e.dims, os.path.join(source, e.label))
                 for e in entries]
        entries = entries + tuned if config.benchmark.compare_scratch else tuned
    return entries


def _grid(text: str, cast, field: str) -> list:
    try:
        values = [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"config.benchmark.sweep.{field}: {text!r} is not a comma-separated "
                         f"list of {cast.__name__} ({e})") from e
    if not values:
        raise ValueError(f"config.benchmark.sweep.{field}: empty")
    return values


def sweep_grid(config) -> list[dict]:
    """The trial settings: every combination of the sweep's lists."""
    sweep = config.benchmark.sweep
    lists = [_grid(sweep.learning_rates, float, "learning_rates"),
             _grid(sweep.batch_sizes, int, "batch_sizes"),
             _grid(sweep.num_epochs, int, "num_epochs"),
             _grid(sweep.patience, int, "patience")]
    keys = ("learning_rate", "batch_size", "num_epochs", "patience")
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def run_config(config, entry: Entry, roots: list[str], workdir: str,
               setting: dict | None = None) -> ml_collections.ConfigDict:
    """The single-run config of one entry (and sweep setting)."""
    values = config.to_dict()
    bench = values.pop("benchmark")
    c = ml_collections.ConfigDict(values)
    c.model.name, c.model.spatial_dims = entry.name, entry.dims
    fields = models.model_fields(entry.name)
    for key in [k for k in c.model if k != "name" and k not in fields]:
        del c.model[key]  # another architecture's own field
    for key, value in models.extra_fields(entry.name).items():
        if key not in c.model:  # this architecture's own fields, at their defaults
            c.model[key] = value
    if entry.dims == 3:
        c.data.image_size = tuple(bench["image_size_3d"])
        c.train.batch_size = c.eval.batch_size = int(bench["batch_size_3d"])
        roots = [r for r in roots if not decathlon.read_dataset(r).is_2d]
        if not roots:
            raise ValueError(f"config.benchmark.models: {entry.label} is 3D but every data "
                             "set is 2D")
    c.data.root = ",".join(roots)
    c.data.cache_dir = c.data.cache_dir or os.path.join(workdir, "cache")
    c.train.init_from = entry.init_from
    c.train.freeze_encoder_epochs = int(bench["freeze_encoder_epochs"])
    for key, value in (setting or {}).items():
        c.train[key] = value
    return c


def _class_mean_dice(results: dict) -> float:
    values = [m["dice"]["mean"] for m in results["aggregate"]["all"].values()]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def choose_trial(trials: list[dict]) -> int:
    """Index of the best trial by validation Dice (the first on ties; nan never wins).

    Trials hold ``val_dice`` only: test results do not exist when this runs.
    """
    scores = [t["val_dice"] if math.isfinite(t["val_dice"]) else -math.inf for t in trials]
    return int(np.argmax(scores))


def _run_entry(config, entry: Entry, roots: list[str], workdir: str) -> tuple[dict, list]:
    """Trains (or reuses) one entry; returns (test results + run facts, trials)."""
    folder = os.path.join(workdir, entry.label)
    trials = []
    if config.benchmark.sweep.enabled:
        for i, setting in enumerate(sweep_grid(config)):
            c = run_config(config, entry, roots, workdir, setting)
            c.eval.split, c.eval.figures = "val", False
            trial_dir = os.path.join(folder, f"trial_{i}")
            logging.info("Benchmark %s, trial %d: %s", entry.label, i, setting)
            val = train.train_and_evaluate(c, trial_dir)
            trials.append({"entry": entry.label, "trial": i, **setting, "workdir": trial_dir,
                           "val_dice": _class_mean_dice(val), **_run_facts(trial_dir)})
        best = choose_trial(trials)
        trials[best]["chosen"] = True
        c = run_config(config, entry, roots, workdir, sweep_grid(config)[best])
        c.eval.split = "test"
        run_dir = trials[best]["workdir"]
        logging.info("Benchmark %s: trial %d chosen by validation Dice %.4f; testing it",
                     entry.label, best, trials[best]["val_dice"])
        results = evaluate.evaluate(c, run_dir, split="test")
    else:
        c = run_config(config, entry, roots, workdir)
        c.eval.split = "test"
        run_dir = folder
        results = train.train_and_evaluate(c, run_dir)
    n_cases = max(len(results["per_case"]), 1)
    info = {"label": entry.label, "model": entry.name, "dims": entry.dims,
            "init_from": entry.init_from, "workdir": run_dir, "config": c.to_dict(),
            "params": results["params"], **_run_facts(run_dir),
            "infer_seconds_per_case": results["predict_seconds"] / n_cases,
            "aggregate": results["aggregate"], "per_case": results["per_case"],
            "checkpoint_epoch": results["epoch"]}
    return info, trials


def _run_facts(run_dir: str) -> dict:
    """Training time, epochs and images/s of a run, from its metrics.jsonl."""
    _, epochs = report.read_metrics_log(run_dir)
    ips = [r["images_per_second"] for r in epochs[1:]] or [r["images_per_second"]
                                                            for r in epochs]
    return {"train_seconds": float(sum(r.get("epoch_seconds", 0.0) for r in epochs)),
            "epochs_run": len(epochs),
            "images_per_second": float(np.median(ips)) if ips else float("nan")}


def run(config, workdir: str) -> dict:
    """Runs the benchmark described by ``config.benchmark``; returns results.json's content."""
    t0 = time.time()
    entries = parse_entries(config)
    if config.benchmark.sweep.enabled:
        sweep_grid(config)  # fail early on a bad list
    os.makedirs(workdir, exist_ok=True)
    roots = dataset_lib.data_roots(config, workdir)  # the synthetic set made once for all runs
    infos, trials = [], []
    for entry in entries:
        info, entry_trials = _run_entry(config, entry, roots, workdir)
        infos.append(info)
        trials += entry_trials
    results = {"command": command_line(),
               "environment": environment(), "seed": int(config.seed),
               "data": roots, "entries": infos, "trials": trials,
               "comparisons": compare(infos),
               "benchmark_config": config.benchmark.to_dict()}
    if jax.process_index() == 0:
        results["figures"] = write_figures(infos, workdir)
        results["wall_seconds"] = time.time() - t0
        fileio.write_json_atomic(os.path.join(workdir, "results.json"), results)
        fileio.write_text_atomic(os.path.join(workdir, "results.csv"), results_csv(infos))
        text = report_markdown(results)
        fileio.write_text_atomic(os.path.join(workdir, "report.md"), text)
        print(text, flush=True)
        logging.info("Benchmark done in %.1f min; wrote %s", results["wall_seconds"] / 60,
                     os.path.join(workdir, "report.md"))
    return results


def command_line() -> str:
    """The command that started this process, as the user typed it (``-m`` for main)."""
    argv = list(sys.argv)
    if argv and argv[0].replace(os.sep, "/").endswith("medseg_jax/main.py"):
        argv[0:1] = ["-m", "medseg_jax.main"]
    return " ".join(["python"] + argv)


def environment() -> dict:
    """The run's versions (as in each run's config.json) plus the machine."""
    return {**workdir_lib.versions(), "platform": platform.platform(),
            "processor": platform.processor() or "?", "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "processes": jax.process_count()}


# --------------------------------------------------------------------------- #
# Statistics between architectures
# --------------------------------------------------------------------------- #


def _per_case(info: dict, cls: str, metric: str) -> dict[str, float]:
    return {c["case"]: c["metrics"][cls][metric] for c in info["per_case"]
            if cls in c["metrics"]}


def compare(infos: list[dict]) -> list[dict]:
    """Paired Wilcoxon tests of every pair of entries, per class, on Dice and HD95."""
    out = []
    for a, b in itertools.combinations(infos, 2):
        classes = [c for c in a["aggregate"]["all"] if c in b["aggregate"]["all"]]
        for cls, metric in itertools.product(classes, ("dice", "hd95")):
            va, vb = _per_case(a, cls, metric), _per_case(b, cls, metric)
            common = sorted(set(va) & set(vb))
            test = stats.paired_wilcoxon([va[k] for k in common], [vb[k] for k in common])
            out.append({"a": a["label"], "b": b["label"], "class": cls, "metric": metric,
                        "cases": len(common), **test})
    return out


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def results_csv(infos: list[dict]) -> str:
    """Each entry's ``<split>_summary.csv`` rows, prefixed by the entry."""
    rows = [[info["label"], info["model"], info["dims"], *row]
            for info in infos for row in report.summary_rows(info["aggregate"])]
    return report.csv_text(["entry", "model", "dims", *report.SUMMARY_HEADER], rows)


def report_markdown(results: dict) -> str:
    infos = results["entries"]
    env = results["environment"]
    lines = ["# Benchmark report", "",
             f"Command: `{results['command']}`  ",
             f"Device: {env['devices']} ({env['backend']}, {env['cpu_count']} CPU cores, "
             f"{env['processes']} process(es)); seed {results['seed']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k in _VERSIONED)
             + "  ",
             f"Data: {', '.join(results['data'])}", ""]
    if infos:
        c = infos[0]["config"]
        t, d = c["train"], c["data"]
        lines += [f"Protocol: split {'/'.join(f'{x:g}' for x in d['split_fractions'])} by case "
                  f"(seed {results['seed']}), Adam lr {t['learning_rate']:g}, batch "
                  f"{t['batch_size']}, at most {t['num_epochs']} epochs, early stopping on "
                  f"validation loss (patience {t['patience']}), Dice + CE loss, on-device "
                  "rotation / flip / scaling / intensity augmentation; best checkpoint by "
                  f"validation Dice; input {tuple(d['image_size'])} (sweep trials override "
                  "lr, batch and epochs, see below)  "]
    if "wall_seconds" in results:
        lines += [f"Wall time of this invocation: {results['wall_seconds'] / 60:.1f} min", ""]
    else:
        lines += [""]

    lines += ["## Test metrics", "",
              "Mean ± std over test cases [95% bootstrap interval of the mean]; distances in "
              "mm. 'undef.': cases where the metric is undefined (a distance with an empty "
              "mask), left out.", ""]
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

    lines += ["## Cost", ""]
    rows = [[i["label"], f"{i['params']:,}", f"{i['train_seconds'] / 60:.1f}",
             i["epochs_run"], i["checkpoint_epoch"], f"{i['images_per_second']:.1f}",
             f"{i['infer_seconds_per_case']:.3f}"] for i in infos]
    lines += report.markdown_table(["architecture", "parameters", "training (min)",
                                    "epochs run", "best epoch", "train images/s",
                                    "inference s/case"], rows) + [""]

    if results["comparisons"]:
        lines += ["## Paired comparisons", "",
                  "Wilcoxon signed-rank test, two-sided, on the per-case values of the test "
                  "cases both architectures were scored on; n counts the non-zero, defined "
                  "differences. Median difference is A - B (Dice: > 0 favours A; HD95: < 0 "
                  "favours A).", ""]
        rows = [[c["a"], c["b"], c["class"], c["metric"], c["n"], f"{c['median_diff']:+.4f}",
                 "n/a" if not math.isfinite(c["p_value"]) else f"{c['p_value']:.4g}"]
                for c in results["comparisons"]]
        lines += report.markdown_table(["A", "B", "class", "metric", "n", "median A - B", "p"],
                                       rows) + [""]

    lines += ["## The study's figures (their data, for reference only)", "",
              "Reported by the study on its own MRI, CT and ultrasound data; not the same "
              "data or split as above, so not directly comparable.", ""]
    lines += report.markdown_table(["architecture", "Dice", "IoU", "HD (mm)"],
                                   [[k, *v] for k, v in STUDY.items()]) + [""]

    if results["trials"]:
        lines += ["## Sweep trials (validation split only)", ""]
        rows = [[t["entry"], t["trial"], t["learning_rate"], t["batch_size"], t["num_epochs"],
                 t["patience"], t["epochs_run"], f"{t['val_dice']:.4f}",
                 "yes" if t.get("chosen") else ""] for t in results["trials"]]
        lines += report.markdown_table(["architecture", "trial", "lr", "batch", "max epochs",
                                        "patience", "epochs run", "val Dice", "chosen"],
                                       rows) + [""]

    figures = results.get("figures", {})
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({path})" for name, path in figures.items()] + [""]
    return "\n".join(lines)


def write_figures(infos: list[dict], workdir: str) -> dict[str, str]:
    """Curves of all entries, per-case box plots and side-by-side case overlays."""
    folder = os.path.join(workdir, "figures")
    out = {"training curves": os.path.join(folder, "training_curves.png"),
           "per-case Dice and HD95": os.path.join(folder, "boxplots.png")}
    report.plot_curves({i["label"]: i["workdir"] for i in infos}, out["training curves"])
    classes = list(infos[0]["aggregate"]["all"])
    panels = {}
    for cls, (metric, name) in itertools.product(classes, (("dice", "Dice"),
                                                           ("hd95", "HD95 (mm)"))):
        panels[f"{name}, {cls}"] = {i["label"]: list(_per_case(i, cls, metric).values())
                                    for i in infos}
    report.plot_boxplots(panels, out["per-case Dice and HD95"])
    rows = case_rows(infos)
    if rows:
        out["test cases"] = os.path.join(folder, "test_cases.png")
        report.plot_cases(rows, out["test cases"], "best, median and worst test case by "
                          "Dice averaged over the architectures")
    return {name: os.path.relpath(path, workdir) for name, path in out.items()}


def case_rows(infos: list[dict]) -> list[dict]:
    """Views of the same best / median / worst test cases through every architecture."""
    dice = [{c["case"]: evaluate.mean_dice(c["metrics"]) for c in i["per_case"]}
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
        runs.append((info["label"], state_lib.restore_run(c, info["workdir"])))
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
