"""Letting the program choose (``configs/auto.py``), as nnU-Net's
``nnUNetv2_find_best_configuration``: the planned configurations (2D, 3D) trained within
one time budget on one split, each and their ensemble scored on the validation split,
the best by mean validation Dice kept in ``<workdir>/choice.json``, which evaluation
and prediction then use. Owns that file and the members' configs; the members are
ordinary run folders trained and evaluated by ``train.py`` and ``evaluate.py``.

``medseg-jax --config=configs/auto.py --workdir=runs/hippocampus
--config.data.root=DATA`` trains ``<workdir>/2d`` and ``<workdir>/3d`` (the first makes
the split, the others reuse its ``splits.json``), each with an equal share of 80% of
``choose.budget_minutes`` (``train.budget_minutes``: each fits its epochs), evaluates
each and their ensemble on the validation split, writes ``choice.json`` (every score per
class and mean, the rule, the chosen candidate, the members' folders, the date), then
evaluates the choice once on the test split. The test split is never used for the
choice. Rerunning the command resumes or reuses the members (a finished one is not
trained again) and chooses again. ``--mode=eval`` and ``--mode=predict`` with the same
config and workdir use the choice: one member's run, or the ensemble of all.

Every field the command sets (or a config file based on configs/auto.py changes) applies
to every member; the rest are each configuration's own defaults
(configs/unet_2d_planned.py, configs/unet_3d.py: nnU-Net's recipe, a plan from the data).
"""

from __future__ import annotations

import datetime
import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import architectures
from medseg_jax import config as config_lib
from medseg_jax import config_fields, evaluate, fileio, postprocess, predict, train
from medseg_jax import workdir as workdir_lib

# The configurations, cheapest first (the order ties are broken in), and their dims.
CONFIGURATIONS = {"2d": 2, "3d": 3}
ENSEMBLE = "ensemble"
CHOICE_JSON = "choice.json"
# Of the budget for training; the rest: preprocessing and the evaluations (each member,
# the ensemble, the test split: on a CPU 3D with flip TTA takes minutes on Hippocampus).
TRAIN_SHARE = 0.8
RULE = ("the highest mean validation Dice over the classes; on a tie the single, cheaper "
        "configuration (" + ", ".join(CONFIGURATIONS) + f", then the {ENSEMBLE})")


def member_base(name: str) -> ml_collections.ConfigDict:
    """The planned configuration ``name`` as its config file has it (before overrides)."""
    config = config_lib.default_config()
    config.model.spatial_dims = CONFIGURATIONS[name]
    config_lib.recipe(config)
    if CONFIGURATIONS[name] == 3:
        config.eval.batch_size = 4  # sliding-window patches per call (configs/unet_3d.py)
    return config


def configurations(config) -> list[str]:
    """The names of ``choose.configurations``, in the order given; ValueError naming it."""
    text = str(config.choose.configurations)
    names = [n.strip() for n in text.split(",") if n.strip()]
    field = "config.choose.configurations"
    if not names:
        raise ValueError(f"{field}: empty; list configurations, e.g. '2d,3d'")
    for name in names:
        if name not in CONFIGURATIONS:
            raise ValueError(f"{field}: unknown configuration {name!r} in {text!r}; valid: "
                             f"{', '.join(CONFIGURATIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: a configuration is listed twice in {text!r}")
    return names


def overrides(config) -> dict:
    """{dotted field: value} where ``config`` differs from configs/auto.py (the command's
    overrides, a derived config file's own values): what every member takes."""
    base = dict(config_fields.flatten(config_lib.auto_config()))
    return {k: v for k, v in config_fields.flatten(config)
            if not k.startswith("choose.") and (k not in base or base[k] != v)}


