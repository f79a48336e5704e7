"""Orbax checkpoints: the latest ones (for resume) and the best by ``train.best_metric``,
each verified before it is restored.

Each checkpoint holds two items: ``state`` (the TrainState pytree: step, params,
batch_stats, optimizer state) and ``meta`` (JSON: epoch, early-stopping bookkeeping,
validation figures, the best-checkpoint score). Orbax writes to a temporary folder and
renames it when complete, so a run killed during a save resumes from the previous one.

The retention policy is explicit: the newest ``max_to_keep`` checkpoints AND the best
one by ``BEST_METRIC`` are kept, whatever their order (``max_to_keep`` with ``best_fn``
alone could delete the latest).

**Verification.** Once Orbax has committed a checkpoint (saves are asynchronous: at the
next save, ``wait``, ``check`` or ``close``), the size and SHA-256 of every file in its
folder are written atomically into ``<step>/medseg_digest.json`` (Orbax ignores files it
did not write; deleting a step deletes its digest). A restore first checks the files
against it, then the tree of array shapes and dtypes in Orbax's metadata against the
config's model (no array read), then reads the arrays. A damaged checkpoint (a file
missing, cut short or changed, an unreadable digest, metadata or array) raises
``CheckpointDamaged``; a checkpoint of another model raises a plain ValueError: the two
are never confused. Resuming (``restore_latest``) moves a damaged checkpoint aside to
``<checkpoints>_damaged/<step>`` (never deleted; Orbax no longer lists it) and falls
back to the one before. A checkpoint without a digest (an older version, or a run killed
between the commit and the digest) is restored unverified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging as std_logging
import os
import re
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from medseg_jax import fileio

BEST_METRIC = "best_score"  # train.best_metric, smoothed, negated for a loss
NEVER_BEST = -1e30  # below any score
DIGEST_NAME = "medseg_digest.json"
DIGEST_ALGORITHM = "sha256"  # hardware-accelerated (SHA-NI) here: ~1.6 GB/s, blake2b ~0.8
DAMAGED_SUFFIX = "_damaged"  # checkpoints/ -> checkpoints_damaged/<step>
REASON_NAME = "medseg_damaged.txt"


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be read, or does not hold what was written."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: damaged checkpoint: {problem}")


class SaveFailed(OSError):
    """A checkpoint save that could not be written: the message is the whole line (the
    checkpoint, the reason, the complete checkpoints on disk, how to resume)."""

    def __init__(self, message: str, error_number: int):
        super().__init__(message)
        self.errno = error_number


def steps_on_disk(directory: str) -> list[int]:
    """The complete checkpoints in ``directory`` as the disk holds them now: step
    folders Orbax renamed into place (a save in progress has another name)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def disk_full_message(path: str, directory: str, what: str = "") -> str:
    """The one line for a full disk: ``path`` (what could not be written), what is
    intact (files written before, the checkpoints in ``directory`` on disk now) and how
    to resume."""
    steps = steps_on_disk(directory)
    if steps:
        intact = (f"the complete checkpoints are intact (steps {steps} in {directory}); "
                  "free space and run the same command to resume from the latest")
    elif os.path.isdir(directory):
        intact = (f"no complete checkpoint is on the disk (in {directory}); free space and "
                  "run the same command (training starts from the beginning)")
    else:  # no training run here (or not yet at its first save)
        intact = "free space and run the same command"
    return f"{path}: no space left on device{what}; files written before are intact; {intact}"


# TensorStore reports failed I/O as a ValueError whose text starts with its status.
_STORAGE_STATUS = re.compile(r"^(RESOURCE_EXHAUSTED|NOT_FOUND|PERMISSION_DENIED|DATA_LOSS|"
                             r"UNAVAILABLE|UNKNOWN|INTERNAL|FAILED_PRECONDITION|ABORTED): ")


