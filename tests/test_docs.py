"""The README and docs/ say only what the code has: every ``python -m medseg_jax...`` /
``medseg-jax`` command names a real module and real flags, every ``--config.<field>``
override a real field of the config the command loads, every repository path
(``configs/*.py``, ``benchmarks/...``) exists, every pip extra is declared, and every
relative link and #anchor resolves. The checks read the code (flag definitions, configs,
pyproject.toml), so they follow it; no JAX training runs here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONSOLE_SCRIPTS = {"medseg-jax": "medseg_jax.main"}
# absl's own flags (app.run defines the help flags; absl.logging its flags on import).
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok",
              "only_check_args", "pdb", "pdb_post_mortem", "run_with_pdb",
              "run_with_profiling", "profile_file", "use_cprofile_for_profiling"}
REPO_PATH_RE = re.compile(r"(?<![\w/.])((?:configs|benchmarks|launch|tests|medseg_jax)/"
                          r"[\w./-]*\.(?:py|sh|sbatch))(?![\w])")
COMMAND_RE = re.compile(r"(?:\bpython3? -m ([\w.<>]+)|(?<![\w/-])(medseg-jax)(?![\w-]))")
EXTRA_RE = re.compile(r"pip install (?:-e )?'?\.\[([\w,]+)\]'?")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NAME_RE = re.compile(r"\bmedseg_jax(?:\.\w+)+")
COMMAND_END = {"&&", "||", "|", ";", ">", "2>", "#"}


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", root / "CHANGELOG.md",
            *sorted((root / "docs").rglob("*.md"))]


def split_code(text: str) -> tuple[str, list[str]]:
    """(prose with fenced blocks blanked, the fenced blocks' texts)."""
    prose, blocks, block = [], [], None
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                blocks.append("\n".join(block))
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def command_texts(text: str) -> list[str]:
    """Command lines: fenced-block lines (continuations joined, comments dropped) and
    inline code spans of the prose."""
    prose, blocks = split_code(text)
    out = []
    for block in blocks:
        out.extend(re.sub(r"\\\n\s*", " ", block).split("\n"))
    out.extend(span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose))
    return out


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, argument tokens) of every command in the text."""
    found = []
    for line in command_texts(text):
        for m in COMMAND_RE.finditer(line):
            module = m.group(1) or CONSOLE_SCRIPTS[m.group(2)]
            rest = line[m.end():]
            try:
                tokens = shlex.split(rest, comments=True)
            except ValueError:
                tokens = rest.split()
            args = []
            for token in tokens:
                if token in COMMAND_END or COMMAND_RE.match(token) or token == "python":
                    break
                args.append(token.strip("[]"))
            found.append((module.rstrip("."), args))
    return found


def module_flags(module: str) -> frozenset[str] | None:
    """The flags a command may give ``module`` (None: no such module)."""
    defined = defined_flags(module)
    if defined is None:
        return None
    return defined | ABSL_FLAGS


@functools.cache
def defined_flags(module: str) -> frozenset[str] | None:
    """The flags a command-line module defines (None: no such module): the DEFINE_* calls
    of its source (tools define theirs in a function, not on import) and, for a module that
    defines flags on import, absl's registry after importing it. The import runs in a child
    process, so this process's flags stay as the other tests expect them."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).read_text(encoding="utf-8")
    names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", source))
    if re.search(r"^\S.*\bDEFINE_\w+\(", source, re.M):
        code = ("import importlib, json; from absl import flags; "
                f"importlib.import_module({module!r}); "
                "print(json.dumps([f.name for mod, fl in flags.FLAGS.flags_by_module_dict()"
                f".items() if mod == {module!r} or mod.startswith('absl.') for f in fl]))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        names |= set(json.loads(out.stdout.strip().splitlines()[-1]))
    return frozenset(names)


def _load_config_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@functools.cache
def config_for(config_arg: str | None, root: Path = ROOT):
    """The ConfigDict a ``--config=`` argument loads; configs/run.py:WORKDIR (a run's own
    config.json) and a missing --config: every default field and the study's section."""
    from medseg_jax.config import default_config, study_section

    path = (config_arg or "").split(":")[0]
    if path and Path(path).name != "run.py":
        return _load_config_file(root / path)
    config = default_config()
    config.benchmark = study_section()
    return config


def field_problem(config, dotted: str, model_names: set[str]) -> str | None:
    """None if ``dotted`` (after ``config.``) is a field of ``config``; the model section
    also has the fields of the architectures named."""
    from medseg_jax import models

    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if i == 1 and parts[0] == "model":
            extra = set()
            for name in model_names:
                if name in models.MODELS:
                    extra |= set(models.model_fields(name))
            if part in node or part in extra:
                return None if len(parts) == 2 else f"config.{dotted}: not a section"
        if not hasattr(node, "keys") or part not in node:
            return f"config.{'.'.join(parts[:i + 1])}: no such field"
        node = node[part]
    return None


def check_command(module: str, args: list[str], root: Path = ROOT) -> list[str]:
    known = module_flags(module)
    if known is None:
        return [f"python -m {module}: no such module"]
    problems = []
    config_arg, overrides, model_names = None, [], set()
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name, _, value = arg[2:].partition("=")
        if name == "config":
            config_arg = value
            path = value.split(":")[0]
            if path and not (root / path).is_file():
                problems.append(f"{arg}: no such config file")
        elif name.startswith("config.") and "config" in known:
            overrides.append(name[len("config."):])
            if name == "config.model.name":
                model_names.add(value)
        elif name not in known and not (name.startswith("no") and name[2:] in known):
            problems.append(f"python -m {module}: unknown flag --{name}")
    if overrides and not problems:
        config = config_for(config_arg, root)
        model_names.add(config.model.name)
        for dotted in overrides:
            problem = field_problem(config, dotted, model_names)
            if problem:
                problems.append(f"{module} --config={config_arg}: {problem}")
    return problems


@functools.cache
def name_problem(dotted: str) -> str | None:
    """None if ``dotted`` is a module of the package or a name in one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if i == len(parts):
            return None  # a module: found, not imported
        obj = importlib.import_module(module)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{dotted}: {module} has no {attr!r}"
            obj = getattr(obj, attr)
        return None
    return f"{dotted}: no such module"


@functools.cache
def declared_extras(root: Path = ROOT) -> frozenset[str]:
    with open(root / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return frozenset(project.get("optional-dependencies", {}))


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    prose, _ = split_code(text)
    slugs, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = "".join(c for c in title.lower()
                       if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def check_links(path: Path, text: str) -> list[str]:
    prose, _ = split_code(text)
    problems = []
    for target in LINK_RE.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: link {target}: {file_part} does not exist")
            continue
        if anchor and dest.suffix == ".md":
            if anchor not in heading_slugs(dest.read_text(encoding="utf-8")):
                problems.append(f"{path.name}: link {target}: no heading #{anchor}")
    return problems


def check_text(path: Path, text: str, root: Path = ROOT) -> list[str]:
    """Every problem of one Markdown file."""
    problems = check_links(path, text)
    for module, args in commands(text):
        if "<" in module:
            continue  # a placeholder: python -m medseg_jax.tools.<name>
        problems += [f"{path.name}: {p}" for p in check_command(module, args, root)]
    # Quoted messages (the troubleshooting table's "<file>: <what is wrong>") name wrong
    # fields and paths on purpose: the rest of the text is checked.
    text = re.sub(r"`[^`]*: [^`]*`", "``", text)
    # --config.<field> named alone in the prose: a field of some config.
    prose, _ = split_code(text)
    for span in re.findall(r"`([^`]+)`", prose):
        for m in re.finditer(r"(?:^|\s)--config\.([\w.]+)(?![\w.<])", span):
            if not COMMAND_RE.search(span):
                problem = field_problem(config_for(None, root), m.group(1),
                                        {"unet", "fcn", "attention_unet"})
                if problem:
                    problems.append(f"{path.name}: `{span}`: {problem}")
    for dotted in sorted(set(NAME_RE.findall(text))):
        problem = name_problem(dotted)
        if problem:
            problems.append(f"{path.name}: {problem}")
    for rel in REPO_PATH_RE.findall(text):
        if not (root / rel).exists():
            problems.append(f"{path.name}: {rel} does not exist")
    for group in EXTRA_RE.findall(text):
        for extra in group.split(","):
            if extra not in declared_extras(root):
                problems.append(f"{path.name}: pip extra [{extra}] is not in pyproject.toml")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_is_true_to_the_code(path):
    assert check_text(path, path.read_text(encoding="utf-8")) == []


def test_docs_name_commands_and_links():
    """The checks above have something to check."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    modules = {m for m, _ in commands(text)}
    assert {"medseg_jax.main", "medseg_jax.tools.check_data"} <= modules
    assert len(LINK_RE.findall(text)) > 10


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[test]' && pytest\n" in readme
    assert "pip install --quiet -e '.[test]'" in ci and re.search(r"^pytest\b", ci, re.M)


def test_slugs_follow_github():
    text = "# A / b (2.5D)\n## `x.y` again\n## Again\n## Again\n```\n# not a heading\n```\n"
    assert heading_slugs(text) == {"a--b-25d", "xy-again", "again", "again-1"}


README_SAMPLE = """\
```bash
python -m medseg_jax.main --config=configs/unet.py --workdir=runs/x \\
    --config.train.learning_rate=3e-4 --mode=eval
```
Then `python -m medseg_jax.tools.check_data --root=DATA`, see [data](docs/data.md#check-a-data-set);
from Python, `medseg_jax.data.check.check(roots)`.
"""


@pytest.mark.parametrize("old,new,expected", [
    ("--mode=eval", "--moed=eval", "unknown flag --moed"),
    ("--config.train.learning_rate", "--config.train.learning_rat",
     "config.train.learning_rat: no such field"),
    ("configs/unet.py", "configs/unett.py", "configs/unett.py"),
    ("medseg_jax.tools.check_data", "medseg_jax.tools.chek_data", "no such module"),
    ("--root=DATA", "--rot=DATA", "unknown flag --rot"),
    ("docs/data.md#check", "docs/data.md#chek", "no heading #chek-a-data-set"),
    ("docs/data.md", "docs/dat.md", "docs/dat.md does not exist"),
    ("check.check(", "check.chek(", "medseg_jax.data.check has no 'chek'"),
])
def test_checker_reports_a_renamed_name(tmp_path, old, new, expected):
    for rel in ("docs/data.md", "configs/unet.py", "pyproject.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    readme = tmp_path / "README.md"
    assert check_text(readme, README_SAMPLE, tmp_path) == []
    problems = check_text(readme, README_SAMPLE.replace(old, new), tmp_path)
    assert any(expected in p for p in problems), problems


def test_checker_knows_architecture_fields():
    # FCN's dropout_rate is a model field only where the model is FCN.
    fcn = "`python -m medseg_jax.main --config=configs/fcn.py --config.model.dropout_rate=0.1`"
    unet = fcn.replace("fcn.py", "unet.py")
    assert check_text(ROOT / "README.md", fcn) == []
    assert any("config.model.dropout_rate" in p for p in check_text(ROOT / "README.md", unet))

