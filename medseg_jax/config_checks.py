"""The checks of a config's fields that need neither JAX nor files, run before a run
touches its workdir: every numeric field against its constraint in ``NUMBERS``
(``check_numbers``), every field against those the package defines (``check_fields``:
a misspelling). ``medseg_jax.config`` holds the defaults and re-exports these.
"""

import difflib
import math

import ml_collections

from medseg_jax import architectures

# The sweep's lists (config.benchmark.sweep) and the train fields they set.
SWEEP_FIELDS = (("learning_rates", "learning_rate", float), ("batch_sizes", "batch_size", int),
                ("num_epochs", "num_epochs", int), ("patience", "patience", int))


def dotted_value(config, dotted: str):
    """The value of the field ``dotted`` ("train.batch_size"); KeyError if absent."""
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


# --------------------------------------------------------------------------- #
# Numbers: every numeric field and the values it takes
# --------------------------------------------------------------------------- #


class Number:
    """A numeric field's constraint: ``int`` or ``float``, ``lo`` / ``hi`` bounds
    (``open_lo`` / ``open_hi``: excluded), ``note`` for the message (what 0 means)."""

    def __init__(self, kind=float, lo=None, hi=None, open_lo=False, open_hi=False,
                 note="", planned=False):
        self.kind, self.lo, self.hi = kind, lo, hi
        self.open_lo, self.open_hi, self.note = open_lo, open_hi, note
        self.planned = planned  # 0 is "to the plan" while data.plan="auto"

    def bound(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.open_hi else ']'}")
        if self.lo is not None:
            return f"{'>' if self.open_lo else '>='} {self.lo:g}"
        return f"{'<' if self.open_hi else '<='} {self.hi:g}"

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (None: nothing)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if self.kind is int and value != int(value):
            return f"must be a whole number, got {value!r}"
        low = self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi)
        if low or high:
            note = f" ({self.note})" if self.note else ""
            return f"must be {self.bound()}{note}, got {value!r}"
        return None


_COUNT, _NONNEG, _PROB = Number(int, 1), Number(int, 0), Number(float, 0, 1)
_PLANNED = Number(int, 1, planned=True)  # 0 only while data.plan="auto" fills it

# Every numeric field of a config (default_config, the augment section, the models'
# own fields, study_section's "benchmark.*", choose_section's "choose.*") and what it
# must be. A field given as a tuple of numbers is checked entry by entry ("entries");
# "range" is an ordered pair (lo <= hi); "angle" a range or one number d >= 0 for [-d, d].
NUMBERS = {
    "seed": Number(int, 0),
    "data.synthetic_seed": Number(int, 0),
    "data.synthetic_cases": _COUNT,
    "data.synthetic_size": _COUNT,
    "data.synthetic_depth": _COUNT,
    "data.image_size": ("entries", _PLANNED),
    "data.slice_axis": Number(int, 0, 2),
    "data.context_slices": Number(int, 0),
    "data.target_spacing": ("entries", Number(float, 0, open_lo=True)),
    "data.split_fractions": ("entries", _PROB),
    "data.foreground_fraction": _PROB,
    "data.max_case_gib": Number(float, 0, note="0: half of physical memory"),
    "data.num_workers": Number(int, 0, note="0: read in the main process"),
    "model.spatial_dims": Number(int, 2, 3),
    "model.base_features": _PLANNED,
    "model.depth": _PLANNED,
    "model.max_features": Number(int, 0, note="0: no cap"),
    "model.pool_sizes": ("entries", _COUNT),
    "model.kernel_sizes": ("entries", _COUNT),
    "model.dropout_rate": Number(float, 0, 1, open_hi=True),
    "model.blocks_per_stage": ("entries", _COUNT),
    "model.decoder_convs": _COUNT,
    "train.batch_size": _PLANNED,
    "train.learning_rate": Number(float, 0, open_lo=True),
    "train.momentum": Number(float, 0, 1, open_hi=True),
    "train.weight_decay": Number(float, 0),
    "train.grad_clip_norm": Number(float, 0, note="0: no clipping"),
    "train.ema_decay": Number(float, 0, 1, open_hi=True, note="0: off"),
    "train.num_epochs": _COUNT,
    "train.steps_per_epoch": Number(int, 0, note="0: one pass"),
    "train.budget_minutes": Number(float, 0, note="0: off"),
    "train.val_max_samples": Number(int, 0, note="0: all"),
    "train.val_max_cases": Number(int, 0, note="0: all"),
    "train.best_ema": Number(float, 0, 1, open_hi=True, note="0: the raw metric"),
    "train.patience": Number(int, 0, note="0: no early stopping"),
    "train.min_delta": Number(float, 0),
    "train.freeze_encoder_epochs": Number(int, 0),
    "train.dice_weight": Number(float, 0),
    "train.ce_weight": Number(float, 0),
    "train.log_every_steps": _COUNT,
    "train.prefetch": _COUNT,
    "train.checkpoint_max_to_keep": _COUNT,
    "train.keep_every_minutes": Number(float, 0, note="0: off"),
    "augment.rotate_degrees": ("angle", Number(float, -360, 360)),
    "augment.scale_range": ("range", Number(float, 0, open_lo=True)),
    "augment.flip_axes": ("entries", Number(int, 0, 2)),
    "augment.brightness_range": ("range", Number(float, 0)),
    "augment.contrast_range": ("range", Number(float, 0)),
    "augment.gamma_range": ("range", Number(float, 0, open_lo=True)),
    "augment.noise_std": Number(float, 0),
    "augment.scale_axes": ("entries", Number(int, 0, 2)),
    "augment.blur_sigma": ("range", Number(float, 0, open_lo=True)),
    "augment.lowres_range": ("range", Number(float, 0, 1, open_lo=True)),
    "augment.lowres_axes": ("entries", Number(int, 0, 2)),
    "eval.batch_size": _COUNT,
    "eval.sw_overlap": Number(float, 0, 1, open_hi=True),
    "eval.nsd_tolerance_mm": Number(float, 0),
    "eval.bootstrap_samples": _COUNT,
    "benchmark.budget_minutes": Number(float, 0, note="0: off"),
    "benchmark.image_size_3d": ("entries", _COUNT),
    "benchmark.batch_size_3d": Number(int, 0, note="0: from the plan"),
    "benchmark.freeze_encoder_epochs": Number(int, 0),
    "choose.budget_minutes": Number(float, 0, open_lo=True),
}
# The augmentation probabilities: augment.p_* (every one, also those added later).
PROBABILITY_PREFIX = "augment.p_"