def check(config, training: bool = True) -> list[str]:
    """The one-line errors a choose config can have, before anything is written; returns
    the configurations. No JAX, no files."""
    names = configurations(config)
    changed = overrides(config)
    for field, why in (("model.spatial_dims", "set per configuration by "
                        "config.choose.configurations"),
                       ("train.budget_minutes", "set per configuration from "
                        "config.choose.budget_minutes"),
                       ("eval.ensemble", "the choice says whether the configurations are "
                        "ensembled")):
        if field in changed:
            raise ValueError(f"config.{field}: {why} (configs/auto.py); leave it out")
    mode = str(config.eval.postprocess).strip()
    if mode in ("choose", "auto") and len(names) > 1 and config.choose.ensemble:
        raise ValueError(f"config.eval.postprocess={mode!r}: a post-processing choice is "
                         "made per run, and the ensemble is a candidate; give '' or "
                         "'largest', or set config.choose.ensemble=False")
    if training and not str(config.data.root).strip():
        raise ValueError("config.data.root: empty; name the data set folder to choose on "
                         "(configs/auto.py trains every configuration on it)")
    return names


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def member_config(config, name: str, first: str = "",
                  count: int = 1) -> ml_collections.ConfigDict:
    """The training config of member ``name``: its planned defaults, the command's
    overrides, its share of the budget (of ``count`` members) and the split of the
    ``first`` member's folder."""
    c = member_base(name)
    values = overrides(config)
    model = values.get("model.name", c.model.name)
    for key in [k for k in c.model if k != "name"
                and k not in architectures.fields().get(model, {})]:
        del c.model[key]  # not a field of the architecture the command names
    for dotted, value in values.items():
        _set(c, dotted, value)
    for key, value in architectures.extras().get(model, {}).items():
        if key not in c.model:
            c.model[key] = value
    c.train.budget_minutes = TRAIN_SHARE * float(config.choose.budget_minutes) / count
    if first and not c.data.splits_file:
        c.data.splits_file = os.path.join(first, "splits.json")
    return c


def _eval_config(config, folder: str) -> ml_collections.ConfigDict:
    """A trained member's recorded config (configs/run.py) with the command's overrides
    (its evaluation settings: eval.split, eval.tta, ...)."""
    c = workdir_lib.read_run_config(folder)
    for dotted, value in overrides(config).items():
        if not dotted.startswith("model.") or dotted.split(".", 1)[1] in c.model:
            _set(c, dotted, value)  # (not another architecture's own field)
    return c


def _scores(results: dict, path: str) -> dict:
    """The Dice per class (mean over the cases), its mean over the classes, and the
    metrics file (``path``, relative to the workdir)."""
    per_class = {name: float(m["dice"]["mean"])
                 for name, m in results["aggregate"]["all"].items()}
    finite = [v for v in per_class.values() if math.isfinite(v)]
    return {"dice": per_class, "mean_dice": float(np.mean(finite)) if finite else math.nan,
            "cases": len(results["per_case"]), "checkpoint_step": int(results["step"]),
            "metrics": path}


def pick(scores: dict[str, dict]) -> str:
    """The candidate with the highest mean validation Dice; ties (and nan) go to the
    cheaper one: ``scores``' order is the cost order (singles, cheapest first; then the
    ensemble)."""
    best, best_value = None, -math.inf
    for name, row in scores.items():
        value = row["mean_dice"] if math.isfinite(row["mean_dice"]) else -math.inf
        if best is None or value > best_value:
            best, best_value = name, value
    return best


def _ensemble_runs(names: list[str]) -> list[str]:
    """The members in the order an ensemble is evaluated: the run whose settings apply
    (the costliest: 3D's small sliding-window batch) first, then the others."""
    return sorted(names, key=lambda n: -CONFIGURATIONS[n])


def _evaluate(configs: dict, folders: dict, chosen: list[str], split: str) -> dict:
    """Evaluates ``chosen`` (one member, or several averaged) on ``split``."""
    head, *rest = chosen
    c = ml_collections.ConfigDict(configs[head].to_dict())
    c.eval.ensemble = ",".join(folders[n] for n in rest)
    if rest:
        c.eval.figures = False
    return evaluate.evaluate(c, folders[head], split=split)


def _metrics_path(results: dict, folders: dict, chosen: list[str], workdir: str) -> str:
    """The ``*_metrics.json`` file an evaluation of ``chosen`` wrote (evaluate.py's names),
    relative to ``workdir``; "" if it is not there (written by process 0 only)."""
    head, *rest = chosen
    which, split = str(results["checkpoint"]), results["split"]
    name = split if which == "best" else (
        f"{split}_step{results['step']}" if which.isdigit() else f"{split}_{which}")
    name += "_whole" if results["sw_window"] == "whole" else ""
    name += "_ensemble_" + "+".join(os.path.basename(folders[n]) for n in rest) if rest else ""
    name += ("_auto" if str(results["postprocess"]).startswith("auto")
             else postprocess.suffix(results["applied"]))
    path = os.path.join(folders[head], f"{name}_metrics.json")
    return os.path.relpath(path, workdir) if os.path.exists(path) else ""


def run(config, workdir: str) -> dict:
    """Trains (or reuses) every configuration, chooses on the validation split, writes
    choice.json and evaluates the choice on the test split; returns choice.json's content."""
    names = check(config)
    config_lib.check_numbers(config)
    with workdir_lib.run_lock(workdir):  # one choosing command at a time in the workdir
        return _run(config, workdir, names)


