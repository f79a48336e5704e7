"""Several ``python -m medseg_jax.main`` command lines in one process, for
tests/test_damage.py (one JAX start-up for many runs).

``python tests/damage_runner.py JOBS.json`` reads a list of jobs
``{"argv": [...], "stdout": path, "stderr": path, "collect": [[src, dst], ...]}`` and
runs each through ``absl.app.run(main.main)`` exactly as the command line does, with
file descriptors 1 and 2 pointed at the job's files (so everything the run, its
libraries and their threads print lands there). Before a job, each ``src`` (a result
file such as ``test_metrics.json``) is removed; after it, copied to ``dst`` if the job
wrote it. The exit status of each job goes to ``JOBS.json.rc``. An exception that
escapes ``main`` is printed as a traceback into the job's stderr (the test fails on it).
"""

import json
import os
import shutil
import sys
import traceback

from absl import app, flags

from medseg_jax import main


def _run(job: dict) -> int:
    for src, _ in job.get("collect", []):
        if os.path.exists(src):
            os.remove(src)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(job["stdout"], "w") as out, open(job["stderr"], "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                # config_flags finds the --config.* overrides in sys.argv, at parse time,
                # and defines a flag for each: those of the previous job go first.
                for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                    delattr(flags.FLAGS, name)
                sys.argv = ["medseg_jax.main", *job["argv"]]
                app.run(main.main, argv=sys.argv, flags_parser=main._parse_flags)  # noqa: SLF001
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:  # noqa: BLE001 (reported as the traceback it is)
                traceback.print_exc()
                code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    for src, dst in job.get("collect", []):
        if os.path.exists(src):
            shutil.copyfile(src, dst)
    return code


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        jobs = json.load(f)
    codes = [_run(job) for job in jobs]
    with open(path + ".rc", "w") as f:
        json.dump(codes, f)
