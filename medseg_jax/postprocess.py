"""Post-processing of predicted label maps, and its choice per class on validation.

nnU-Net's post-processing keeps, for a class, only its largest connected component
(stray islands of a prediction become background), and decides per class whether to
do so from its validation results. ``eval.postprocess`` says what is applied:

- ``""``: nothing (the default);
- ``"largest"``: every foreground class;
- ``"largest:1,7"``: the classes with these label values only;
- ``"choose"``: evaluation of a split other than test scores every class with and
  without it from one prediction pass, keeps it for each class whose mean Dice it
  raises, and writes the choice to ``<workdir>/postprocessing.json``;
- ``"auto"``: what ``postprocessing.json`` says (evaluation and prediction).

This module owns the component filter, the spec's parsing and the choice file; the
evaluation that scores the choice is ``evaluate.py``'s.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging

from medseg_jax import fileio

CHOICE_FILE = "postprocessing.json"
MODES = ("", "largest", "choose", "auto")
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


def require_choice(spec: str, workdir: str) -> None:
    """Before a training whose evaluation applies "auto": the choice file must be there
    and readable (its classes are checked when it is applied)."""
    if str(spec or "").strip() == "auto":
        fileio.read_json(os.path.join(workdir, CHOICE_FILE),
                         "the post-processing chosen on validation, for eval.postprocess=auto",
                         "train with --config.eval.postprocess=choose to choose it on the "
                         "validation split after training")


def write_choice(workdir: str, choice: dict) -> str:
    path = os.path.join(workdir, CHOICE_FILE)
    fileio.write_json_atomic(path, choice)
    return path


def resolve(spec: str, workdir: str, labels: dict[int, str], step: int | None = None) -> str:
    """A spec with "auto" replaced by the choice in ``<workdir>/postprocessing.json``
    (checked against the run's label names; a choice made on another checkpoint step
    than ``step`` is used with a warning). Raises ValueError naming the file."""
    spec = str(spec or "").strip()
    if spec == "choose":
        raise ValueError("config.eval.postprocess: 'choose' scores a split; it applies to "
                         "--mode=eval on the validation split, not here")
    names = {int(v): n for v, n in labels.items() if int(v) != 0}
    if spec != "auto":
        unknown = [v for v in parse(spec) or () if v not in names]
        if unknown:
            raise ValueError(f"config.eval.postprocess: {spec!r}: no class with label value "
                             f"{unknown[0]} (this run's classes: "
                             + ", ".join(f"{v} {n}" for v, n in sorted(names.items())) + ")")
        return spec
    path = os.path.join(workdir, CHOICE_FILE)
    choice = fileio.read_json(path, "the post-processing chosen on validation", _RECOVER)
    try:
        kept = [int(v) for v in choice["largest"]]
        chosen_names = {int(row["value"]): str(name)
                        for name, row in choice["classes"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a post-processing choice ({type(e).__name__}: {e}); "
                         f"{_RECOVER}") from None
    for value, name in chosen_names.items():
        if names.get(value) != name:
            raise ValueError(
                f"{path}: class {value} is {name!r} there but {names.get(value)!r} in this "
                f"run's dataset.json; {_RECOVER}")
    if any(v not in chosen_names for v in kept):
        raise ValueError(f"{path}: 'largest' names a class without its row; {_RECOVER}")
    if step is not None and choice.get("step") not in (None, step):
        logging.warning("%s was chosen on the checkpoint of step %s; evaluating step %d with it",
                        path, choice.get("step"), step)
    logging.info("Post-processing from %s: largest component of %s", path,
                 ", ".join(chosen_names[v] for v in kept) if kept else "no class")
    return "largest:" + ",".join(map(str, kept)) if kept else ""
