"""The run's folder: created, checked writable, locked while a run uses it, and
checked to hold a run of the same config.

The lock is an ``fcntl.flock`` on the workdir folder itself, held by the run's
process (process 0 on several hosts): deleting or replacing a file in it cannot
undo it. The kernel drops it when that process ends, however it ends (SIGKILL
included), so a run that died never blocks the next one. ``<workdir>/.lock``
holds the holder's pid and host, for the message a second run gets. A workdir
that the run created and in which nothing but ``.lock`` was written (a start
that failed) is removed again when the lock is released.

``config.json`` records the resolved config of the run and the versions of the
libraries that decide its numbers; it is the run's record. A resumed run whose config
differs from it in a field that changes what it computes (anything but ``SAFE_FIELDS``;
``RECOVERY_FIELDS`` only after the run diverged) is refused, naming each field old ->
new, before anything is written (``check_config``); changes of safe fields are recorded
in its ``changes`` list with the step they took effect at (``write_config``). Evaluation
compares only what it needs (``EVAL_FIELDS``).
Paths are compared as the files they name (``PATH_FIELDS``: real paths, also recorded
in config.json under ``paths``); a damaged config.json is named in one line.
``read_run_config`` turns a run's config.json back into a config (``configs/run.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Iterator

import ml_collections
from absl import logging

from medseg_jax import config as config_lib
from medseg_jax import fileio

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # real path -> depth: re-entrant within one process
_created: set[str] = set()  # real paths of the workdirs this process created


class WorkdirInUse(RuntimeError):
    """Another live process holds the workdir's lock."""


def _error(e: OSError, message: str, path: str) -> OSError:
    """``e`` as one line naming the workdir; a full disk as an OSError naming ``path``
    (the command line adds what is intact and how to resume)."""
    if fileio.is_disk_full(e):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), e.filename or path)
    out = type(e)(message)
    out.errno = e.errno
    return out


def _create(workdir: str) -> None:
    """Creates ``workdir`` (and its parents) if missing, remembering that it did."""
    if os.path.isdir(workdir):
        return
    try:
        os.makedirs(workdir)
        _created.add(os.path.realpath(workdir))
    except FileExistsError:
        if not os.path.isdir(workdir):
            raise FileExistsError(f"--workdir {workdir}: exists and is not a folder; use "
                                  "another --workdir") from None
    except OSError as e:
        raise _error(e, f"--workdir {workdir}: cannot create it ({fileio.reason(e)})",
                     workdir) from e


def _open_lock_file(workdir: str) -> int:
    """Creates ``workdir`` and checks that it can be written; a descriptor of the folder."""
    _create(workdir)
    try:
        fd, probe = tempfile.mkstemp(dir=workdir, prefix=".probe_")  # can we write here?
        os.close(fd)
        os.unlink(probe)
        return os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise _error(e, f"--workdir {workdir}: not writable ({fileio.reason(e)}{where})",
                     workdir) from e


def _holder(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, LOCK_NAME), "rb") as f:
            text = f.read(200).decode(errors="replace").strip()
    except OSError:
        text = ""
    if text:
        return text
    pid = _flock_holder(workdir)
    where = f"pid {pid} on this host" if pid else "holder unknown"
    return f"{where}: its {LOCK_NAME} was removed"