def _first_line(e: BaseException, limit: int = 240) -> str:
    """The root cause of ``e`` in one short line: the innermost exception of its chain
    (TensorStore's status, e.g. ``OUT_OF_RANGE: Error reading ...``, rather than
    Orbax's wrapper), without the TensorStore spec it appends."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if inner is None:
            break
        e = inner
    text = str(e).split(" [tensorstore_spec")[0]
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- #
# Digests
# --------------------------------------------------------------------------- #


def _files(folder: str) -> list[str]:
    """Paths (relative, sorted) of the files a checkpoint folder holds, digest aside."""
    out = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            if name == DIGEST_NAME or name == REASON_NAME or name.startswith(".tmp_"):
                continue
            out.append(os.path.relpath(os.path.join(parent, name), folder))
    return sorted(out)


def _file_digest(path: str, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def write_digest(folder: str) -> None:
    """Records the size and digest of every file of the checkpoint ``folder``, after
    syncing its files, itself and its parent to the disk."""
    fileio.sync_tree(folder)
    fileio.sync_folder(os.path.dirname(os.path.abspath(folder)))
    algorithm = DIGEST_ALGORITHM
    files = {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)),
                   algorithm: _file_digest(os.path.join(folder, rel), algorithm)}
             for rel in _files(folder)}
    fileio.write_json_atomic(os.path.join(folder, DIGEST_NAME),
                             {"algorithm": algorithm, "files": files})


def verify_digest(folder: str) -> bool:
    """True when ``folder`` matches its digest, False when it has none (restored as
    before); CheckpointDamaged naming the first file that differs otherwise."""
    path = os.path.join(folder, DIGEST_NAME)
    if not os.path.exists(path):
        return False
    unverified = f"delete {path} to restore the checkpoint unverified"
    try:
        record = fileio.read_json(path, "the checkpoint's digest")
        algorithm, files = record["algorithm"], record["files"]
        expected = {rel: (int(v["bytes"]), str(v[algorithm])) for rel, v in files.items()}
        hashlib.new(algorithm)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problem = str(e) if isinstance(e, ValueError) and str(e).startswith(path) else \
            f"{path}: not a digest record ({_first_line(e)})"
        raise CheckpointDamaged(folder, f"cannot verify it: {problem}; {unverified}") from None
    for rel, (size, _) in expected.items():  # cheap checks first: missing, cut short
        try:
            actual = os.path.getsize(os.path.join(folder, rel))
        except FileNotFoundError:
            raise CheckpointDamaged(folder, f"{rel}: missing") from None
        except OSError as e:
            raise CheckpointDamaged(folder, f"{rel}: cannot read it ({e.strerror})") from None
        if actual != size:
            how = "cut short" if actual < size else "longer than written"
            raise CheckpointDamaged(folder, f"{rel}: {how} ({actual} bytes, {size} when saved)")
    for rel, (_, digest) in expected.items():
        try:
            actual = _file_digest(os.path.join(folder, rel), algorithm)
        except OSError as e:
            raise CheckpointDamaged(folder, f"{rel}: cannot read it ({e.strerror})") from None
        if actual != digest:
            raise CheckpointDamaged(
                folder, f"{rel}: content differs from what was saved ({algorithm} mismatch)")
    return True


# --------------------------------------------------------------------------- #
# The model's tree against the checkpoint's metadata
# --------------------------------------------------------------------------- #


def _flat_shapes(tree) -> dict[str, tuple]:
    """'params/enc_0/Conv_0/kernel' -> (shape, dtype name) for every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
        dtype = getattr(leaf, "dtype", None)
        out[name] = (tuple(getattr(leaf, "shape", ())),
                     str(jax.numpy.dtype(dtype)) if dtype is not None else "?")
    return out


def structure_differences(saved, wanted) -> list[str]:
    """What differs between the arrays of a checkpoint's metadata and an abstract state."""
    a, b = _flat_shapes(saved), _flat_shapes(wanted)

    def show(spec):
        return f"{spec[0]} {spec[1]}"

    def order(name):  # the parameters first: what a user recognises
        return (not name.startswith("params/"), name)

    differ = [f"{k}: {show(a[k])} in the checkpoint, {show(b[k])} in this config's model"
              for k in sorted(a.keys() & b.keys(), key=order) if a[k] != b[k]]
    only_saved = sorted(a.keys() - b.keys(), key=order)
    only_wanted = sorted(b.keys() - a.keys(), key=order)
    if only_saved:
        differ.append(f"{len(only_saved)} array(s) only in the checkpoint (e.g. {only_saved[0]})")
    if only_wanted:
        differ.append(f"{len(only_wanted)} array(s) only in this config's model "
                      f"(e.g. {only_wanted[0]})")
    return differ