def _numbers_of(config) -> dict:
    """``{dotted: value}`` of the config's fields that NUMBERS or the probability rule
    constrain (the fields it has)."""
    out = {}
    for dotted in NUMBERS:
        try:
            out[dotted] = dotted_value(config, dotted)
        except (KeyError, AttributeError):
            continue
    if "augment" in config:
        for key in config.augment:
            if f"augment.{key}".startswith(PROBABILITY_PREFIX):
                out[f"augment.{key}"] = config.augment[key]
    return out


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Checks every numeric field against NUMBERS (augment.p_*: in [0, 1]); no JAX, no
    files: run before anything else. Raises ValueError naming the first bad field. Checks
    the fields the config has (a section it lacks is skipped: hence the ``.get``s)."""
    planned = str(config.get("data", {}).get("plan", "")) == "auto"
    for dotted, value in _numbers_of(config).items():
        rule = NUMBERS.get(dotted, _PROB)
        shape, rule = rule if isinstance(rule, tuple) else ("number", rule)
        if rule.planned and planned and value in (0, ()):
            continue  # filled from the data
        if shape == "number":
            problem = rule.problem(value)
        elif not isinstance(value, (tuple, list)):
            if shape == "angle":  # one number d: [-d, d]
                problem = rule.problem(value) or (None if value >= 0 else
                                                  f"must be >= 0 (for [-d, d]), got {value!r}")
            else:
                problem = f"must be a tuple of numbers, got {value!r}"
        elif shape == "entries":
            flat = [v for entry in value
                    for v in (entry if isinstance(entry, (tuple, list)) else (entry,))]
            problem = next((f"entry {v!r}: {p}" for v in flat
                            if (p := rule.problem(v)) is not None), None)
        else:  # an ordered pair
            problem = next((p for v in value if (p := rule.problem(v)) is not None), None)
            if problem is None and (len(value) != 2 or value[0] > value[1]):
                problem = f"must be a pair (lo, hi) with lo <= hi, got {tuple(value)!r}"
        if problem:
            raise ValueError(f"config.{dotted}: {problem}")
    sweep = config.get("benchmark", {}).get("sweep", {})
    for name, field, cast in SWEEP_FIELDS:  # each swept value, as its train field's
        for entry in str(sweep.get(name, "")).split(","):
            try:
                problem = NUMBERS[f"train.{field}"].problem(cast(entry.strip()))
            except ValueError:  # not a number: named by the study (study.sweep_grid)
                continue
            if problem:
                raise ValueError(f"config.benchmark.sweep.{name}: entry {entry.strip()!r} "
                                 f"(train.{field}): {problem}")
    train = config.get("train", {})
    if "dice_weight" in train and not (train.dice_weight > 0 or train.ce_weight > 0):
        raise ValueError("config.train.dice_weight / ce_weight: both 0 leave no loss to "
                         "train on; give one a weight > 0")


def check_fields(config: ml_collections.ConfigDict, defaults: dict, study: dict,
                 choose: dict | None = None) -> None:
    """Every field of ``config`` is one the package defines: ``defaults``' (and ``study``'s
    in a study config, ``choose``'s in configs/auto.py), in ``model`` the architecture's
    own too (in a study, any architecture's). A misspelled field in a config file would
    otherwise be added and ignored. Raises ValueError naming the first unknown field and
    the closest known one."""
    known = dict(defaults)
    if "benchmark" in config:
        known["benchmark"] = study
    if "choose" in config and choose is not None:
        known["choose"] = choose
    models = architectures.fields()
    name = config.get("model", {}).get("name")
    own = ([models[name]] if name in models and "benchmark" not in config
           else list(models.values()))  # a study keeps each architecture's own fields
    known["model"] = {"name": name, **{f: d for fields in own for f, d in fields.items()}}
    _check_known(config, known, "config")


def _check_known(values, known: dict, where: str) -> None:
    for key in values:
        if key not in known:
            owners = [m for m, f in architectures.extras().items() if key in f]
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = (f"a field of model {owners[0]} (configs/{owners[0]}.py)"
                    if where == "config.model" and owners else
                    f"did you mean {close[0]!r}?" if close else
                    f"valid: {', '.join(sorted(known))}")
            raise ValueError(f"{where}.{key}: {where} has no field {key!r}; {hint}")
        if isinstance(known[key], dict) and hasattr(values[key], "keys"):
            _check_known(values[key], known[key], f"{where}.{key}")
