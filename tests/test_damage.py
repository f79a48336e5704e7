"""Saved state that survives damage.

A trained workdir is copied and one file of it is cut short, has bytes flipped or is
deleted; then the real command line (``python -m medseg_jax.main``) runs eval, predict
and train (resume) on the copy. Every run either recovers (with a warning naming what
was damaged, when it read it) and gives exactly the results of the undamaged run, or
exits 1 with exactly one ``medseg_jax: error: <file>: ...`` line on stderr; stderr never
holds a traceback. In-process tests cover each layer: checkpoint digests, the structure
check, fallback and setting aside, cache manifests (rebuilt bit-identical), paths compared
as the files they name, logs that are not text.
"""

import json
import logging as std_logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import evaluate, fileio, sharding, train
from medseg_jax import loop as loop_lib
from medseg_jax import state as state_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import cache, synthetic
from medseg_jax.data import dataset as dataset_lib

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# Damage
# --------------------------------------------------------------------------- #


def truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def flip(path, start: int | None = None, n: int = 16) -> None:
    """XORs ``n`` bytes with 0xFF, from ``start`` (default: the middle of the file)."""
    data = bytearray(Path(path).read_bytes())
    start = len(data) // 2 if start is None else start
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def delete(path) -> None:
    os.remove(path)


DAMAGES = {"truncated": truncate, "flipped": flip, "deleted": delete}


def _largest_data_file(step_dir) -> Path:
    files = list((Path(step_dir) / "state").rglob("ocdbt.process_0/d/*"))
    return max(files, key=lambda p: p.stat().st_size)


