"""The architectures of ``medseg_jax/models`` (its ``MODELS`` registry) and their config
fields: names, defaults and the comments that explain them, read from the sources
(``ast``, ``tokenize``), never imported: checking or listing a config adds no JAX or
Flax import. Also the comment reading that ``config_fields`` uses for config.py.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "models"


def read_comments(source: str) -> dict[int, tuple[str, bool]]:
    """{line: (comment text, whether the comment is the line's only content)}."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            own_line = not tok.line[:tok.start[1]].strip()
            found[tok.start[0]] = (tok.string[1:].rstrip(), own_line)
    return found


def join(lines: list[str]) -> str:
    return " ".join(line.strip() for line in lines if line.strip())


def above(comments: dict[int, tuple[str, bool]], line: int) -> list[str]:
    """The comment lines directly above ``line`` (no blank or code line between)."""
    block = []
    while (line - 1) in comments and comments[line - 1][1]:
        line -= 1
        block.insert(0, comments[line][0])
    return block


def trailing(comments: dict[int, tuple[str, bool]], node: ast.stmt) -> list[str]:
    return [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
            if n in comments and not comments[n][1]]


@functools.lru_cache(maxsize=None)
def _read() -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, Any]]:
    """({model.field: meaning} of every commented model field, {model name: {field:
    default}} of the fields one architecture adds to the shared ones, {field: default} of
    the shared ones), from the classes registered in models/__init__.py's MODELS."""
    init = ast.parse((SOURCE / "__init__.py").read_text())
    registry = next(n.value for n in ast.walk(init) if isinstance(n, ast.AnnAssign)
                    and getattr(n.target, "id", None) == "MODELS")
    names = {v.id: k.value for k, v in zip(registry.keys, registry.values)}
    classes = {}  # class name: (bases, {field: (default, meaning)})
    for path in sorted(SOURCE.glob("*.py")):
        source = path.read_text()
        comments = read_comments(source)
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            own = {}
            for item in node.body:
                if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                        and item.value is not None
                        and "ClassVar" not in ast.unparse(item.annotation)):
                    try:
                        default = ast.literal_eval(item.value)
                    except ValueError:
                        default = ast.unparse(item.value)
                    own[item.target.id] = (default, join(
                        above(comments, item.lineno) + trailing(comments, item)))
            classes[node.name] = ([getattr(b, "id", "") for b in node.bases], own)
    found, added = {}, {}
    shared = classes["SegmentationNet"][1]
    for field, (_, meaning) in shared.items():
        if meaning:
            found[f"model.{field}"] = meaning
    for cls, model in names.items():
        bases, own = classes[cls]
        assert "SegmentationNet" in bases, cls
        added[model] = {f: d for f, (d, _) in own.items() if f not in shared}
        found.update({f"model.{f}": m for f, (_, m) in own.items()
                      if m and f not in shared})
    return found, added, {f: d for f, (d, _) in shared.items()}


def meanings() -> dict[str, str]:
    """{model.field: meaning} of every commented model field."""
    return dict(_read()[0])


def extras() -> dict[str, dict[str, Any]]:
    """{model name: {field: default}} of the fields only that architecture has."""
    return {k: dict(v) for k, v in _read()[1].items()}


def fields() -> dict[str, dict[str, Any]]:
    """{model name: {field: default}} of every config field of each architecture (the
    shared ones and its own; ``models.model_fields`` without importing the models)."""
    _, own, shared = _read()
    return {name: {**shared, **f} for name, f in own.items()}
