"""Post-processing of predicted label maps, and its choice per class on validation.

nnU-Net's post-processing keeps, for a class, only its largest connected component
(stray islands of a prediction become background), and decides per class whether to
do so from its validation results. ``eval.postprocess`` says what is applied:

- ``""``: nothing (the default);
- ``"largest"``: every foreground class;
- ``"largest:1,7"``: the classes with these label values only;
- ``"choose"``: the evaluation (or the training command, after training) scores every
  class of the validation split with and without it from one prediction pass, keeps it
  for each class whose mean Dice it raises (nnU-Net's per-class step; its first step,
  all foreground classes as one region, is not made), writes the choice to
  ``<workdir>/postprocessing.json`` (``postprocessing_step<N>.json`` for a checkpoint
  other than the best, ``postprocessing_whole*.json`` with ``eval.sw_window="whole"``),
  then evaluates the requested split with it;
- ``"auto"``: what the choice file of the evaluated checkpoint and window says
  (evaluation and prediction; with whole windows and no choice made with them, the patch
  windows' choice).

This module owns the component filter, the spec's parsing and the choice file; the
evaluation that scores the choice is ``evaluate.py``'s.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from absl import logging

from medseg_jax import fileio

CHOICE_FILE = "postprocessing.json"
_RECOVER = ("choose again on the validation split: --mode=eval --config.eval.split=val "
            "--config.eval.postprocess=choose")


def parse(spec: str) -> tuple[int, ...] | None:
    """The classes a spec keeps the largest component of: None for none, () for every
    foreground class, else the label values. "choose" and "auto" must be resolved first
    (``resolve``). Raises ValueError naming ``config.eval.postprocess``."""
    spec = str(spec or "").strip()
    if spec == "":
        return None
    if spec == "largest":
        return ()
    if spec.startswith("largest:"):
        values = []
        for part in spec[len("largest:"):].split(","):
            part = part.strip()
            if not part.isdigit() or int(part) == 0:
                raise ValueError(
                    f"config.eval.postprocess: {spec!r}: {part!r} is not a foreground label "
                    "value (write largest:1,7 with the label values of dataset.json)")
            values.append(int(part))
        return tuple(sorted(set(values)))
    if spec in ("choose", "auto"):
        raise ValueError(f"config.eval.postprocess: {spec!r} must be resolved against a "
                         "workdir first")
    raise ValueError(f"config.eval.postprocess: {spec!r} is not one of '', 'largest', "
                     "'largest:<label values>', 'choose', 'auto'")


def check_spec(spec: str) -> None:
    """Config validation: the spec's form (not the choice file)."""
    if str(spec or "").strip() not in ("choose", "auto"):
        parse(spec)


def largest_components(labels: np.ndarray, classes: tuple[int, ...] = ()) -> np.ndarray:
    """``labels`` with every class of ``classes`` (all foreground classes when empty)
    reduced to its largest face-connected component; the rest becomes background."""
    from scipy import ndimage  # noqa: PLC0415

    out = labels.copy()
    for value in np.unique(labels):
        if value == 0 or (classes and int(value) not in classes):
            continue
        components, n = ndimage.label(labels == value)
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components > 0) & (components != int(np.argmax(sizes)))] = 0
    return out


def apply(labels: np.ndarray, spec: str) -> np.ndarray:
    """``labels`` post-processed as a resolved ``spec`` says."""
    classes = parse(spec)
    return labels if classes is None else largest_components(labels, classes)


def choose(baseline: dict, candidate: dict, labels: dict[int, str]) -> dict:
    """Per class, whether the largest component raises the mean Dice of ``candidate``
    over ``baseline`` (``metrics.aggregate`` results of the same cases; nnU-Net's
    criterion: strictly higher, else the class is left as predicted). Returns the
    content of the choice file, without the run's identification."""
    classes, keep = {}, []
    for value, name in sorted(labels.items()):
        if int(value) == 0 or name not in baseline:
            continue
        row = {"value": int(value)}
        for tag, agg in (("none", baseline), ("largest", candidate)):
            for metric in ("dice", "hd95"):
                stat = agg[name].get(metric, {})
                row[f"{metric}_{tag}"] = float(stat.get("mean", float("nan")))
        row["cases"] = int(baseline[name].get("dice", {}).get("n", 0))
        gain = row["dice_largest"] - row["dice_none"]
        row["largest"] = bool(math.isfinite(gain) and gain > 0)
        if row["largest"]:
            keep.append(int(value))
        classes[name] = row
    return {"classes": classes, "largest": keep,
            "spec": "largest:" + ",".join(map(str, keep)) if keep else ""}


def choice_table(choice: dict) -> str:
    """The choice as a markdown table: per class, Dice and HD95 without and with."""
    def num(x, fmt):
        return format(x, fmt) if math.isfinite(x) else "n/a"

    lines = [f"Post-processing chosen on the {choice.get('split', 'val')} split "
             f"(largest connected component per class, kept where it raises the mean Dice)",
             "", "| class | cases | Dice | Dice, largest | HD95 (mm) | HD95, largest | chosen |",
             "|---|---|---|---|---|---|---|"]
    for name, row in choice["classes"].items():
        lines.append(f"| {name} | {row['cases']} | {num(row['dice_none'], '.4f')} | "
                     f"{num(row['dice_largest'], '.4f')} | {num(row['hd95_none'], '.2f')} | "
                     f"{num(row['hd95_largest'], '.2f')} | "
                     f"{'largest' if row['largest'] else '-'} |")
    return "\n".join(lines) + "\n"