def install_quiet_reports() -> None:
    """Drops two known-harmless reports of an Orbax read that failed (its error is
    raised, and reported in one line, by ``restore``): Orbax runs the reads of all
    arrays in a private asyncio loop and closes it as soon as one fails; TensorStore
    then completes the others and calls ``loop.call_soon_threadsafe`` on the closed
    loop from its threads (``RuntimeError: Event loop is closed``, printed through
    ``sys.unraisablehook``), and the failed sibling tasks are collected unretrieved
    (``Task exception was never retrieved``, logged by ``asyncio``; the same for the
    writes of a save that failed). Both would print tracebacks after the one-line
    error; every other report still gets through. Called once by the entry point
    (process-wide: a hook and a logging filter); calling it again changes nothing."""
    previous = sys.unraisablehook
    if not getattr(previous, "_medseg_closed_loop_filter", False):

        def hook(unraisable):
            e = unraisable.exc_value
            if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
                return
            previous(unraisable)

        hook._medseg_closed_loop_filter = True
        sys.unraisablehook = hook
    asyncio_log = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedTaskFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedTaskFilter())


class _UnretrievedTaskFilter(std_logging.Filter):
    """Drops asyncio's reports of a task or future whose error nobody retrieved: the
    siblings of a failed Orbax read or write, whose first error is raised and reported.
    (Orbax writes each array through its own ``asyncio.gather`` of fragment writes;
    when one array fails on a full disk the others' gathers fail too, unretrieved:
    ``_GatheringFuture exception was never retrieved``, one traceback per array.)"""

    def filter(self, record) -> bool:
        return not str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")


