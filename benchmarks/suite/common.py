"""What the driver and the worker processes share: the repository's path, logging, and
the JSON files they exchange (the plan, progress, results) and write (the reports).

Files are written by ``medseg_jax.fileio`` (through a temporary file and a rename), so a
reader never sees half a file. It imports only the standard library, so the driver can
use it before the package's dependencies are known to be installed.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run from a checkout: the package is the one beside benchmarks/
    sys.path.insert(1, REPO)

from medseg_jax import fileio  # noqa: E402


def write_json(path: str, payload) -> None:
    """Writes ``payload`` as JSON (values JSON lacks as strings), never half-written."""
    fileio.write_text_atomic(path, json.dumps(payload, indent=1, default=str))


def read_json(path: str, default=None):
    """The JSON content of ``path``, or ``default`` when it is missing or not JSON."""
    try:
        return fileio.read_json(path, expect=None)
    except ValueError:
        return default


def log(msg: str) -> None:
    """Prints one line at once (the driver copies the workers' logs as they grow)."""
    print(msg, flush=True)