def choice_path(workdir: str, which: str = "best", step: int | None = None,
                window: str = "patch") -> str:
    """``postprocessing.json`` for the best checkpoint, ``postprocessing_step<N>.json``
    for another (``eval.checkpoint``), ``postprocessing_whole[_step<N>].json`` for a choice
    made with whole-case windows (``eval.sw_window``, as ``preprocess.sw_window`` resolves
    it): one checkpoint's or window's choice never replaces another's."""
    name = CHOICE_FILE[:-len(".json")] + ("_whole" if window == "whole" else "")
    if which != "best" and step is not None:
        name += f"_step{step}"
    return os.path.join(workdir, name + ".json")


def suffix(spec: str) -> str:
    """The file-name suffix of a resolved spec: "", "_largest", "_largest1-7"."""
    classes = parse(spec)
    if classes is None:
        return ""
    return "_largest" + "-".join(map(str, classes))


def normalise(spec: str) -> str:
    """A resolved spec in one spelling: "", "largest" or "largest:1,7" (sorted, unique)."""
    classes = parse(spec)
    if classes is None:
        return ""
    return "largest" + (":" + ",".join(map(str, classes)) if classes else "")


def read_choice(path: str, recover: str = _RECOVER) -> tuple[dict, list[int], dict[int, str]]:
    """(the choice file's content, the label values it keeps the largest component of,
    {label value: class name} of its rows); a damaged file is one ValueError naming it."""
    choice = fileio.read_json(path, "the post-processing chosen on validation", recover)
    try:
        kept = [int(v) for v in choice["largest"]]
        names = {int(row["value"]): str(name) for name, row in choice["classes"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a post-processing choice ({type(e).__name__}: {e}); "
                         f"{recover}") from None
    if any(v not in names for v in kept):
        raise ValueError(f"{path}: 'largest' names a class without its row; {recover}")
    return choice, kept, names


def applied_choice_path(workdir: str, which: str = "best", step: int | None = None,
                        window: str = "patch") -> str:
    """The choice file "auto" applies: the window's own (``choice_path``), else, for whole
    windows that made none, the patch windows' one."""
    path = choice_path(workdir, which, step, window)
    if window != "patch" and not os.path.exists(path):
        return choice_path(workdir, which, step)
    return path


def require_choice(spec: str, workdir: str, window: str = "patch") -> None:
    """Before a training whose evaluation applies "auto": the best checkpoint's choice
    file (``applied_choice_path`` for the requested ``eval.sw_window``) must be there and
    readable (its classes and step are checked when applied)."""
    if str(spec or "").strip() == "auto":
        read_choice(applied_choice_path(workdir, window=window), "train with "
                    "--config.eval.postprocess=choose to choose it on the validation split "
                    "after training")


def write_choice(workdir: str, choice: dict) -> str:
    path = choice_path(workdir, choice.get("checkpoint", "best"), choice.get("step"),
                       choice.get("sw_window", "patch"))
    fileio.write_json_atomic(path, choice)
    return path


def resolve(spec: str, workdir: str, labels: dict[int, str], which: str = "best",
            step: int | None = None, window: str = "patch") -> str:
    """A spec in its normal spelling, "auto" replaced by the choice of the checkpoint
    ``which`` (step ``step``) made with the evaluation window ``window`` in its choice file
    (``choice_path``), checked against the run's label names and step. Raises ValueError
    naming the field or the file."""
    spec = str(spec or "").strip()
    if spec == "choose":
        raise ValueError("config.eval.postprocess: 'choose' is made by an evaluation (or the "
                         "training command) on the validation split; here use 'auto' to "
                         "apply its choice")
    names = {int(v): n for v, n in labels.items() if int(v) != 0}
    if spec != "auto":
        unknown = [v for v in parse(spec) or () if v not in names]
        if unknown:
            raise ValueError(f"config.eval.postprocess: {spec!r}: no class with label value "
                             f"{unknown[0]} (this run's classes: "
                             + ", ".join(f"{v} {n}" for v, n in sorted(names.items())) + ")")
        return normalise(spec)
    path = applied_choice_path(workdir, which, step, window)
    if path != choice_path(workdir, which, step, window):
        logging.warning("No post-processing chosen with %s windows: applying the patch "
                        "windows' choice, %s", window, path)
    choice, kept, chosen_names = read_choice(path)
    for value, name in chosen_names.items():
        if names.get(value) != name:
            theirs = repr(names[value]) if value in names else "no such class"
            raise ValueError(f"{path}: class {value} is {name!r} there but {theirs} in this "
                             f"run's dataset.json; {_RECOVER}")
    if step is not None and choice.get("step") not in (None, step):
        raise ValueError(f"{path}: chosen on the checkpoint of step {choice.get('step')}, but "
                         f"the {which} checkpoint is step {step} (training went on); "
                         f"{_RECOVER}")
    logging.info("Post-processing from %s: largest component of %s", path,
                 ", ".join(chosen_names[v] for v in kept) if kept else "no class")
    return "largest:" + ",".join(map(str, sorted(kept))) if kept else ""


def resolved_run(run, choose_as_auto: bool = True):
    """A restored run (``state.Run``) whose config has ``eval.postprocess`` resolved for
    its checkpoint ("choose" read as "auto" when ``choose_as_auto``: the choice its
    evaluation made), for predictions as they were tested."""
    import ml_collections  # noqa: PLC0415

    mode = str(run.config.eval.postprocess).strip()
    if mode == "choose" and choose_as_auto:
        mode = "auto"
    from medseg_jax.data import preprocess  # noqa: PLC0415 (scipy)

    config = ml_collections.ConfigDict(run.config.to_dict())
    config.eval.postprocess = resolve(mode, run.workdir, run.labels, run.which, run.step,
                                      preprocess.sw_window(config))
    return dataclasses.replace(run, config=config)