def _tree_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------- #
# In-process: checkpoints
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (2 epochs x 2 steps: checkpoints 2 and 4) and its config."""
    from conftest import tiny_config

    config = tiny_config(**{"train.patience": 0, "eval.figures": False})
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train(config, str(workdir))
    return config, workdir


def _abstract(config, workdir):
    mesh = sharding.make_mesh()
    dataset = dataset_lib.open_dataset(config, str(workdir))
    model = state_lib.build_model(config, dataset.num_classes)
    shape = (config.train.batch_size, *config.data.image_size, dataset.num_channels)
    return state_lib.abstract_state(config, model, shape, 1, mesh)


def _copy_checkpoints(trained, tmp_path) -> str:
    target = tmp_path / "checkpoints"
    shutil.copytree(trained[1] / "checkpoints", target)
    return str(target)


def test_every_kept_checkpoint_has_a_digest_that_verifies(trained):
    _, workdir = trained
    ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    steps = ck.all_steps()
    assert sorted(steps) == [2, 4]
    for step in steps:
        folder = Path(ck.step_path(step))
        record = json.loads((folder / ckpt_lib.DIGEST_NAME).read_text())
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert set(record["files"]) == on_disk - {ckpt_lib.DIGEST_NAME}
        assert ck.verify(step) is True
    assert ck.verified_steps() == ([2, 4], [])
    ck.close()


# (file of checkpoint 4, relative) -> what a damaged copy must raise on restore, when the
# digest is there: the file named.
CHECKPOINT_FILES = {
    "array data": None,  # the largest data file
    "array metadata": "state/_METADATA",
    "meta item": "meta/metadata",
    "step metadata": "_CHECKPOINT_METADATA",
    "metrics item": "metrics/metrics",
    "ocdbt manifest": "state/manifest.ocdbt",
}


def _data_files(step_dir) -> list[Path]:
    """The OCDBT data files of the state (B-tree nodes and values: small arrays are held
    inline in the nodes, and the root database's nodes in ``state/d`` may be what a
    read uses)."""
    state = Path(step_dir) / "state"
    return sorted(p for p in state.rglob("*") if p.is_file() and p.parent.name == "d")


def _damage_checkpoint_file(directory, what, damage, every: bool = False) -> str:
    """Damages one file of checkpoint 4 (for "array data": the largest data file, or
    with ``every`` all of them: with several devices some hold data that no array
    refers to); returns its path relative to the step folder."""
    step_dir = Path(directory) / "4"
    rel = CHECKPOINT_FILES[what]
    paths = ([_largest_data_file(step_dir)] if not every else _data_files(step_dir)) \
        if rel is None else [step_dir / rel]
    for path in paths:
        DAMAGES[damage](path)
    return str(paths[0].relative_to(step_dir))


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("what", CHECKPOINT_FILES)
def test_damaged_checkpoint_is_named_never_a_config_mismatch(trained, tmp_path, what, damage):
    config, workdir = trained
    directory = _copy_checkpoints(trained, tmp_path)
    abstract = _abstract(config, workdir)
    rel = _damage_checkpoint_file(directory, what, damage)
    with pytest.raises(ckpt_lib.CheckpointDamaged) as error:
        ck = ckpt_lib.Checkpointer(directory, read_only=True)  # listing reads the metrics
        try:
            ck.restore(4, abstract)
        finally:
            ck.close()
    message = str(error.value)
    assert "\n" not in message and "does not match this config" not in message
    assert message.startswith(f"{directory}/4: damaged checkpoint: {rel}: "), message
    how = {"truncated": "cut short", "flipped": "content differs from what was saved",
           "deleted": "missing"}[damage]
    assert how in message, message


# Without a digest, what Orbax and TensorStore must notice (they read these to restore).
NOTICED_WITHOUT_DIGEST = {("array data", "truncated"), ("array data", "deleted"),
                          ("array metadata", "truncated"),
                          ("array metadata", "flipped"), ("array metadata", "deleted"),
                          ("meta item", "truncated"), ("meta item", "flipped"),
                          ("meta item", "deleted"), ("metrics item", "truncated"),
                          ("metrics item", "flipped"), ("ocdbt manifest", "truncated"),
                          ("ocdbt manifest", "flipped"), ("ocdbt manifest", "deleted")}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("what", CHECKPOINT_FILES)
def test_without_a_digest_a_read_error_is_damage_never_a_config_mismatch(trained, tmp_path,
                                                                         what, damage):
    """Checkpoints of an older version (no digest): what Orbax or TensorStore cannot read
    is reported as damage naming the checkpoint (the issue's OUT_OF_RANGE / DATA_LOSS
    errors were called a config mismatch); what they do not read restores as before."""
    config, workdir = trained
    directory = _copy_checkpoints(trained, tmp_path)
    os.remove(Path(directory) / "4" / ckpt_lib.DIGEST_NAME)
    abstract = _abstract(config, workdir)
    _damage_checkpoint_file(directory, what, damage, every=True)
    try:
        ck = ckpt_lib.Checkpointer(directory, read_only=True)
        try:
            state, meta = ck.restore(4, abstract)
        finally:
            ck.close()
    except ckpt_lib.CheckpointDamaged as e:
        message = str(e)
        assert "\n" not in message and "does not match this config" not in message
        assert message.startswith(f"{directory}/4: damaged checkpoint: "), message
        return
    assert (what, damage) not in NOTICED_WITHOUT_DIGEST
    assert int(state.step) == 4 and meta["epoch"] == 1
    if damage != "flipped":  # what was cut or lost was not read: the same arrays
        ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True)
        reference = ck.restore(4, abstract)[0]
        ck.close()
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # (Flipped array bytes restore silently without a digest: what the digest is for.)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_digest_file(trained, tmp_path, damage):
    config, workdir = trained
    directory = _copy_checkpoints(trained, tmp_path)
    digest = Path(directory) / "4" / ckpt_lib.DIGEST_NAME
    DAMAGES[damage](digest)
    ck = ckpt_lib.Checkpointer(directory, read_only=True)
    try:
        if damage == "deleted":  # an older version's checkpoint: restored as before
            assert int(ck.restore(4, _abstract(config, workdir))[0].step) == 4
            assert ck.verified_steps() == ([2], [4])
            return
        with pytest.raises(ckpt_lib.CheckpointDamaged,
                           match=f"^{directory}/4: damaged checkpoint: cannot verify it: "
                                 f"{digest}: .*; delete {digest} to restore the checkpoint "
                                 "unverified$"):
            ck.restore(4, _abstract(config, workdir))
    finally:
        ck.close()


def test_another_model_is_a_structure_mismatch_read_from_metadata(trained, tmp_path):
    config, workdir = trained
    other = config.copy_and_resolve_references()
    other.model.base_features = 8
    ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    with pytest.raises(ValueError) as error:
        ck.restore(4, _abstract(other, workdir))
    ck.close()
    assert not isinstance(error.value, ckpt_lib.CheckpointDamaged)
    message = str(error.value)
    assert message.startswith(f"{workdir}/checkpoints/4: checkpoint does not match this "
                              "config's model (architecture or sizes differ?): ")
    assert re.search(r"params/\w+/\w+/(kernel|bias|scale): \(.*\) float32 in the checkpoint, "
                     r"\(.*\) float32 in this config's model", message), message


def test_resume_falls_back_and_moves_the_damaged_checkpoint_aside(trained, tmp_path, caplog):
    config, workdir = trained
    directory = _copy_checkpoints(trained, tmp_path)
    abstract = _abstract(config, workdir)
    truncate(_largest_data_file(Path(directory) / "4"))
    ck = ckpt_lib.Checkpointer(directory)
    with caplog.at_level(std_logging.WARNING):
        step, state, meta = ck.restore_latest(abstract)
    assert step == 2 and int(state.step) == 2 and meta["epoch"] == 0
    assert ck.all_steps() == [2]  # Orbax no longer lists it
    aside = tmp_path / "checkpoints_damaged" / "4"
    assert (aside / "state").is_dir()  # moved, never deleted
    reason = (aside / ckpt_lib.REASON_NAME).read_text()
    assert reason.startswith(f"{directory}/4: damaged checkpoint: state/ocdbt.process_0/d/")
    assert any(f"{directory}/4: damaged checkpoint: " in r.getMessage()
               and f"moved it to {aside}" in r.getMessage() for r in caplog.records)
    # Damaged again (another copy of step 4): set aside beside the first, not over it.
    truncate(_largest_data_file(Path(directory) / "2"))
    assert ck.restore_latest(abstract) is None  # nothing left: training starts over
    assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["2", "4"]
    ck.close()


@pytest.mark.parametrize("digest", [True, False], ids=["digest", "no digest"])
def test_resume_sets_aside_a_checkpoint_whose_metrics_orbax_cannot_list(trained, tmp_path,
                                                                       digest):
    """Orbax reads every step's metrics item to list the steps: a damaged one stops the
    listing. Resuming moves that step aside; evaluation (read-only) names it."""
    directory = _copy_checkpoints(trained, tmp_path)
    if not digest:
        os.remove(Path(directory) / "4" / ckpt_lib.DIGEST_NAME)
    flip(Path(directory) / "4" / "metrics" / "metrics")
    with pytest.raises(ckpt_lib.CheckpointDamaged, match=f"^{directory}/4: damaged checkpoint: "
                                                         ".*metrics/metrics"):
        ckpt_lib.Checkpointer(directory, read_only=True)
    ck = ckpt_lib.Checkpointer(directory)
    assert ck.all_steps() == [2]
    assert (tmp_path / "checkpoints_damaged" / "4" / "metrics").is_dir()
    ck.close()


def test_eval_of_a_damaged_best_checkpoint_names_the_steps_that_verify(trained, tmp_path):
    config, workdir = trained
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    ck = ckpt_lib.Checkpointer(str(run / "checkpoints"), read_only=True)
    best = ck.best_step()
    ck.close()
    other = 6 - best  # the kept steps are 2 and 4
    flip(_largest_data_file(run / "checkpoints" / str(best)))
    config = config.copy_and_resolve_references()
    with pytest.raises(ckpt_lib.CheckpointDamaged) as error:
        evaluate.evaluate(config, str(run))
    assert str(error.value) == (
        f"{run}/checkpoints/{best}: damaged checkpoint: "
        f"{_largest_data_file(run / 'checkpoints' / str(best)).relative_to(run / 'checkpoints' / str(best))}"
        f": content differs from what was saved (sha256 mismatch); kept steps that verify: "
        f"[{other}]; evaluate one with --config.eval.checkpoint={other}")
    assert (run / "checkpoints" / str(best)).is_dir()  # evaluation moves nothing
    config.eval.checkpoint = str(other)
    assert evaluate.evaluate(config, str(run))["step"] == other


def test_resume_from_a_fallback_checkpoint_equals_an_uninterrupted_run(make_tiny_config,
                                                                       tmp_path, monkeypatch):
    """A run stopped after epoch 2 of 3 whose latest checkpoint (step 4) is then damaged
    resumes from step 2 and ends bit for bit where an uninterrupted run ends."""
    config = make_tiny_config(**{"train.num_epochs": 3, "train.patience": 0,
                                 "eval.figures": False})
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    expected = train.train_and_evaluate(config, str(reference))

    original = loop_lib.Loop.end_epoch

    def stop_after_epoch_2(self, state, meta, epoch, *args):
        original(self, state, meta, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt  # as a kill would, once checkpoint 4 is saved

    monkeypatch.setattr(loop_lib.Loop, "end_epoch", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.train(config, str(stopped))
    monkeypatch.undo()
    ck = ckpt_lib.Checkpointer(str(stopped / "checkpoints"), read_only=True)
    assert ck.all_steps() == [2, 4] and ck.verified_steps() == ([2, 4], [])
    ck.close()
    flip(_largest_data_file(stopped / "checkpoints" / "4"))

    resumed = train.train_and_evaluate(config, str(stopped))
    assert (stopped / "checkpoints_damaged" / "4").is_dir()

    def epochs(run):
        rows = [json.loads(r) for r in open(run / "metrics.jsonl")]
        keys = ("step", "epoch", "train_loss", "val_loss", "val_dice", "val_dice_per_class")
        return [[r[k] for k in keys] for r in rows if "val_loss" in r]

    assert epochs(stopped) == epochs(reference) and len(epochs(reference)) == 3
    assert json.dumps(resumed["per_case"]) == json.dumps(expected["per_case"])
    assert json.dumps(resumed["aggregate"]) == json.dumps(expected["aggregate"])
    abstract = _abstract(config, reference)
    finals = []
    for run in (reference, stopped):
        ck = ckpt_lib.Checkpointer(str(run / "checkpoints"), read_only=True)
        finals.append(ck.restore(6, abstract)[0])
        ck.close()
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- #
# In-process: caches
# --------------------------------------------------------------------------- #


def _cache_dir(workdir) -> Path:
    (entry,) = [p for p in (Path(workdir) / "cache").iterdir() if not p.name.startswith(".")]
    return entry


@pytest.mark.parametrize("patches", [False, True], ids=["slices", "patches"])
def test_damaged_cache_entry_is_rebuilt_bit_identical(tmp_path, caplog, patches):
    from conftest import tiny_config

    overrides = {"data.in_plane": "spacing", "data.image_size": (8, 8)} if patches else {}
    config, workdir = tiny_config(**overrides), str(tmp_path / "run")
    cache.prepare(config, workdir)
    entry = _cache_dir(workdir)
    original = _tree_bytes(entry)
    manifest = json.loads((entry / fileio.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == set(original) - {fileio.MANIFEST_NAME}
    names = (["train_vol00000_image.npy", "train_vol00001_fg.npy", "train_volumes.json",
              "val_images.npy"] if patches else
             ["train_images.npy", "val_labels.npy", "train_case.npy", "plan.json"])
    names.append(fileio.MANIFEST_NAME)
    for name in names:
        for damage, fn in DAMAGES.items():
            if name.endswith(".npy") and damage == "flipped":
                fn = lambda p: flip(p, start=10)  # noqa: E731 (the header; see below)
            fn(entry / name)
            caplog.clear()
            with caplog.at_level(std_logging.WARNING):
                _, _, samples = cache.prepare(config, workdir)
            warned = [r.getMessage() for r in caplog.records
                      if "the preprocessing cache is damaged" in r.getMessage()]
            assert len(warned) == 1 and warned[0].startswith(f"{entry}: "), (name, damage)
            what = fileio.MANIFEST_NAME if name == fileio.MANIFEST_NAME else name
            assert what in warned[0], warned
            assert _tree_bytes(entry) == original, (name, damage)  # bit-identical
            assert len(samples["train"]) > 0
    leftovers = [p for p in os.listdir(Path(workdir) / "cache") if p.startswith(".")]
    assert leftovers == []
    # Flipped bytes inside array data (past the header) are not checked: the manifest
    # records sizes and headers, not digests of the arrays (hashing the whole cache
    # at every start would cost ~0.6 s per GB here). The header is what a flip breaks.


def test_cache_entry_of_an_older_version_is_rebuilt(tmp_path, caplog):
    from conftest import tiny_config

    config, workdir = tiny_config(), str(tmp_path / "run")
    cache.prepare(config, workdir)
    entry = _cache_dir(workdir)
    original = _tree_bytes(entry)
    os.remove(entry / fileio.MANIFEST_NAME)
    with caplog.at_level(std_logging.WARNING):
        cache.prepare(config, workdir)
    assert any("no manifest.json (written by an older version, or damaged)" in r.getMessage()
               for r in caplog.records)
    assert _tree_bytes(entry) == original


# --------------------------------------------------------------------------- #
# In-process: paths, logs
# --------------------------------------------------------------------------- #


def test_paths_are_compared_as_the_files_they_name(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "data"
    for name in ("X", "Y"):
        (data / name).mkdir(parents=True)
    (tmp_path / "bars").mkdir()
    (tmp_path / "link").symlink_to(data / "X")
    monkeypatch.chdir(tmp_path)
    config = workdir_lib.config_json(__import__("conftest").tiny_config())

    def with_root(root, splits=""):
        c = json.loads(json.dumps(config))
        c["data"]["root"], c["data"]["splits_file"] = root, splits
        return c

    first = with_root("bars/../shared/data/X,shared/data/Y/", "bars/../s.json")
    first["paths"] = workdir_lib.resolved_paths(first)
    for same in ("shared/data/X,shared/data/Y", f"{data}/X/,{data}/Y", "link,shared/data/Y"):
        assert workdir_lib.config_differences(first, with_root(same, "s.json")) == [], same
    assert workdir_lib.config_differences(first, with_root("shared/data/Y,shared/data/X",
                                                           "s.json")) == [
        "data.root: 'bars/../shared/data/X,shared/data/Y/' -> 'shared/data/Y,shared/data/X'"]
    assert workdir_lib.config_differences(first, with_root("shared/data/X", "s.json")) == [
        "data.root: 'bars/../shared/data/X,shared/data/Y/' -> 'shared/data/X'"]
    # Recorded real paths win: a later run from another working directory.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert workdir_lib.config_differences(
        first, with_root(f"{data}/X,{data}/Y", str(tmp_path / "s.json"))) == []
    del first["paths"]  # an older config.json: its paths resolved from here
    assert workdir_lib.config_differences(
        first, with_root(f"{data}/X,{data}/Y", str(tmp_path / "s.json"))) != []


def test_a_log_that_is_not_text_is_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(4)]
    path.write_text("".join(rows))
    flip(path, start=len(rows[0]) + 3, n=2)  # one line damaged
    with caplog.at_level(std_logging.WARNING):
        lines = fileio.read_text_lines(str(path), "the run's log", "move it aside")
    assert lines == [rows[0], *rows[2:]]  # the damaged line skipped
    assert f"{path}: 1 line(s) hold bytes that are not text" in caplog.text
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"^{path}: not a text file \\(the run's log\\); "
                                         "move it aside$"):
        fileio.read_text_lines(str(path), "the run's log", "move it aside")
    assert fileio.read_text_lines(str(tmp_path / "absent.jsonl")) == []


# --------------------------------------------------------------------------- #
# The command line on damaged copies of a trained workdir
# --------------------------------------------------------------------------- #

# tests/conftest.py's tiny_config on the command line (one CPU device: batch 8 fits).
CLI = [
    f"--config={ROOT / 'configs' / 'unet.py'}",
    "--config.data.synthetic_cases=4", "--config.data.synthetic_size=16",
    "--config.data.synthetic_depth=4", "--config.data.image_size=(16,16)",
    "--config.model.base_features=4", "--config.model.depth=3",
    "--config.train.batch_size=8", "--config.train.num_epochs=2",
    "--config.train.steps_per_epoch=2", "--config.train.log_every_steps=1",
    "--config.train.patience=0", "--config.eval.batch_size=8",
    "--config.train.tensorboard=False",
    f"--config.train.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
]
MODES = ("eval", "predict", "train")  # in this order on each damaged copy
ERROR = "medseg_jax: error: "


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device


def _case_files(run, best, latest):
    """What each case damages: (path, damage function)."""
    ck = run / "checkpoints"
    cache_entry = next(p for p in (run / "cache").iterdir() if not p.name.startswith("."))
    files = {
        "checkpoint array data": lambda: [_largest_data_file(ck / str(latest))],
        "checkpoint array data, no digest": lambda: _data_files(ck / str(latest)),
        "checkpoint metadata": lambda: [ck / str(best) / "state" / "_METADATA"],
        "checkpoint digest": lambda: [ck / str(best) / ckpt_lib.DIGEST_NAME],
        "cache array": lambda: [cache_entry / "train_images.npy"],
        "config.json": lambda: [run / "config.json"],
        "splits.json": lambda: [run / "splits.json"],
        "preprocess.json": lambda: [run / "preprocess.json"],
        "metrics.jsonl": lambda: [run / "metrics.jsonl"],
    }
    return files


SAME, WARN, FAIL = "same", "warn", "error"


def _expected(kind, damage, best, latest):
    """{mode: (outcome, what the warning or the error line must hold)} for a case."""
    every = dict.fromkeys(MODES)
    if kind == "checkpoint array data":  # the latest: resume falls back
        return {"eval": (SAME, None), "predict": (SAME, None),
                "train": (WARN, rf"checkpoints/{latest}: damaged checkpoint: "
                                rf"state/ocdbt.process_0/d/\w+: .*; moved it to \S+/"
                                rf"checkpoints_damaged/{latest}: resuming from the checkpoint "
                                "before it")}
    if kind == "checkpoint array data, no digest":  # an older version's checkpoint
        return {"eval": (SAME, None), "predict": (SAME, None),
                "train": (WARN, rf"checkpoints/{latest}: damaged checkpoint: cannot read .*"
                                rf"moved it to \S+/checkpoints_damaged/{latest}")}
    if kind == "checkpoint metadata":  # the best: evaluated by every mode
        return {m: (FAIL, f"checkpoints/{best}: damaged checkpoint: state/_METADATA: ")
                for m in every}
    if kind == "checkpoint digest":
        if damage == "deleted":
            return {m: (WARN, rf"checkpoints/{best} has no digest") for m in every}
        return {m: (FAIL, f"checkpoints/{best}: damaged checkpoint: cannot verify it: ")
                for m in every}
    if kind == "cache array":  # read by training only
        return {"eval": (SAME, None), "predict": (SAME, None),
                "train": (WARN, r"cache/\w+: the preprocessing cache is damaged "
                                r"\(train_images\.npy: ")}
    if kind == "config.json":
        if damage == "deleted":
            return {m: (WARN, r"config\.json: missing \(the run's config\)") for m in every}
        return {m: (FAIL, "config.json: ") for m in every}
    if kind == "splits.json":
        if damage == "deleted":
            return {"eval": (FAIL, "splits.json: missing"), "predict": (FAIL, "splits.json: "),
                    "train": (WARN, r"splits\.json: missing \(the run's case split\): made "
                                    "again")}
        return {m: (FAIL, "splits.json: ") for m in every}
    if kind == "preprocess.json":  # read by evaluation and prediction, written by training
        return {"eval": (FAIL, "preprocess.json: "), "predict": (FAIL, "preprocess.json: "),
                "train": (SAME, None)}
    if kind == "metrics.jsonl":  # read on resume, and for the curves (figures on)
        if damage == "not text":
            return {"eval": (FAIL, "metrics.jsonl: not a text file"), "predict": (SAME, None),
                    "train": (FAIL, "metrics.jsonl: not a text file")}
        if damage == "flipped":
            return {"eval": (WARN, r"metrics\.jsonl: \d+ line\(s\) hold bytes that are not "
                                   "text"),
                    "predict": (SAME, None),
                    "train": (WARN, r"metrics\.jsonl: \d+ line\(s\) hold bytes that are not "
                                    "text")}
        return {m: (SAME, None) for m in every}  # a cut line is dropped, as after a kill
    raise AssertionError(kind)


def _case_damages(kind):
    if kind == "checkpoint array data, no digest":  # a flip is what only digests notice
        return ("truncated", "deleted")
    if kind == "metrics.jsonl":
        return (*DAMAGES, "not text")
    return tuple(DAMAGES)


CLI_CASES = [(kind, damage) for kind in
             ("checkpoint array data", "checkpoint array data, no digest",
              "checkpoint metadata", "checkpoint digest", "cache array", "config.json",
              "splits.json", "preprocess.json", "metrics.jsonl")
             for damage in _case_damages(kind)]


def _apply(kind, damage, paths, run, best, latest):
    if kind == "checkpoint array data, no digest":
        os.remove(run / "checkpoints" / str(latest) / ckpt_lib.DIGEST_NAME)
    for path in paths:
        if damage == "not text":
            path.write_bytes(bytes(range(256)) * 8)
        elif damage == "flipped" and path.suffix == ".npy":
            flip(path, start=10)  # the header (flips in array data: see the cache test)
        else:
            DAMAGES[damage](path)


def _slug(kind, damage):
    return re.sub(r"\W+", "_", f"{kind} {damage}").strip("_")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Trains once through the command line, then runs eval, predict and train on a
    damaged copy per case, all through ``main`` in two runner processes."""
    base = tmp_path_factory.mktemp("cli")
    run = base / "run"
    # The data outside the workdir, so that the copies share the cache's fingerprint
    # (it names the data files): the synthetic set tiny_config would write into it.
    roots = synthetic.make_synthetic(str(base / "data"), seed=0, num_cases=4, size=16, depth=4)
    cli = [*CLI, f"--config.data.root={','.join(roots)}"]
    first = subprocess.run([sys.executable, "-m", "medseg_jax.main", f"--workdir={run}",
                            *cli, "--config.eval.figures=False"], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ck = ckpt_lib.Checkpointer(str(run / "checkpoints"), read_only=True)
    best, latest = ck.best_step(), ck.latest_step()
    ck.close()
    assert (best, latest) == (2, 4), "the cases below assume the best is not the latest"
    inputs = base / "inputs"
    inputs.mkdir()
    for p in sorted((base / "data" / "SynthUS" / "imagesTr").iterdir())[:2]:
        shutil.copy(p, inputs)

    def mode_args(workdir, mode, out, figures):
        args = [f"--workdir={workdir}", f"--mode={mode}", *cli,
                f"--config.eval.figures={figures}"]
        if mode == "predict":
            args += [f"--input={inputs}", f"--output={out}", "--task=SynthUS"]
        return args

    def job(name, workdir, mode, figures=False):
        out = base / "out" / f"{name}.{mode}"
        return {"argv": mode_args(workdir, mode, f"{out}.pred", figures),
                "stdout": f"{out}.stdout", "stderr": f"{out}.stderr",
                "collect": [[str(workdir / "test_metrics.json"), f"{out}.metrics.json"]]
                if mode != "predict" else []}

    (base / "out").mkdir()
    groups = [[job("baseline", run, "predict")], []]
    for i, (kind, damage) in enumerate(CLI_CASES):
        name = _slug(kind, damage)
        copy = base / "cases" / name
        shutil.copytree(run, copy, symlinks=True)
        _apply(kind, damage, _case_files(copy, best, latest)[kind](), copy, best, latest)
        groups[i % 2] += [job(name, copy, mode, figures=kind == "metrics.jsonl")
                          for mode in MODES]
    procs = []
    for g, jobs in enumerate(groups):
        spec = base / f"jobs{g}.json"
        spec.write_text(json.dumps(jobs))
        procs.append((spec, subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "damage_runner.py"), str(spec)], cwd=ROOT,
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    codes = {}  # "<case>.<mode>" -> the job's exit status, from the runner's JOBS.json.rc
    for (spec, proc), jobs in zip(procs, groups):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        rc = json.loads(Path(f"{spec}.rc").read_text())
        assert len(rc) == len(jobs), (spec, rc)
        codes.update({Path(j["stderr"]).name.removesuffix(".stderr"): c
                      for j, c in zip(jobs, rc)})
    return {"base": base, "run": run, "best": best, "latest": latest, "cli": cli,
            "codes": codes}


def _read_predictions(folder) -> dict:
    import nibabel as nib

    return {p.name: (np.asarray(nib.load(p).dataobj), nib.load(p).affine)
            for p in sorted(Path(folder).glob("*.nii.gz"))}


@pytest.mark.parametrize("kind, damage", CLI_CASES, ids=[_slug(*c) for c in CLI_CASES])
def test_command_line_on_a_damaged_workdir(cli_runs, kind, damage):
    base, best, latest = cli_runs["base"], cli_runs["best"], cli_runs["latest"]
    copy = base / "cases" / _slug(kind, damage)
    reference = json.loads((cli_runs["run"] / "test_metrics.json").read_text())
    assert cli_runs["codes"]["baseline.predict"] == 0
    predicted = _read_predictions(base / "out" / "baseline.predict.pred")
    for mode, (outcome, pattern) in _expected(kind, damage, best, latest).items():
        out = base / "out" / f"{_slug(kind, damage)}.{mode}"
        err = Path(f"{out}.stderr").read_text()
        where = f"{kind}, {damage}, --mode={mode}:\n{err[-3000:]}"
        assert "Traceback" not in err and "Event loop is closed" not in err, where
        errors = [line for line in err.splitlines() if line.startswith(ERROR)]
        code = cli_runs["codes"][out.name]
        if outcome == FAIL:
            assert code == 1, where
            assert len(errors) == 1, where
            assert errors[0].startswith(f"{ERROR}{copy}/"), where  # names the file
            assert pattern in errors[0], where
            assert err.rstrip().splitlines()[-1] == errors[0], where  # nothing after it
            continue
        assert code == 0, where
        assert errors == [], where
        if outcome == WARN:
            assert re.search(pattern, err), where
        if mode == "predict":
            got = _read_predictions(f"{out}.pred")
            assert got.keys() == predicted.keys(), where
            for name, (labels, affine) in got.items():
                np.testing.assert_array_equal(labels, predicted[name][0])
                np.testing.assert_array_equal(affine, predicted[name][1])
        else:
            results = json.loads(Path(f"{out}.metrics.json").read_text())
            assert json.dumps(results["aggregate"]) == json.dumps(reference["aggregate"]), where
            assert json.dumps(results["per_case"]) == json.dumps(reference["per_case"]), where


def test_nothing_after_the_one_line(cli_runs):
    """The issue's training run on a checkpoint of an older version (no digest) that
    TensorStore cannot read: one line naming it, exit 1, and no traceback after it
    from Orbax's or TensorStore's threads (``RuntimeError: Event loop is closed``)."""
    base, best = cli_runs["base"], cli_runs["best"]
    copy = base / "direct"
    shutil.copytree(cli_runs["run"], copy, symlinks=True)
    os.remove(copy / "checkpoints" / str(best) / ckpt_lib.DIGEST_NAME)
    for path in _data_files(copy / "checkpoints" / str(best)):
        os.truncate(path, 100)
    proc = subprocess.run([sys.executable, "-m", "medseg_jax.main", f"--workdir={copy}",
                           *cli_runs["cli"], "--config.eval.figures=False"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    lines = proc.stderr.rstrip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert [line for line in lines if line.startswith(ERROR)] == [lines[-1]], proc.stderr
    assert lines[-1].startswith(f"{ERROR}{copy}/checkpoints/{best}: damaged checkpoint: "
                                "cannot read "), lines[-1]
    assert "kept steps without a digest" not in lines[-1]
    assert lines[-1].endswith(f"kept steps that verify: [{6 - best}]; evaluate one with "
                              f"--config.eval.checkpoint={6 - best}"), lines[-1]
    assert "ValueError:" not in proc.stderr  # the message once, not twice