def _flock_holder(workdir: str) -> str | None:
    """The pid holding a flock on the folder, from Linux's /proc/locks (local locks)."""
    try:
        st = os.stat(workdir)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 29810 fe:00:2146441 0 EOF"
                fields = line.split()
                if "->" not in fields and fields[1:2] == ["FLOCK"] and fields[5:6] == [inode]:
                    return fields[4]
    except (OSError, IndexError):
        pass
    return None


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names what ``fd`` has open (not removed, or removed and
    created again, meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _flock(fd: int, workdir: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirInUse(
            f"--workdir {workdir} is in use by another run ({_holder(workdir)}; lock held "
            f"on the folder, holder in {os.path.join(workdir, LOCK_NAME)}); wait for it to "
            "end or use another --workdir") from None
    except OSError:
        os.close(fd)
        raise


# flock on a folder fails on some network file systems (NFS emulates flock with
# byte-range locks, which need a file open for writing): the lock file is locked there.
_NO_FOLDER_LOCK = (errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP)


def _acquire(workdir: str) -> tuple[int, bool]:
    """``(fd, on_folder)``: a descriptor holding the workdir's flock (of the folder, or
    of ``.lock`` where a folder cannot be locked); WorkdirInUse if another run has it."""
    path = os.path.join(workdir, LOCK_NAME)
    for _ in range(10):
        fd = _open_lock_file(workdir)
        try:
            _flock(fd, workdir)
        except OSError as e:
            if isinstance(e, WorkdirInUse) or e.errno not in _NO_FOLDER_LOCK:
                raise
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            _flock(fd, workdir)
            if _same_file(fd, path):
                return fd, False
        else:
            if _same_file(fd, workdir):
                return fd, True
        os.close(fd)  # removed by the run before (a failed start): take the new one
    raise BlockingIOError(f"--workdir {workdir}: removed and created again while taking "
                          "its lock; run the same command again")


def _write_holder(fd: int) -> None:
    """Writes the holder's pid and host into ``.lock`` (open as ``fd``)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    os.fsync(fd)


def _remove_if_unused(workdir: str, key: str, lock_file: tuple[int, int] | None) -> None:
    """Removes a workdir this process created when it holds only the ``.lock`` this
    process wrote (a start that failed): never a file it did not write."""
    if key not in _created:
        return
    path = os.path.join(workdir, LOCK_NAME)
    try:
        names = os.listdir(workdir)
        if names == [LOCK_NAME] and lock_file is not None:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == lock_file:
                os.unlink(path)
                names = []
        if not names:
            os.rmdir(workdir)  # fails, harmlessly, if anything appeared meanwhile
            _created.discard(key)
    except OSError:
        pass


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Creates ``workdir`` and holds its lock; raises WorkdirInUse if another run has it.

    ``enabled=False`` (hosts other than process 0) only creates the folder.
    """
    key = os.path.realpath(workdir)
    if not enabled:
        os.close(_open_lock_file(workdir))
        yield
        return
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd, on_folder = _acquire(workdir)
    lock_file = None
    try:
        path = os.path.join(workdir, LOCK_NAME)
        try:
            holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if on_folder else fd
            st = os.fstat(holder)
            lock_file = (st.st_dev, st.st_ino)  # removed with the workdir if nothing else
            try:
                _write_holder(holder)
            finally:
                if holder != fd:
                    os.close(holder)
        except OSError as e:
            raise _error(e, f"--workdir {workdir}: cannot write {path} ({fileio.reason(e)})",
                         path) from e
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        try:
            _remove_if_unused(workdir, key, lock_file)
        finally:
            os.close(fd)  # releases the flock


def run_lock(workdir: str):
    """The workdir's lock for a run of one or several processes (process 0 holds it)."""
    import jax  # noqa: PLC0415

    return lock(workdir, enabled=jax.process_index() == 0)


# --------------------------------------------------------------------------- #
# config.json: the same run, or refused
# --------------------------------------------------------------------------- #

# Fields that may change when a run resumes (a section name: all its fields): when it
# stops (num_epochs, budget_minutes, early stopping; val_max_samples, val_max_cases,
# best_metric and best_ema choose the best checkpoint, evals what is logged), what it
# logs and keeps, how fast it runs and where it
# caches (model.remat and layer_impl: the same numbers, XLA flags: the last bits, as on
# another machine), and evaluation. None changes the weights the steps compute. Each
# change is recorded in config.json ("changes", with the step it took effect at).
SAFE_FIELDS = ("train.num_epochs", "train.budget_minutes", "train.patience",
               "train.min_delta", "train.val_max_samples", "train.val_max_cases",
               "train.evals",
               "train.best_metric", "train.best_ema", "train.log_every_steps",
               "train.profile_steps",
               "train.tensorboard", "train.prefetch", "train.transfer_guard",
               "train.checkpoint_max_to_keep", "train.keep_every_minutes",
               "train.compilation_cache_dir", "train.xla_cpu_ynn", "data.num_workers",
               "data.cache_dir", "data.max_case_gib", "model.remat", "model.layer_impl",
               "eval")
# The recovery a divergence's message names: they may change on the next resume of a run
# whose config.json records that it diverged ("diverged", written by that run).
RECOVERY_FIELDS = ("train.learning_rate", "train.grad_clip_norm")
# config.json entries that are records, not config fields.
RECORD_KEYS = ("versions", "paths", "changes", "diverged")
# What evaluation compares: what the network is (and whether its checkpoints hold the
# averaged weights, train.ema_decay) and what it is fed.
EVAL_FIELDS = ("model", "train.ema_decay", "data.image_size", "data.slice_axis",
               "data.context_slices", "data.rescale_01",
               "data.target_spacing", "data.in_plane", "data.resampling",
               "data.crop_nonzero")


# Fields that name files or folders (data.root: comma-separated): compared as the files
# they name, so `bars/../data/X`, `data/X/` and a symlink to it are the same data.
PATH_FIELDS = ("data.root", "data.splits_file", "data.cache_dir", "train.init_from",
               "train.compilation_cache_dir")


def resolve_path_field(dotted: str, value):
    """The real path(s) a path field names (``os.path.realpath`` of each entry after
    ``~`` expansion, comma-separated for data.root); other values unchanged."""
    if dotted not in PATH_FIELDS or not isinstance(value, str) or not value.strip():
        return value
    parts = value.split(",") if dotted == "data.root" else [value]
    return ",".join(os.path.realpath(os.path.expanduser(p.strip())) for p in parts
                    if p.strip())


def resolved_paths(config_dict: dict) -> dict[str, str]:
    """``{"data.root": "/real/path", ...}`` for the non-empty path fields of a
    config.json content (recorded in config.json, so that a later run from another
    working directory compares the folders the first one used)."""
    out = {}
    for dotted in PATH_FIELDS:
        section, _, field = dotted.partition(".")
        value = config_dict.get(section, {}).get(field)
        if isinstance(value, str) and value.strip():
            out[dotted] = resolve_path_field(dotted, value)
    return out


def is_safe(dotted: str) -> bool:
    """Whether ``dotted`` may change when a run resumes (``SAFE_FIELDS``)."""
    return dotted in SAFE_FIELDS or dotted.partition(".")[0] in SAFE_FIELDS


def field_changes(previous: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(section.field, old, new)`` for every field in which two config.json contents
    differ (top-level fields such as ``seed`` by their own name). Path fields are compared
    as the files they name (``previous["paths"]``, recorded when it was written, else
    resolved from here; ``current`` resolved from here); a field added since ``previous``
    was written, at its default, is no difference; a field ``current`` lacks is none."""
    defaults = config_json(config_lib.default_config())
    recorded = previous.get("paths") if isinstance(previous.get("paths"), dict) else {}
    out = []
    for key in sorted(k for k in current if k not in RECORD_KEYS):
        if isinstance(current[key], dict):
            before, default = previous.get(key, {}), defaults.get(key, {})
            pairs = [(f"{key}.{k}", k in before, before.get(k), v, default.get(k))
                     for k, v in current[key].items()]
        else:
            pairs = [(key, key in previous, previous.get(key), current[key],
                      defaults.get(key))]
        for dotted, known, old, new, default in pairs:
            if old == new or (not known and new == default):
                continue  # unchanged, or a field added since that run, at its default
            if dotted in PATH_FIELDS and (recorded.get(dotted, resolve_path_field(dotted, old))
                                          == resolve_path_field(dotted, new)):
                continue
            out.append((dotted, old, new))
    return out


def config_differences(previous: dict, current: dict, fields=("model", "data"),
                       recover: bool = False) -> list[str]:
    """``section.field: old -> new`` for each field of ``fields`` (sections or
    section.field; None: every field) that differs between two config.json contents and
    may not change in one run (not ``SAFE_FIELDS``; ``recover``: nor ``RECOVERY_FIELDS``),
    and the optimizer switches (another optimizer state to restore) whatever ``fields``."""
    def wanted(dotted):
        return fields is None or any(dotted == f or dotted.startswith(f + ".") for f in fields)

    now = current.get("train", {})
    schedule = now.get("lr_schedule", "constant")
    differ = []
    for dotted, old, new in field_changes(previous, current):
        note = ""
        if dotted in ("train.num_epochs", "train.budget_minutes") and schedule != "constant":
            note = f" (the length of the {schedule} learning-rate schedule)"
        elif is_safe(dotted) or (recover and dotted in RECOVERY_FIELDS):
            continue
        if wanted(dotted):
            differ.append(f"{dotted}: {old!r} -> {new!r}{note}")
    before = previous.get("train", {})
    optimizer = now.get("optimizer", "adam")
    if before.get("optimizer", "adam") != optimizer and not wanted("train.optimizer"):
        differ.append(f"train.optimizer: {before.get('optimizer', 'adam')!r} -> {optimizer!r}")
    old, new = before.get("weight_decay", 0.0), now.get("weight_decay", 0.0)
    if optimizer == "adam" and (old > 0) != (new > 0):  # Adam <-> AdamW: another state
        differ = [d for d in differ if not d.startswith("train.weight_decay:")]
        differ.append(f"train.weight_decay: {old!r} -> {new!r} (switches Adam/AdamW)")
    old = before.get("lr_schedule", "constant")
    if (old == "constant") != (schedule == "constant") and not wanted("train.lr_schedule"):
        differ.append(f"train.lr_schedule: {old!r} -> {schedule!r}")  # another state too
    return differ


def config_json(config) -> dict:
    """A config as config.json holds it."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _recorded(workdir: str, warn: bool) -> dict | None:
    """The run's config.json content (None: there is none)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        if warn and os.path.isdir(os.path.join(workdir, "checkpoints")):
            logging.warning("%s: missing (the run's config): the settings cannot be compared "
                            "with the run's (its checkpoints are still checked against the "
                            "model); training writes it again", path)
        return None
    return fileio.read_json(path, "the run's config", CONFIG_RECOVER)


def check_config(config, workdir: str, fields=None,
                 warn: bool = True) -> list[tuple[str, object, object]]:
    """Raises ValueError naming each field of ``fields`` (None: all, as training resumes)
    in which ``config`` differs from the workdir's run and which may not change (not
    ``SAFE_FIELDS``; ``RECOVERY_FIELDS`` only after a divergence). Returns the changes
    of safe fields, ``(section.field, old, new)``, for ``write_config`` to record."""
    path = os.path.join(workdir, "config.json")
    previous = _recorded(workdir, warn)
    if previous is None:
        return []
    current = config_json(config)
    try:
        differ = config_differences(previous, current, fields,
                                    recover=isinstance(previous.get("diverged"), dict))
        changes = field_changes(previous, current) if fields is None else []
    except (AttributeError, TypeError, KeyError) as e:  # valid JSON, not a config
        raise ValueError(f"{path}: not a config record ({type(e).__name__}: {e}); "
                         f"{CONFIG_RECOVER}") from None
    if differ:
        where = "evaluate it with" if fields is not None else "resume it with"
        raise ValueError(
            f"{workdir} holds a run with a different config ({'; '.join(differ)}; recorded "
            f"in {path}); these change what it computes: use a new --workdir, or {where} the "
            f"recorded values (--config=configs/run.py:{workdir})")
    return changes


CONFIG_RECOVER = ("restore it from a copy, or delete it: the next training run writes it "
                  "again from its own config (the checkpoints are still checked against "
                  "the model)")


def _tuples(value):
    """JSON lists back to the tuples the config fields hold (image_size, pool_sizes, ...)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _merge(base: dict, recorded: dict) -> dict:
    for key, value in recorded.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in its config.json: the defaults, then every recorded
    field (the model section as recorded: the architecture's own fields), path fields as
    the real paths the run resolved (``paths``), so it reads the same from any directory.
    Raises ValueError naming the file."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{path}: not found (configs/run.py reads the config.json "
                         "that a run writes in its workdir; is this a run's workdir?)")
    recorded = fileio.read_json(path, "the run's config", CONFIG_RECOVER)
    if not isinstance(recorded.get("model"), dict):
        raise ValueError(f"{path}: not a config record (no model section); {CONFIG_RECOVER}")
    paths = recorded.pop("paths", {}) or {}
    for key in ("versions", "changes", "diverged"):
        recorded.pop(key, None)
    sections = config_lib.default_config().to_dict()
    wrong = [k for k, v in recorded.items() if isinstance(sections.get(k), dict)
             and not isinstance(v, dict)]
    if not isinstance(paths, dict) or wrong:
        raise ValueError(f"{path}: not a config record ('{wrong[0] if wrong else 'paths'}' is "
                         f"not a section of fields); {CONFIG_RECOVER}")
    values = config_lib.default_config().to_dict()
    values["model"] = {}
    values = _merge(values, _tuples(recorded))
    for dotted, real in paths.items():
        section, _, field = dotted.partition(".")
        if section in values and field in values[section]:
            values[section][field] = real
    return ml_collections.ConfigDict(values)


def write_config(config, workdir: str, step: int = 0) -> None:
    """Writes config.json (with versions and real paths) after ``check_config``: a
    workdir holding a run of other settings is refused. A resumed run's changes of safe
    fields are appended to its ``changes`` (``{"step", "field", "old", "new"}``: the step
    of the checkpoint it resumed from), so the values it started with stay readable."""
    import jax  # noqa: PLC0415

    path = os.path.join(workdir, "config.json")
    changes = check_config(config, workdir, warn=False)  # (warned at the start of the run)
    previous = _recorded(workdir, False) or {}
    current = config_json(config)
    current["versions"] = versions()
    current["paths"] = resolved_paths(current)
    history = previous.get("changes") if isinstance(previous.get("changes"), list) else []
    for field, old, new in changes:
        logging.warning("%s: config.%s changed from %r to %r at step %d (recorded in "
                        "config.json \"changes\")", workdir, field, old, new, step)
    diverged = previous.get("diverged") if isinstance(previous.get("diverged"), dict) else {}
    for field, old, new in changes:
        entry = {"step": int(step), "field": field, "old": old, "new": new}
        if field in RECOVERY_FIELDS:
            entry["reason"] = f"diverged at step {diverged.get('step')}"
        history = history + [entry]
    if history:
        current["changes"] = history
    if jax.process_index() == 0:
        fileio.write_json_atomic(path, current)


def record_divergence(workdir: str, step: int) -> None:
    """Notes in the run's config.json that it diverged at ``step`` (the next resume may
    then change ``RECOVERY_FIELDS``); nothing if there is no readable config.json."""
    import jax  # noqa: PLC0415

    path = os.path.join(workdir, "config.json")
    try:
        recorded = _recorded(workdir, False)
    except ValueError:
        return
    if recorded is not None and jax.process_index() == 0:
        recorded["diverged"] = {"step": int(step)}
        fileio.write_json_atomic(path, recorded)


def record_revision(workdir: str, dotted: str, new, step: int, reason: str) -> None:
    """Sets ``dotted`` (section.field) in the run's config.json to ``new``: a value the
    run itself revised (a time budget's epochs), with a ``changes`` entry giving
    ``reason``, so that a resume with the same settings reads it as the run's own."""
    import jax  # noqa: PLC0415

    recorded = _recorded(workdir, False)
    if recorded is None or jax.process_index() != 0:
        return
    section, _, field = dotted.partition(".")
    old = recorded.setdefault(section, {}).get(field)
    recorded[section][field] = new
    history = recorded.get("changes") if isinstance(recorded.get("changes"), list) else []
    recorded["changes"] = history + [{"step": int(step), "field": dotted, "old": old,
                                      "new": new, "reason": reason}]
    fileio.write_json_atomic(os.path.join(workdir, "config.json"), recorded)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; figures from a CPU must say which one)."""
    import platform  # noqa: PLC0415

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    """Python, the libraries that decide the numbers, and the devices."""
    import importlib.metadata  # noqa: PLC0415
    import platform  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from medseg_jax import __version__  # noqa: PLC0415

    out = {"python": platform.python_version(), "medseg_jax": __version__,
           "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
           "cpu": cpu_model()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
                 "scipy", "nibabel"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
