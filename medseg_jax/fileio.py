"""Files that are never half-written, and JSON files that fail with their name.

The one place for writing results, reports, caches, checkpoints' side files and
converted data sets: a file is written under a temporary name beside its target
and renamed onto it (``atomic_path``, ``write_text_atomic``, ``write_json_atomic``);
a folder is built beside its target and swapped into place (``build_folder``).
A kill at any moment leaves the old version or the new one, never a mix. The
new content is synced to the disk (``fsync``) before the rename and the folder
after it, so a power cut too leaves the old version or the whole new one. A write
that fails (a full disk) raises an OSError naming the target (``filename``).

``read_json`` reads a JSON file and turns every failure (missing, not a regular
file, too big, not UTF-8, not JSON, nested too deeply, the wrong type) into one
``ValueError`` that names the file, says what is wrong and how to recover;
``read_text_lines`` does the same for a log that is appended to (damaged lines are
skipped with a warning). Both read only regular files (``read_regular``): a FIFO or
a device given as a file is refused, never opened for reading.

A derived folder (a preprocessing cache entry) records what it holds in
``manifest.json`` (``write_manifest``: sizes, array headers, digests of the small
files), checked in milliseconds by ``manifest_problem``; ``publish_folder`` renames a
complete folder into place, replacing a damaged one.

Imports nothing of the package: data, reports and checkpoints all import it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
from typing import Any, Iterator

# Temporary folders of a build interrupted by a kill are removed by a later build
# once they are this old (a younger one may belong to a build still running).
STALE_SECONDS = 3600.0


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads in the text of errors that are not OSErrors (TensorStore's).
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the disk is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def reason(e: OSError) -> str:
    """An OSError's reason without the ``[Errno N]`` prefix."""
    return e.strerror or str(e) or type(e).__name__


def _named(e: OSError, path: str) -> OSError:
    """``e`` naming ``path`` (the target, rather than a temporary name or nothing)."""
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or os.strerror(e.errno), path)


def _fsync(path: str, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(path: str) -> None:
    """Syncs a folder's entries (after a rename into it) to the disk; file systems that
    cannot sync a folder are skipped."""
    try:
        _fsync(path, folder=True)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES,
                           errno.EPERM):
            raise


