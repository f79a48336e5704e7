"""Every config field's meaning, read from the comments of the code that defines it.

The meanings are the comments of ``medseg_jax/config.py`` (``default_config``,
``study_section`` and ``choose_section``: the comment lines directly above a field and
its trailing comment), the ``Fields:`` list of ``default_augment_config``'s docstring
(``medseg_jax/config_augment.py``) and the commented fields of the architectures in
``medseg_jax/models`` (FCN's ``dropout_rate``, ...: ``architectures.py``). The sources are parsed (``ast``,
``tokenize``), never imported: listing a config adds no JAX or Flax import.

``listing(config)`` gives ``section.field = value  # meaning``, one line a field (the
command line's ``--show_config``); ``markdown()`` gives docs/configuration.md:

    python -m medseg_jax.config_fields > docs/configuration.md
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Any

from medseg_jax import architectures
from medseg_jax.architectures import above as _above, read_comments as _comments
from medseg_jax.architectures import join as _join, trailing as _trailing

PACKAGE = Path(__file__).resolve().parent
CONFIG_SOURCE = PACKAGE / "config.py"
AUGMENT_SOURCE = PACKAGE / "config_augment.py"

# The functions of config.py whose fields are listed, and the section each one builds.
_BUILDERS = {"default_config": "", "study_section": "benchmark", "choose_section": "choose"}
_RULE = re.compile(r"^-{3,}\s*(.*?)\s*-*$")  # "# --- data: ... -----" section rules


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``data.root`` for the target ``data.root`` when ``data`` is an alias of the data
    section (``config.data = data = ...``); None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases or not parts:
        return None
    return ".".join(p for p in (aliases[node.id], *parts) if p)


def _is_section(value: ast.expr) -> bool:
    """``ConfigDict()`` or a call of a ``*_config()`` function (``default_augment_config``)."""
    name = getattr(value.func, "attr", getattr(value.func, "id", "")) if isinstance(
        value, ast.Call) else ""
    return name == "ConfigDict" or name.endswith("_config")


def _section_text(block: list[str]) -> str:
    """A section's comment without its ``--- name ---`` rule (and the bare name)."""
    lines = []
    for line in block:
        rule = _RULE.match(line.strip())
        if rule:
            line = rule.group(1).split(":", 1)[1].strip() if ":" in rule.group(1) else ""
            line += "." if line and line[-1] not in ".:;" else ""
        lines.append(line)
    return _join(lines)


@functools.lru_cache(maxsize=None)
def _config_meanings(path: Path = CONFIG_SOURCE) -> tuple[dict[str, str], dict[str, str]]:
    """({dotted field: meaning}, {section: description}) of config.py's builders."""
    source = path.read_text()
    comments = _comments(source)
    fields, sections = {}, {}
    for func in ast.parse(source).body:
        if not isinstance(func, ast.FunctionDef) or func.name not in _BUILDERS:
            continue
        root = _BUILDERS[func.name]
        aliases = {}
        for node in func.body:
            if not isinstance(node, ast.Assign):
                continue
            if _is_section(node.value):
                # `b = ConfigDict()` (the function's own section), `config.data = data =
                # ConfigDict()` (a section of it, with its alias), `config.augment = ...`
                section = next((d for t in node.targets if (d := _dotted(t, aliases))), root)
                aliases.update({t.id: section for t in node.targets
                                if isinstance(t, ast.Name)})
                if section:
                    sections[section] = _section_text(_above(comments, node.lineno))
                continue
            for target in node.targets:
                name = _dotted(target, aliases)
                if name:
                    fields[name] = _join(_above(comments, node.lineno)
                                         + _trailing(comments, node))
    return fields, sections


@functools.lru_cache(maxsize=None)
def _augment_meanings() -> dict[str, str]:
    """{augment.field: meaning} from the ``Fields:`` list of default_augment_config's
    docstring (``name: text`` or ``name, name: text`` entries, continued by deeper
    indented lines)."""
    source = AUGMENT_SOURCE.read_text()
    func = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "default_augment_config")
    doc = ast.get_docstring(func) or ""
    fields, names, indent, listing = {}, [], None, False
    for line in doc.splitlines():
        if line.strip() == "Fields:":
            listing = True
            continue
        if not listing or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        entry = re.match(r"\s*([a-z_0-9]+(?:,\s*[a-z_0-9]+)*):\s+(.*)", line)
        if entry and (indent is None or depth == indent):
            indent = depth
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                fields[f"augment.{name}"] = entry.group(2).strip()
        elif indent is not None and depth > indent:
            for name in names:
                fields[f"augment.{name}"] += " " + line.strip()
        else:
            break
    return fields


def meanings() -> dict[str, str]:
    """{dotted field: meaning} of every field the package defines, in the order of the
    sources (config.py, config_augment.py's docstring, the models)."""
    model = architectures.meanings()
    found = {**_config_meanings()[0], **_augment_meanings()}
    found.update({k: v for k, v in model.items() if k not in found})
    return found


