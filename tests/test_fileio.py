"""Tests for medseg_jax.fileio's readers: only regular files, bounded size and depth, and
every failure one ValueError naming the file."""

from __future__ import annotations

import json
import os
import threading

import pytest

from medseg_jax import fileio


def _in_thread(fn, timeout: float = 10.0):
    """``fn()``'s exception (or None), failing the test if it blocks (a FIFO opened)."""
    out = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the reader blocked"
    return out.get("error")


def test_fifo_is_refused_without_opening(tmp_path):
    fifo = tmp_path / "splits.json"
    os.mkfifo(fifo)
    for read in (lambda: fileio.read_json(str(fifo), "config.data.splits_file", "fix it"),
                 lambda: fileio.read_text_lines(str(fifo), "the run's log")):
        error = _in_thread(read)
        assert isinstance(error, ValueError)
        assert str(error).startswith(f"{fifo}: cannot read") and "not a regular file (a FIFO)" \
            in str(error)


@pytest.mark.parametrize("path, kind", [("/dev/null", "a device"), (None, "a folder")])
def test_device_and_folder_are_refused(tmp_path, path, kind):
    path = path or str(tmp_path)
    with pytest.raises(ValueError, match=f"^{path}: cannot read.*not a regular file \\({kind}\\)"):
        fileio.read_json(path)


def test_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"a": "x" * 200}))
    assert fileio.read_json(str(path))["a"] == "x" * 200
    monkeypatch.setattr(fileio, "MAX_JSON_BYTES", 100)
    with pytest.raises(ValueError, match=f"^{path}: cannot read \\(dataset\\): .* bytes, more "
                       "than the 9.54e-05 MiB such a file may have"):
        fileio.read_json(str(path), "dataset")


@pytest.mark.parametrize("levels", [150, 200_000])  # under / over the parser's recursion
def test_nesting_depth_limit(tmp_path, levels):
    path = tmp_path / "deep.json"
    path.write_text('{"a": ' + "[" * levels + "]" * levels + "}")
    with pytest.raises(ValueError, match=f"^{path}: arrays or objects nested deeper than 100 "
                       "levels \\(the run's config\\); delete it"):
        fileio.read_json(str(path), "the run's config", "delete it")
    ok = tmp_path / "ok.json"
    ok.write_text('{"a": ' + "[" * 98 + "]" * 98 + "}")
    assert fileio.read_json(str(ok))


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ValueError, match=f"^{path}: not UTF-8 text \\(byte 13\\)"):
        fileio.read_json(str(path))


def test_regular_file_reads(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"x": [1, {"y": 2}]}')
    assert fileio.read_json(str(path)) == {"x": [1, {"y": 2}]}
    assert fileio.read_regular(str(path)) == path.read_bytes()
    with pytest.raises(FileNotFoundError):
        fileio.read_regular(str(tmp_path / "absent"))