def _run(config, workdir: str, names: list[str]) -> dict:
    folders = {n: os.path.join(workdir, n) for n in names}
    configs = {}
    for i, name in enumerate(names):
        configs[name] = member_config(config, name, folders[names[0]] if i else "",
                                      len(names))
        logging.info("Configuration %s (%d of %d): training in %s, %.1f min", name, i + 1,
                     len(names), folders[name], configs[name].train.budget_minutes)
        train.train(configs[name], folders[name])
    candidates = {n: [n] for n in sorted(names, key=list(CONFIGURATIONS).index)}
    if len(names) > 1 and config.choose.ensemble:
        candidates[ENSEMBLE] = _ensemble_runs(names)
    scores = {}
    for label, chosen in candidates.items():
        logging.info("Scoring %s on the validation split", label)
        results = _evaluate(configs, folders, chosen, "val")
        path = _metrics_path(results, folders, chosen, workdir)
        scores[label] = dict(_scores(results, path), members=chosen)
    best = pick(scores)
    choice = {"chosen": best, "members": candidates[best],
              "folders": {n: os.path.relpath(folders[n], workdir) for n in names},
              "rule": RULE, "validation": scores,
              "budget_minutes": float(config.choose.budget_minutes),
              "train_minutes": {n: float(configs[n].train.budget_minutes) for n in names},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    _write(workdir, choice)
    print(choice_table(choice), flush=True)
    logging.info("Chosen: %s (mean validation Dice %.4f); evaluating it on the test split",
                 best, scores[best]["mean_dice"])
    results = _evaluate(configs, folders, candidates[best], "test")
    choice["test"] = _scores(results, _metrics_path(results, folders, candidates[best],
                                                    workdir))
    _write(workdir, choice)
    return choice


def _write(workdir: str, choice: dict) -> None:
    if jax.process_index() == 0:
        fileio.write_json_atomic(os.path.join(workdir, CHOICE_JSON), choice)


def choice_table(choice: dict) -> str:
    """The validation scores of every candidate, the chosen one marked."""
    rows = choice["validation"]
    classes = list(next(iter(rows.values()))["dice"])
    lines = ["| candidate | " + " | ".join(classes) + " | mean Dice |",
             "|---" * (len(classes) + 2) + "|"]
    for name, row in rows.items():
        mark = " (chosen)" if name == choice["chosen"] else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{row['dice'][c]:.4f}"
                                                      for c in classes)
                     + f" | {row['mean_dice']:.4f} |")
    return "Validation Dice (" + choice["rule"] + ")\n" + "\n".join(lines)


def read_choice(workdir: str) -> tuple[dict, dict]:
    """(choice.json's content, {member: folder}) of the chosen members; one-line errors."""
    path = os.path.join(workdir, CHOICE_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (no configuration chosen yet); train "
                                "first: the same command without --mode")
    recover = "run the training command again (it reuses the trained configurations)"
    choice = fileio.read_json(path, "the chosen configuration", recover)
    members = choice.get("members") if isinstance(choice, dict) else None
    known = choice.get("folders") if isinstance(choice, dict) else None
    if (not isinstance(members, list) or not members or not isinstance(known, dict)
            or any(m not in known for m in members)):
        raise ValueError(f"{path}: not a choice record (members, folders); {recover}")
    return choice, {m: os.path.join(workdir, str(known[m])) for m in members}


def evaluate_choice(config, workdir: str) -> dict:
    """``--mode=eval``: the choice evaluated on ``eval.split``."""
    check(config, training=False)
    choice, folders = read_choice(workdir)
    configs = {n: _eval_config(config, f) for n, f in folders.items()}
    logging.info("Evaluating the choice of %s: %s", workdir, choice["chosen"])
    return _evaluate(configs, folders, choice["members"], str(config.eval.split))


def predict_choice(config, workdir: str, input_path: str, output_dir: str,
                   task: str | None = None, save_probabilities: bool = False,
                   overwrite: bool = False) -> dict:
    """``--mode=predict``: label maps from the choice (one member, or the ensemble)."""
    check(config, training=False)
    choice, folders = read_choice(workdir)
    if os.path.realpath(output_dir) == os.path.realpath(workdir):
        raise ValueError(f"--output {output_dir}: is the workdir of the choice; give another "
                         f"--output (a new folder such as {workdir}/predictions is fine)")
    head, *rest = choice["members"]
    c = _eval_config(config, folders[head])
    c.eval.ensemble = ",".join(folders[n] for n in rest)
    logging.info("Predicting with the choice of %s: %s", workdir, choice["chosen"])
    return predict.predict(c, folders[head], input_path, output_dir, task,
                           save_probabilities, overwrite)