def sections() -> dict[str, str]:
    """{section: description} (e.g. "model": "the network is built as ...")."""
    return dict(_config_meanings()[1])


def model_extras() -> dict[str, dict[str, Any]]:
    """{model name: {field: default}} of the fields only that architecture has."""
    return architectures.extras()


def file_meanings(path: str) -> dict[str, str]:
    """{dotted field: meaning} of the ``config.a.b = ...  # meaning`` lines of a config
    file (its own fields; the package's meanings come first)."""
    try:
        source = Path(path).read_text()
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return {}
    comments = _comments(source)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                name = _dotted(target, {"config": ""})
                text = _join(_above(comments, node.lineno) + _trailing(comments, node))
                if name and text:
                    found[name] = text
    return found


def flatten(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """[(dotted field, value)] of a ConfigDict (or dict), in the order config.py defines
    its sections and fields (fields it does not define last in their section)."""
    items = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            items.extend(flatten(value, name + "."))
        else:
            items.append((name, value))
    if prefix:
        return items
    fields = {name: i for i, name in enumerate(meanings())}
    groups = {"": -1, **{name: i for i, name in enumerate(sections())}}

    def rank(item):
        section = item[0].rsplit(".", 1)[0] if "." in item[0] else ""
        return groups.get(section, len(groups)), fields.get(item[0], len(fields)), item[0]

    return sorted(items, key=rank)


def listing(config: Any, config_file: str = "") -> str:
    """``section.field = value  # meaning``, one line a field of ``config``."""
    known = {**file_meanings(config_file), **meanings()} if config_file else meanings()
    lines = []
    for name, value in flatten(config):
        meaning = known.get(name, "")
        lines.append(f"{name} = {value!r}" + (f"  # {meaning}" if meaning else ""))
    return "\n".join(lines) + "\n"


HEADER = """\
# Configuration

<!-- Generated by `python -m medseg_jax.config_fields > docs/configuration.md` from the
comments of medseg_jax/config.py, medseg_jax/config_augment.py and medseg_jax/models: edit
those, then regenerate (tests/test_config_fields.py checks that this file is current). -->

Every field below can be set in a config file (`configs/*.py` start from
`medseg_jax.config.default_config()`) or overridden on the command line, e.g.
`--config.train.learning_rate=3e-4` or `--config.data.image_size='(32,32)'` (a tuple in
one quoted argument; given twice, the last one counts). The values of one config file,
overrides applied, with these meanings:

    medseg-jax --config=configs/unet.py --show_config

A config file is Python code, run as such when it is loaded: use only config files you
trust.
"""


def _cell(text: Any) -> str:
    """Text for a table cell: pipes escaped, and ``<`` outside code (``<workdir>``
    would be read as an HTML tag)."""
    parts = re.split(r"(``.*?``|`[^`]*`)", str(text))
    text = "".join(p if p.startswith("`") else p.replace("<", "&lt;") for p in parts)
    return text.replace("|", "\\|")


def _table(rows: list[tuple[str, Any, str]]) -> list[str]:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{_cell(n)}` | `{_cell(repr(v))}` | {_cell(m)} |" for n, v, m in rows]
    return lines + [""]


def markdown() -> str:
    """docs/configuration.md: every field of ``default_config()``, the fields of each
    architecture, the ``benchmark`` section (``study_section()``) and the ``choose``
    section (``choose_section()``)."""
    from medseg_jax.config import choose_section, default_config, study_section  # noqa: PLC0415

    known, described = meanings(), sections()
    config = default_config()
    config.benchmark = study_section()
    config.choose = choose_section()
    groups: dict[str, list[tuple[str, Any, str]]] = {}
    for name, value in flatten(config):
        section = name.rsplit(".", 1)[0] if "." in name else "top level"
        groups.setdefault(section, []).append((name, value, known.get(name, "")))
    out = [HEADER]
    for section, rows in groups.items():
        out.append(f"## {section}\n")
        if described.get(section):
            out.append(described[section] + "\n")
        if section == "benchmark":
            out.append("Only in study configs (`configs/benchmark.py`, "
                       "`configs/benchmark_recipe.py`).\n")
        if section == "choose":
            out.append("Only in `configs/auto.py` (the planned 2D and 3D configurations "
                       "trained and compared, the best kept: docs/training.md).\n")
        out += _table(rows)
        if section == "model":
            out.append("### Fields of one architecture\n")
            out.append("Set by that architecture's config file (`configs/fcn.py`, "
                       "`configs/attention_unet.py`); another architecture refuses them.\n")
            out += _table([(f"model.{f}", d, f"{model}: {known.get(f'model.{f}', '')}")
                           for model, fields in model_extras().items()
                           for f, d in fields.items()])
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