# --------------------------------------------------------------------------- #
# The manager
# --------------------------------------------------------------------------- #


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2, read_only: bool = False,
                 keep_every_seconds: float = 0.0):
        """``keep_every_seconds`` > 0 also keeps a checkpoint every that many seconds of
        the run (to evaluate the model reached after 15, 30, ... minutes)."""
        self.directory = os.path.abspath(directory)
        self.read_only, self._closed = read_only, False
        self._pending: list[int] = []  # saved; digest written once Orbax has committed
        def best(m):  # an older checkpoint has val_dice alone
            return m.get(BEST_METRIC, m.get("val_dice", NEVER_BEST))
        keep = [policies.LatestN(n=max(1, max_to_keep)), policies.BestN(get_metric_fn=best, n=1)]
        if keep_every_seconds > 0:
            keep.append(policies.EveryNSeconds(interval_secs=int(keep_every_seconds)))
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            best_fn=best,
            best_mode="max",
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
        )
        self._manager = self._open_manager()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind, error, tb) -> None:
        """Closes; on an error, what closing meets is logged (the error in flight is the
        one reported) and Orbax's background writes are waited for."""
        try:
            self.close()
        except Exception as e:  # noqa: BLE001
            if error is None:
                raise
            logging.warning("closing %s: %s", self.directory, _first_line(e))
        if error is not None:
            join_background_writes()

    def _new_manager(self):
        return ocp.CheckpointManager(
            self.directory, options=self._options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def _open_manager(self):
        """The Orbax manager. Listing the steps reads each one's metrics: when that
        fails, the damaged steps are named (read-only) or moved aside (resume)."""
        try:
            return self._new_manager()
        except Exception as e:  # noqa: BLE001 (named below, or re-raised in one line)
            damaged = self._scan_step_folders()
            if not damaged:
                raise ValueError(f"{self.directory}: cannot list the checkpoints "
                                 f"({_first_line(e)})") from e
            if self.read_only:
                raise damaged[0][1] from e
            for step, error in damaged:
                self._move_aside(step, error)
        return self._new_manager()

    def _step_folders(self) -> list[int]:
        return steps_on_disk(self.directory)

    def _scan_step_folders(self) -> list[tuple[int, CheckpointDamaged]]:
        """(step, error) of every step folder whose digest, or whose Orbax JSON files
        (which listing reads), are damaged."""
        out = []
        for step in self._step_folders():
            folder = self.step_path(step)
            try:
                if not verify_digest(folder):
                    for rel in ("_CHECKPOINT_METADATA", os.path.join("metrics", "metrics")):
                        if os.path.exists(os.path.join(folder, rel)):
                            fileio.read_json(os.path.join(folder, rel), expect=None)
            except CheckpointDamaged as e:
                out.append((step, e))
            except ValueError as e:
                out.append((step, CheckpointDamaged(folder, str(e))))
        return out

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ----------------------------------------------------------------- saving

    def save(self, step: int, state, meta: dict, metrics: dict | None) -> None:
        """Saves (asynchronously); waits for the previous save first.

        ``metrics=None`` (a mid-epoch save on SIGTERM, not validated) is never the best.
        """
        metrics = metrics or {BEST_METRIC: NEVER_BEST}
        with self._save_errors():
            self._manager.wait_until_finished()
            self._write_digests()
        with self._save_errors(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
                metrics={k: float(v) for k, v in metrics.items()},
                force=True,
            )
        self._pending.append(step)

    def _write_digests(self) -> None:
        """Digests of the saves Orbax has finished (committed) since the last call."""
        pending, self._pending = self._pending, []
        if jax.process_index() != 0:
            return
        for step in pending:
            folder = self.step_path(step)
            if os.path.isdir(folder):  # else: deleted by the retention policy meanwhile
                write_digest(folder)

    def wait(self) -> None:
        with self._save_errors():
            self._manager.wait_until_finished()
            self._write_digests()

    def check(self) -> None:
        """Raises the error of a finished background save, if any; never blocks.

        (One process only: waiting is collective across hosts.)
        """
        if jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self.wait()

    def close(self) -> None:
        """Waits for pending saves (their errors are raised), then closes Orbax's manager;
        a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _save_errors(self, step: int | None = None):
        """A failed write (disk full, I/O error, a folder deleted meanwhile) ->
        ``SaveFailed``, one line naming the checkpoint and the complete checkpoints on
        the disk now (Orbax only renames complete ones into place)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 (only storage errors are turned into a line)
            storage = isinstance(e, OSError) or _STORAGE_STATUS.match(_first_line(e))
            if isinstance(e, SaveFailed) or not storage:
                raise
            if step is None:
                step = self._pending[-1] if self._pending else None
            path = self.directory if step is None else self.step_path(step)
            if fileio.is_disk_full(e):
                raise SaveFailed(disk_full_message(path, self.directory,
                                                   " (checkpoint save failed)"),
                                 errno.ENOSPC) from e
            steps = steps_on_disk(self.directory)
            raise SaveFailed(
                f"{path}: checkpoint save failed: {_first_line(e)}; the complete "
                f"checkpoints are intact (steps {steps} in {self.directory}); run the same "
                "command to resume from the latest", getattr(e, "errno", None) or errno.EIO
            ) from e

    # ---------------------------------------------------------------- listing

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def resolve(self, which: str | int) -> int:
        """'best', 'latest' or a step number -> a step that exists, or ValueError."""
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"{self.directory}: no checkpoint found (train first)")
        if which == "best":
            step = self.best_step()
        elif which == "latest":
            step = self.latest_step()
        else:
            step = int(which)
        if step not in steps:
            raise ValueError(
                f"{self.directory}: no checkpoint for step {which}; kept steps: "
                f"{sorted(steps)}")
        return step

    def verified_steps(self) -> tuple[list[int], list[int]]:
        """(kept steps whose files match their digest, kept steps without a digest)."""
        ok, unknown = [], []
        for step in sorted(self.all_steps()):
            try:
                (ok if verify_digest(self.step_path(step)) else unknown).append(step)
            except CheckpointDamaged:
                pass
        return ok, unknown

    # -------------------------------------------------------------- restoring

    def verify(self, step: int) -> bool:
        """CheckpointDamaged if the files of ``step`` differ from its digest; False
        (with an info line) when it has none."""
        folder = self.step_path(step)
        if verify_digest(folder):
            return True
        logging.info("%s has no digest (%s; saved by an older version, or the run stopped "
                     "before writing it): restoring it unverified", folder, DIGEST_NAME)
        return False

    def check_structure(self, step: int, abstract_state) -> None:
        """ValueError when the arrays of ``step`` (from Orbax's metadata: no array is
        read) are not those of ``abstract_state``; CheckpointDamaged when the metadata
        cannot be read."""
        folder = self.step_path(step)
        try:
            saved = self._manager.item_metadata(step)["state"]
            if saved is None:
                raise ValueError("no metadata for the item 'state'")
            differ = structure_differences(saved, abstract_state)
        except Exception as e:  # noqa: BLE001 (any failure to read it is damage)
            raise CheckpointDamaged(folder, f"cannot read its array metadata "
                                            f"({_first_line(e)})") from e
        if differ:
            shown = "; ".join(differ[:3]) + (f"; ... ({len(differ)} in all)"
                                              if len(differ) > 3 else "")
            raise ValueError(f"{folder}: checkpoint does not match this config's model "
                             f"(architecture or sizes differ?): {shown}")

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores ``step`` onto ``abstract_state`` (ShapeDtypeStructs with shardings)
        after checking its files (``verify``) and its array tree (``check_structure``).

        Raises CheckpointDamaged (unreadable or changed files) or ValueError (another
        model), each one line naming the checkpoint.
        """
        folder = self.step_path(step)
        verified = self.verify(step)
        self.check_structure(step, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              meta=ocp.args.JsonRestore()))
            meta = dict(restored.meta)
        except Exception as e:  # noqa: BLE001 (the structure matched: a read failure)
            if verified:
                raise ValueError(f"{folder}: cannot restore the checkpoint although its "
                                 f"files match their digest: {_first_line(e)}") from e
            raise CheckpointDamaged(folder, f"cannot read it ({_first_line(e)})") from e
        return restored.state, meta

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """``(step, state, meta)`` of the newest checkpoint that restores, or None when
        there is none. A damaged one is moved aside (``<checkpoints>_damaged/<step>``)
        with a warning naming it and what is wrong, and the one before is tried."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state)
                return step, state, meta
            except CheckpointDamaged as e:
                self._move_aside(step, e)
        if self._step_folders() or os.path.isdir(self.directory + DAMAGED_SUFFIX):
            logging.warning("%s: no checkpoint left that can be restored: training starts "
                            "from the beginning", self.directory)
        return None

    def restore_chosen(self, which: str | int, abstract_state) -> tuple[int, object, dict]:
        """``(step, state, meta)`` of ``which`` ('best', 'latest' or a step), for
        evaluation; a damaged one stops naming it and the kept steps that verify."""
        step = self.resolve(which)
        try:
            state, meta = self.restore(step, abstract_state)
        except CheckpointDamaged as e:
            ok, unknown = ([s for s in steps if s != step] for steps in self.verified_steps())
            hint = f"kept steps that verify: {ok}" if ok else "no other kept step verifies"
            if unknown:
                hint += f"; kept steps without a digest (not checked): {unknown}"
            hint += (f"; evaluate one with --config.eval.checkpoint={(ok or unknown)[-1]}"
                     if ok or unknown else "; train again")
            raise CheckpointDamaged(e.path, f"{e.problem}; {hint}") from e
        return step, state, meta

    def _move_aside(self, step: int, error: CheckpointDamaged) -> None:
        """Moves a damaged step folder to ``<checkpoints>_damaged/<step>`` (never deleted;
        Orbax stops listing it), with the reason beside its files."""
        folder = self.step_path(step)
        if jax.process_index() != 0:
            return
        target_root = self.directory + DAMAGED_SUFFIX
        os.makedirs(target_root, exist_ok=True)
        target, n = os.path.join(target_root, str(step)), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_root, f"{step}.{n}")
        os.replace(folder, target)
        try:
            fileio.write_text_atomic(os.path.join(target, REASON_NAME), str(error) + "\n")
        except OSError:
            pass  # the move is what matters
        logging.warning("%s; moved it to %s: resuming from the checkpoint before it",
                        error, target)
        if hasattr(self, "_manager"):
            self._manager.reload()


def join_background_writes(timeout: float = 300.0) -> None:
    """Waits for Orbax's background writes (those of the other items of a save that
    failed go on after its error: their threads must not report after the run's line)."""
    try:
        from orbax.checkpoint._src.futures import future as orbax_future  # noqa: PLC0415
        thread_class = orbax_future._SignalingThread
    except (ImportError, AttributeError):  # another Orbax version: nothing to wait for
        return
    end = time.monotonic() + timeout
    for thread in threading.enumerate():
        if isinstance(thread, thread_class) and thread is not threading.current_thread():
            threading.Thread.join(thread, max(0.0, end - time.monotonic()))


def abstract_like(state, sharding):
    """ShapeDtypeStructs of ``state`` placed with ``sharding`` (for restore)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
