"""The study (``configs/benchmark.py``): several architectures, one protocol, one or
several data sets, a report with statistics. (Speed measurements are in
``benchmarks/``, not here; the report's files are written by ``study_report.py``.)

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
the command resumes or reuses it); with ``benchmark.datasets`` (several data sets, each
with its own label set) in ``<workdir>/<data set>/<label>/``, raw HC18 and OpenKBP
folders converted once into ``<workdir>/converted/<data set>``.
``benchmark.budget_minutes`` shares a wall-time budget between the runs (equally, or by
``benchmark.budget_shares`` per data set), each setting its epochs to fit
(``train.budget_minutes``), recorded in ``<workdir>/budget.json`` for reruns. With ``benchmark.sweep.enabled`` every
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

from medseg_jax import evaluate, fileio, models, report, sharding, stats, study_report, train
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import dataset as dataset_lib
from medseg_jax.data import augment, decathlon
from medseg_jax.config import SWEEP_FIELDS
from medseg_jax.models import MODELS

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
    """A sweep list; empty: ``[None]`` (the field is not swept: the run keeps its own)."""
    try:
        values = [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"config.benchmark.sweep.{field}: {text!r} is not a comma-separated "
                         f"list of {cast.__name__} ({e})") from e
    return values or [None]


def sweep_grid(config) -> list[dict]:
    """The trial settings: every combination of the sweep's lists, each a dict of the
    train fields it sets (a field whose list is empty is left as the config has it, e.g.
    the plan's batch size in configs/benchmark_recipe.py)."""
    sweep = config.benchmark.sweep
    lists = [_grid(sweep[name], cast, name) for name, _, cast in SWEEP_FIELDS]
    if all(values == [None] for values in lists):
        names = ", ".join(name for name, _, _ in SWEEP_FIELDS)
        raise ValueError(f"config.benchmark.sweep: every list is empty ({names}): nothing "
                         "to sweep")
    keys = [key for _, key, _ in SWEEP_FIELDS]
    return [{k: v for k, v in zip(keys, combo) if v is not None}
            for combo in itertools.product(*lists)]


def run_config(config, entry: Entry, roots: list[str], workdir: str,
               setting: dict | None = None,
               budget_minutes: float = 0.0) -> ml_collections.ConfigDict:
    """The single-run config of one entry (and sweep setting, and time budget)."""
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
        if len(bench["image_size_3d"]):  # else the plan's (data.plan="auto")
            c.data.image_size = tuple(bench["image_size_3d"])
        if int(bench["batch_size_3d"]):
            c.train.batch_size = c.eval.batch_size = int(bench["batch_size_3d"])
        else:
            c.eval.batch_size = 4
        if c.augment.to_dict() == augment.nnunet_augment_config(config.model.spatial_dims
                                                               ).to_dict():
            c.augment = augment.nnunet_augment_config(3)  # the recipe's 3D ranges
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
    if budget_minutes:
        c.train.budget_minutes = float(budget_minutes)
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


def _run_entry(config, entry: Entry, roots: list[str], workdir: str, dataset: str = "",
               budget_minutes: float = 0.0) -> tuple[dict, list]:
    """Trains (or reuses) one entry on one data set; returns (test results + run facts,
    trials)."""
    folder = os.path.join(workdir, dataset, entry.label)
    trials = []
    if config.benchmark.sweep.enabled:
        grid = sweep_grid(config)
        fitted = {}  # batch size -> the epochs its first trial fitted to the budget
        for i, setting in enumerate(grid):
            c = run_config(config, entry, roots, workdir, setting, budget_minutes / len(grid))
            c.eval.split, c.eval.figures = "val", False
            trial_dir = os.path.join(folder, f"trial_{i}")
            batch = int(c.train.batch_size)
            if budget_minutes and batch in fitted and "num_epochs" not in setting:
                # The step costs what an earlier trial's did: the same epochs, so that
                # trials differ only in what the sweep sets (measured anew, a later trial
                # finds its step compiled and cached, and fitted up to 1 epoch more).
                c.train.budget_minutes, c.train.num_epochs = 0.0, fitted[batch]
            logging.info("Benchmark %s, trial %d: %s", entry.label, i, setting)
            val = train.train_and_evaluate(c, trial_dir)
            values = _trial_values(trial_dir)
            if budget_minutes:
                fitted.setdefault(batch, int(values["num_epochs"]))
            trials.append({"entry": entry.label, "dataset": dataset, "trial": i, **values,
                           "workdir": trial_dir, "val_dice": _class_mean_dice(val),
                           **_run_facts(trial_dir)})
        best = choose_trial(trials)
        trials[best]["chosen"] = True
        c = run_config(config, entry, roots, workdir, grid[best], budget_minutes / len(grid))
        c.eval.split = "test"
        run_dir = trials[best]["workdir"]
        logging.info("Benchmark %s: trial %d chosen by validation Dice %.4f; testing it",
                     entry.label, best, trials[best]["val_dice"])
        results = evaluate.evaluate(c, run_dir, split="test")
    else:
        c = run_config(config, entry, roots, workdir, budget_minutes=budget_minutes)
        c.eval.split = "test"
        run_dir = folder
        results = train.train_and_evaluate(c, run_dir)
    n_cases = max(len(results["per_case"]), 1)
    info = {"label": entry.label, "model": entry.name, "dims": entry.dims,
            "dataset": dataset, "init_from": entry.init_from, "workdir": run_dir,
            "config": c.to_dict(), "params": results["params"], **_run_facts(run_dir),
            # As the run recorded it: its plan applied, its epochs fitted to the budget.
            "run_config": fileio.read_json(os.path.join(run_dir, "config.json"),
                                           "the run's config"),
            "infer_seconds_per_case": results["predict_seconds"] / n_cases,
            "aggregate": results["aggregate"], "per_case": results["per_case"],
            "checkpoint_epoch": results["epoch"],
            "postprocess": results.get("postprocess", "")}
    return info, trials


def _trial_values(trial_dir: str) -> dict:
    """The values a trial trained with for every sweepable field, swept or not, from the
    config.json its training wrote (the plan and the time budget applied)."""
    recorded = fileio.read_json(os.path.join(trial_dir, "config.json"), "the trial's config")
    return {key: recorded["train"][key] for _, key, _ in SWEEP_FIELDS}


def _run_facts(run_dir: str) -> dict:
    """Training time, epochs and images/s of a run, from its metrics.jsonl."""
    _, epochs = report.read_metrics_log(run_dir)
    ips = [r["images_per_second"] for r in epochs[1:]] or [r["images_per_second"]
                                                            for r in epochs]
    return {"train_seconds": float(sum(r.get("epoch_seconds", 0.0) for r in epochs)),
            "epochs_run": len(epochs),
            "images_per_second": float(np.median(ips)) if ips else float("nan")}


BUDGET_JSON = "budget.json"


def parse_shares(config, names: list[str]) -> dict[str, float]:
    """``benchmark.budget_shares`` ("name:weight,..." over the data set names) -> a weight
    per data set name; a data set not listed weighs 1."""
    field = "config.benchmark.budget_shares"
    shares = {n: 1.0 for n in names}
    for item in (i.strip() for i in str(config.benchmark.budget_shares).split(",")):
        if not item:
            continue
        name, sep, value = (p.strip() for p in item.partition(":"))
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{field}: {item!r} is not name:weight with a positive weight")
        if name not in shares:
            raise ValueError(f"{field}: {name!r} is not a data set of "
                             f"config.benchmark.datasets ({', '.join(n for n in names if n)})")
        shares[name] = weight
    return shares


def run_budgets(config, workdir: str, runs: list[tuple[str, str]],
                elapsed_minutes: float) -> list[float]:
    """Each run's ``train.budget_minutes`` (0 without ``benchmark.budget_minutes``): 85% of
    the budget left after the start-up (conversion; evaluation and start-up take about 15%
    of a run on the CPU), shared by the runs in proportion to their data set's
    ``benchmark.budget_shares`` weight. Fixed at the study's first start and kept in
    ``<workdir>/budget.json``: a rerun (resuming or reusing its runs) gives every run the
    budget it had, so none refits its epochs; a changed budget, share or run list is a new
    one. Process 0's figures on every process."""
    shares = parse_shares(config, sorted({name for name, _ in runs}))  # checked always
    shares_text = str(config.benchmark.budget_shares)
    budget = float(config.benchmark.budget_minutes)
    if not budget:
        return [0.0] * len(runs)
    keys = [f"{name}/{label}" if name else label for name, label in runs]
    path = os.path.join(workdir, BUDGET_JSON)
    if os.path.exists(path):
        recorded = fileio.read_json(path, "the study's per-run budgets",
                                    "delete it to share the budget again")
        if (recorded.get("budget_minutes") == budget
                and recorded.get("budget_shares", "") == shares_text
                and sorted(recorded.get("per_run_minutes", {})) == sorted(keys)):
            try:
                return [float(recorded["per_run_minutes"][k]) for k in keys]
            except (TypeError, ValueError):
                raise ValueError(f"{path}: per_run_minutes holds a value that is not a "
                                 "number (the study's per-run budgets); delete it to share "
                                 "the budget again") from None
    total = sum(shares[name] for name, _ in runs)
    left = np.array([0.85 * (budget - elapsed_minutes) * shares[name] / total
                     for name, _ in runs])
    left = np.asarray(sharding.from_process_0(left))  # one figure for all processes
    if left.min() < 0.1:
        raise ValueError(f"config.benchmark.budget_minutes={budget:g} leaves less than 6 s "
                         f"to some of the {len(runs)} runs")
    if jax.process_index() == 0:
        fileio.write_json_atomic(path, {
            "budget_minutes": budget, "budget_shares": shares_text,
            "start_up_minutes": round(elapsed_minutes, 3),
            "per_run_minutes": {k: float(m) for k, m in zip(keys, left)}})
    return [float(m) for m in left]


def parse_datasets(config, workdir: str) -> list[tuple[str, list[str]]]:
    """[(name, data folders)] of ``benchmark.datasets`` ("name:folder,..."; raw HC18 and
    OpenKBP folders converted into ``<workdir>/converted/<name>``), or [("", the folders of
    data.root or the synthetic set)]."""
    text = str(config.benchmark.datasets)
    if not text.strip():
        return [("", dataset_lib.data_roots(config, workdir))]
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, sep, path = item.partition(":")
        name, path = name.strip(), os.path.expanduser(path.strip())
        if not sep or not name or not path or not name.replace("_", "").isalnum():
            raise ValueError(f"config.benchmark.datasets: {item!r} is not name:folder (a "
                             "name of letters, digits and _, then the folder)")
        if any(n == name for n, _ in out):
            raise ValueError(f"config.benchmark.datasets: {name!r} is listed twice")
        out.append((name, [dataset_folder(name, path, workdir)]))
    return out


def dataset_folder(name: str, path: str, workdir: str) -> str:
    """A Decathlon folder for ``path``: itself, or its conversion (HC18 as the challenge
    ships it: ``training_set/``; OpenKBP: ``train-pats/``), made once and reused."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.benchmark.datasets: {name}: {path} is not a folder")
    if os.path.exists(os.path.join(path, decathlon.DATASET_JSON)):
        return path
    from medseg_jax.data import hc18, openkbp  # noqa: PLC0415

    dst = os.path.join(workdir, "converted", name)
    if os.path.isdir(os.path.join(path, hc18.IMAGES_DIR)):
        marker, convert = hc18.MARKER, hc18.convert
    elif os.path.isdir(os.path.join(path, "train-pats")):
        marker, convert = openkbp.MARKER, openkbp.convert
    else:
        raise ValueError(f"config.benchmark.datasets: {name}: {path} is neither a Decathlon "
                         "folder (dataset.json) nor raw HC18 (training_set/) or OpenKBP "
                         "(train-pats/)")
    done = os.path.join(dst, marker)
    if os.path.exists(done) and os.path.exists(os.path.join(dst, decathlon.DATASET_JSON)):
        summary = fileio.read_json(done, "the conversion summary", f"delete {dst} to convert "
                                   "again")
        if os.path.realpath(str(summary.get("src", ""))) == os.path.realpath(path):
            return dst
    logging.info("Converting %s (%s) into %s", name, path, dst)
    convert(path, dst, overwrite=True)
    return dst


def run(config, workdir: str) -> dict:
    """Runs the benchmark described by ``config.benchmark``; returns results.json's content."""
    t0 = time.time()
    entries = parse_entries(config)
    if config.benchmark.sweep.enabled:
        sweep_grid(config)  # fail early on a bad list
    os.makedirs(workdir, exist_ok=True)
    datasets = parse_datasets(config, workdir)  # the synthetic set made once for all runs
    runs = [(name, roots, entry) for name, roots in datasets for entry in entries
            if entry.dims == 2 or not name
            or not all(decathlon.read_dataset(r).is_2d for r in roots)]
    budgets = run_budgets(config, workdir, [(name, e.label) for name, _, e in runs],
                          (time.time() - t0) / 60)
    infos, trials = [], []
    for (name, roots, entry), minutes in zip(runs, budgets):
        info, entry_trials = _run_entry(config, entry, roots, workdir, name, minutes)
        infos.append(info)
        trials += entry_trials
    results = {"command": command_line(),
               "environment": environment(), "seed": int(config.seed),
               "data": {name or "data": roots for name, roots in datasets},
               "entries": infos, "trials": trials,
               "comparisons": compare(infos),
               "benchmark_config": config.benchmark.to_dict()}
    if jax.process_index() == 0:
        results["figures"] = study_report.write_figures(infos, workdir)
        results["wall_seconds"] = time.time() - t0
        fileio.write_json_atomic(os.path.join(workdir, "results.json"), results)
        fileio.write_text_atomic(os.path.join(workdir, "results.csv"),
                                 study_report.results_csv(infos))
        text = study_report.report_markdown(results)
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
            "processor": workdir_lib.cpu_model(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "processes": jax.process_count()}


# --------------------------------------------------------------------------- #
# Statistics between architectures
# --------------------------------------------------------------------------- #


def compare(infos: list[dict]) -> list[dict]:
    """Paired Wilcoxon tests of every pair of entries on the same data set, per class (and
    on the class mean when there are several classes), on Dice and HD95."""
    out = []
    for a, b in itertools.combinations(infos, 2):
        if a.get("dataset", "") != b.get("dataset", ""):
            continue
        classes = [c for c in a["aggregate"]["all"] if c in b["aggregate"]["all"]]
        pairs = [(cls, metric, study_report.per_case(a, cls, metric),
                  study_report.per_case(b, cls, metric))
                 for cls, metric in itertools.product(classes, ("dice", "hd95"))]
        if len(classes) > 1:
            pairs += [("mean", metric, study_report.class_mean(a, metric),
                       study_report.class_mean(b, metric))
                      for metric in ("dice", "hd95")]
        for cls, metric, va, vb in pairs:
            common = sorted(set(va) & set(vb))
            test = stats.paired_wilcoxon([va[k] for k in common], [vb[k] for k in common])
            out.append({"dataset": a.get("dataset", ""), "a": a["label"], "b": b["label"],
                        "class": cls, "metric": metric, "cases": len(common), **test})
    return out