def sync_tree(folder: str) -> None:
    """Syncs every file and folder under ``folder`` (before it is renamed into place)."""
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                _fsync(path)
        sync_folder(parent)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same name ending, so writers that pick the
    format from it still work) and, when the block succeeds, syncs it to the disk, renames
    it onto ``path`` and syncs the folder; on failure the temporary file is removed and
    ``path`` keeps its old content. An OSError names ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp_{os.getpid()}_",
                                   suffix=f"_{name}")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        sync_folder(directory)
    except OSError as e:
        if e.filename in (None, tmp) or is_disk_full(e):
            raise _named(e, path) from e
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` through a temporary file and a rename: never half-written."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON through a temporary file and a rename: never half-written."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# A JSON file read by the package is a small record (dataset.json, a config, a split):
# bigger or deeper than this is not one, and is refused before it costs memory.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 100


def read_regular(path: str, limit: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (of at most ``limit`` bytes).
    Its type is checked before it is opened, so a FIFO, a device or a folder is refused
    (OSError naming it) without blocking or consuming anything; FileNotFoundError when
    it does not exist."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{path}: not a regular file ({_kind(mode)})")
    # O_NONBLOCK: had it been swapped for a FIFO since the stat, the open does not wait.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        if limit is not None and size > limit:
            raise OSError(f"{path}: {size} bytes, more than the {limit / 2**20:.3g} MiB such a "
                          "file may have")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise OSError(f"{path}: more than the {limit / 2**20:.3g} MiB such a file may have")
    return data


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def _read_problem(path: str, e: OSError) -> str:
    """An OSError of ``read_regular`` as the text after ``<path>: ``."""
    text = str(e)
    return text[len(path) + 2:] if text.startswith(f"{path}: ") else e.strerror or text


def _depth(value: Any) -> int:
    """How deeply JSON arrays and objects nest in ``value`` (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item if isinstance(v, (dict, list)))
    return deepest


def read_json(path: str, what: str = "", recover: str = "", expect: type | None = dict) -> Any:
    """The JSON content of ``path``; any failure is one ValueError
    ``<path>: <what is wrong>; <recover>`` (``what`` names the file's role): missing,
    not a regular file (a FIFO or a device is never opened for reading), over
    ``MAX_JSON_BYTES``, not UTF-8, not JSON, nested deeper than ``MAX_JSON_DEPTH``, of
    the wrong type."""
    role = f" ({what})" if what else ""
    hint = f"; {recover}" if recover else ""
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing{role}{hint}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read{role}: {_read_problem(path, e)}{hint}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}){role}{hint}") from None
    deep = f"{path}: arrays or objects nested deeper than {MAX_JSON_DEPTH} levels{role}{hint}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = "empty" if not text.strip() else f"not valid JSON ({e})"
        raise ValueError(f"{path}: {problem}{role}{hint}") from None
    except RecursionError:
        raise ValueError(deep) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(deep)
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not a "
                         f"{'JSON object' if expect is dict else expect.__name__}{role}{hint}")
    return value


def read_text_lines(path: str, what: str = "", recover: str = "") -> list[str]:
    """The lines of a text file that is appended to (``metrics.jsonl``), ends kept; []
    when it does not exist. A line that is not valid UTF-8 (damaged bytes) is skipped,
    with a warning naming the file. A file that is not text at all (NUL bytes, or no line
    valid UTF-8), not a regular file (a FIFO is never opened for reading) or that cannot
    be read is one ValueError ``<path>: <what is wrong>; <recover>``."""
    role = f" ({what})" if what else ""
    hint = f"; {recover}" if recover else ""
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"{path}: cannot read{role}: {_read_problem(path, e)}{hint}") from None
    raw = data.splitlines(keepends=True)
    lines, bad = [], 0
    for line in raw:
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
    if b"\0" in data or (raw and bad == len(raw)):
        raise ValueError(f"{path}: not a text file{role}{hint}")
    if bad:
        from absl import logging  # noqa: PLC0415

        logging.warning("%s: %d line(s) hold bytes that are not text (damaged) and are "
                        "skipped", path, bad)
    return lines


# --------------------------------------------------------------------------- #
# Folder manifests: what a derived folder (a cache entry) holds, checked cheaply
# --------------------------------------------------------------------------- #

MANIFEST_NAME = "manifest.json"


def _npy_header(path: str) -> dict:
    """{"shape", "dtype", "fortran_order", "data_offset"} of a .npy file (header only)."""
    import numpy as np  # noqa: PLC0415

    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version} (np.save writes 1.0 or 2.0)")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return {"shape": list(shape), "dtype": dtype.str, "fortran_order": bool(fortran),
                "data_offset": f.tell()}


def _sha256(path: str) -> str:
    import hashlib  # noqa: PLC0415

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: str) -> None:
    """Records every file of ``folder`` (written last, atomically): its byte size; for
    ``.npy`` arrays the shape, dtype and layout from the header; for other (small)
    files their SHA-256."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == MANIFEST_NAME or name.startswith(".tmp_") or not os.path.isfile(path):
            continue
        entry: dict[str, Any] = {"bytes": os.path.getsize(path)}
        if name.endswith(".npy"):
            header = _npy_header(path)
            del header["data_offset"]
            entry.update(header)
        else:
            entry["sha256"] = _sha256(path)
        files[name] = entry
    write_json_atomic(os.path.join(folder, MANIFEST_NAME), {"version": 1, "files": files})


def manifest_problem(folder: str) -> str | None:
    """None when ``folder`` holds what its manifest records; else what differs first
    (no manifest, a file missing, of another size, an unreadable or different .npy
    header, a small file whose content changed)."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return f"no {MANIFEST_NAME} (written by an older version, or damaged)"
    try:
        files = read_json(path)["files"]
        entries = {str(k): (dict(v), int(v["bytes"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_NAME} unreadable ({e})"
    for name, (entry, size) in entries.items():
        file = os.path.join(folder, name)
        try:
            actual = os.path.getsize(file)
        except OSError:
            return f"{name}: missing"
        if actual != size:
            return f"{name}: {actual} bytes, {size} when written"
        try:
            if name.endswith(".npy"):
                header = _npy_header(file)
                if header["data_offset"] > size:
                    raise ValueError("header longer than the file")
                found = {k: header[k] for k in ("shape", "dtype", "fortran_order")}
                recorded = {k: entry.get(k) for k in found}
                if found != recorded:
                    return f"{name}: header says {found}, {recorded} when written"
            elif _sha256(file) != entry.get("sha256"):
                return f"{name}: content changed since it was written"
        except Exception as e:  # noqa: BLE001 (numpy's header parser raises many kinds)
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            reason = reason.encode("ascii", "backslashreplace").decode()  # damaged bytes
            return f"{name}: unreadable{' .npy header' if name.endswith('.npy') else ''} " \
                f"({reason})"
    return None


def publish_folder(tmp: str, target: str, problem=None) -> bool:
    """Renames the complete folder ``tmp`` onto ``target`` (its files synced to the disk
    first, the parent folder after). When ``target`` exists (another process published it
    meanwhile, or it is damaged) it is kept if ``problem(target)`` is None (``tmp`` is
    removed), else swapped for ``tmp``. Returns whether ``tmp`` went into place. Readers
    see the old folder or the new one, never a mix."""
    parent = os.path.dirname(os.path.abspath(target))
    try:
        sync_tree(tmp)
    except OSError as e:
        raise _named(e, target) from e
    try:
        os.replace(tmp, target)
        sync_folder(parent)
        return True
    except OSError:
        if not os.path.exists(target):
            raise
    if problem is None or problem(target) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    _swap_in(tmp, target)
    sync_folder(parent)
    return True


def _swap_in(tmp: str, target: str) -> None:
    """Replaces the existing folder ``target`` by ``tmp``: the old one is moved aside
    (into a temporary sibling), ``tmp`` renamed into place, the old one deleted."""
    parent, base = os.path.split(os.path.abspath(target))
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    try:
        try:
            os.replace(target, os.path.join(old, base))
        except FileNotFoundError:
            pass  # another process moved it meanwhile
        os.replace(tmp, target)
    finally:
        shutil.rmtree(old, ignore_errors=True)


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
    """Yields an empty temporary folder beside ``target``; when the block succeeds its
    files are synced to the disk and it replaces ``target`` (an existing one is moved
    aside first, then deleted; the parent folder synced after), so ``target`` is always
    absent, the old folder or the complete new one. On failure the temporary folder is
    removed and ``target`` is left as it was.

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
        try:
            sync_tree(tmp)
        except OSError as e:
            raise _named(e, target) from e
        if os.path.exists(target):
            _swap_in(tmp, target)
        else:
            os.replace(tmp, target)
        sync_folder(parent)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_destination(dst: str, marker: str, generator: str, overwrite: bool) -> None:
    """A converter's output folder: refused (FileExistsError naming it) when it is a file,
    or a non-empty folder whose ``marker`` summary does not name ``generator`` (one the
    converter did not write), unless ``overwrite``."""
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise FileExistsError(f"{dst}: exists and is not a folder")
    if os.listdir(dst) and not overwrite:
        try:
            ours = read_json(os.path.join(dst, marker)).get("generator") == generator
        except ValueError:
            ours = False
        if not ours:
            raise FileExistsError(f"{dst}: folder is not empty and was not written by "
                                  f"{generator}; pass --overwrite to replace it")
