"""Files that are never half-written, and JSON files that fail with their name.

The one place for writing results, reports, caches, checkpoints' side files and
converted data sets: a file is written under a temporary name beside its target
and renamed onto it (``atomic_path``, ``write_text_atomic``, ``write_json_atomic``);
a folder is built beside its target and swapped into place (``build_folder``).
A kill at any moment leaves the old version or the new one, never a mix.

``read_json`` reads a JSON file and turns every failure (missing, unreadable,
not JSON, the wrong type) into one ``ValueError`` that names the file, says what
is wrong and how to recover.

Imports nothing of the package: data, reports and checkpoints all import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

# Temporary folders of a build interrupted by a kill are removed by a later build
# once they are this old (a younger one may belong to a build still running).
STALE_SECONDS = 3600.0


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same name ending, so writers that pick the
    format from it still work) and renames it onto ``path`` when the block succeeds; on
    failure the temporary file is removed and ``path`` keeps its old content."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp_{os.getpid()}_", suffix=f"_{name}")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` through a temporary file and a rename: never half-written."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON through a temporary file and a rename: never half-written."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str, what: str = "", recover: str = "", expect: type | None = dict) -> Any:
    """The JSON content of ``path``; any failure is one ValueError
    ``<path>: <what is wrong>; <recover>`` (``what`` names the file's role)."""
    role = f" ({what})" if what else ""
    hint = f"; {recover}" if recover else ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing{role}{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path}: cannot read{role}: {reason}{hint}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = "empty" if not text.strip() else f"not valid JSON ({e})"
        raise ValueError(f"{path}: {problem}{role}{hint}") from None
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not a "
                         f"{'JSON object' if expect is dict else expect.__name__}{role}{hint}")
    return value


def _remove_stale(parent: str, prefixes: tuple[str, ...]) -> None:
    now = time.time()
    for name in os.listdir(parent):
        if name.startswith(prefixes):
            path = os.path.join(parent, name)
            try:
                if now - os.path.getmtime(path) > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


@contextlib.contextmanager
def build_folder(target: str) -> Iterator[str]:
    """Yields an empty temporary folder beside ``target``; when the block succeeds it
    replaces ``target`` (an existing one is moved aside first, then deleted), so
    ``target`` is always absent, the old folder or the complete new one. On failure
    the temporary folder is removed and ``target`` is left as it was.

    Temporary folders older than an hour, left by a killed build of the same
    target, are removed first.
    """
    target = os.path.abspath(target)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, (f".{base}.tmp-", f".{base}.old-"))
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            try:
                try:
                    os.replace(target, os.path.join(old, base))
                except FileNotFoundError:
                    pass  # another process moved it meanwhile
                os.replace(tmp, target)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
