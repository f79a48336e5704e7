"""Left / right label pairs, and what a mirror does to them.

A mirror (a flip of an odd number of axes) turns a left organ into something that looks
exactly like its right counterpart: trained with plain mirroring, a network cannot tell
``LeftParotid`` from ``RightParotid`` and predicts both on both sides. The sound
augmentation keeps the mirror but swaps the pair's label values (as the image of a real
patient, mirrored, would be labelled), and test-time mirroring swaps the pair's
probability channels back. This module owns the pairs: found from the label names of
``dataset.json`` (``data.lateral_pairs = "auto"``), given by value (``"3:4,5:6"``) or
turned off (``"none"``), and the label permutation the augmentation and the prediction
apply.

A flip of an even number of axes is a rotation (chirality kept): nothing is swapped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

_LEFT = {"left", "lt", "l", "links", "sinister", "sin"}
_RIGHT = {"right", "rt", "r", "rechts", "dexter", "dex"}
_SHORT = {"l", "r", "lt", "rt", "sin", "dex"}  # only as the first or the last word


def _words(name: str) -> list[str]:
    """``"LeftParotid"``, ``"parotid_L"``, ``"Kidney (left)"`` -> lower-case words."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))
    return [w for w in re.split(r"[^0-9a-zA-Z]+", spaced.lower()) if w]


def side(name: str) -> tuple[str, str] | None:
    """``("left" | "right", the name without its side)`` when ``name`` names one side."""
    words = _words(name)
    found = []
    for i, w in enumerate(words):
        if w in _SHORT and 0 < i < len(words) - 1:
            continue  # "l" inside a name is not a side
        if w in _LEFT:
            found.append((i, "left"))
        elif w in _RIGHT:
            found.append((i, "right"))
    if len(found) != 1 or len(words) < 2:
        return None
    i, which = found[0]
    return which, " ".join(words[:i] + words[i + 1:])


def find_pairs(labels: Mapping[int, str]) -> list[tuple[int, int]]:
    """``(left value, right value)`` for every left / right pair among the label names
    (values sorted; a side without its counterpart, or a part named twice, is no pair)."""
    by_part: dict[str, dict[str, list[int]]] = {}
    for value, name in labels.items():
        s = side(name)
        if s is not None and int(value) != 0:
            by_part.setdefault(s[1], {}).setdefault(s[0], []).append(int(value))
    pairs = [(sides["left"][0], sides["right"][0]) for sides in by_part.values()
             if len(sides.get("left", ())) == 1 and len(sides.get("right", ())) == 1]
    return sorted(pairs)


def parse_pairs(spec: str, labels: Mapping[int, str],
                field: str = "config.data.lateral_pairs") -> list[tuple[int, int]]:
    """The pairs ``spec`` asks for: ``"auto"`` (from the names), ``"none"`` or ``""``,
    or label values ``"3:4,5:6"``; a ValueError names ``field`` when it is wrong."""
    spec = str(spec).strip()
    if spec == "auto":
        return find_pairs(labels)
    if spec in ("", "none"):
        return []
    values = {int(v) for v in labels}
    pairs, seen = [], set()
    for item in spec.split(","):
        try:
            a, b = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"{field}: {item.strip()!r} is not a pair of label values "
                             "'a:b' (use 'auto', 'none' or e.g. '3:4,5:6')") from None
        for v in (a, b):
            if v not in values or v == 0:
                raise ValueError(f"{field}: {v} is not a foreground label value of the "
                                 f"data set ({', '.join(str(x) for x in sorted(values) if x)})")
        if a == b or a in seen or b in seen:
            raise ValueError(f"{field}: {item.strip()!r}: a label may be in one pair only, "
                             "with another label")
        seen.update((a, b))
        pairs.append((a, b))
    return pairs


def permutation(pairs, num_classes: int) -> tuple[int, ...] | None:
    """The label map a mirror applies (``perm[v]`` is ``v``'s new value), or None without
    pairs. Also the channel order that swaps the pairs' probabilities: ``p[..., perm]``."""
    if not pairs:
        return None
    perm = list(range(num_classes))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


def describe(pairs, labels: Mapping[int, str]) -> str:
    return ", ".join(f"{labels.get(a, a)} <-> {labels.get(b, b)}" for a, b in pairs) or "none"


def label_permutation(config, labels: Mapping[int, str], num_classes: int):
    """The run's mirror permutation from ``config.data.lateral_pairs`` (None: no pairs)."""
    spec = config.data.lateral_pairs
    return permutation(parse_pairs(spec, labels), num_classes)


def swap_mirrored(mirrored, perm, labels, annotated=None):
    """``labels`` (B, *spatial) and ``annotated`` flags (B, K) (or None) with the pairs
    exchanged in the samples that ``mirrored`` (B,) marks (jittable)."""
    flag = mirrored.reshape(mirrored.shape + (1,) * (labels.ndim - 1))
    labels = jnp.where(flag, jnp.asarray(perm, labels.dtype)[labels], labels)
    if annotated is not None:
        annotated = jnp.where(mirrored[:, None], annotated[:, jnp.asarray(perm)], annotated)
    return labels, annotated
