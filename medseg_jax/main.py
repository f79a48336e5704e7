"""Command line: ``medseg-jax --config=configs/unet.py --workdir=runs/unet`` (the same as
``python -m medseg_jax.main ...``).

Modes: ``train`` (default: train, resuming from the latest checkpoint in the
workdir, then evaluate the best checkpoint on the test split), ``eval``
(restore a checkpoint and evaluate) and ``predict`` (NIfTI in, NIfTI label maps
out: ``--mode=predict --input=DIR_OR_FILE --output=DIR``). A config with a
``benchmark`` section (configs/benchmark.py) runs the whole study (``study.py``); one
with a ``choose`` section (configs/auto.py) trains the planned 2D and 3D configurations,
keeps the best (``choose.py``), and evaluates or predicts with it.

Config fields: any field can be overridden, e.g. ``--config.train.learning_rate=3e-4``
or ``--config.data.image_size='(32,32)'`` (a tuple in one argument; an override given
twice: the last one counts). ``--config=configs/unet.py --show_config`` lists every field
of that config with its value and meaning (also docs/configuration.md); ``--version``
prints the versions of medseg_jax, JAX, jaxlib and Flax and JAX's default backend.

A config file is Python code, run when it is loaded: use only config files you trust.

Exit status: 0 done; 1 an error, reported on one line ``medseg_jax: error: ...``
(bad data or config, a workdir in use or not writable, a failed checkpoint save,
divergence); 2 a bad or missing flag, a config file that cannot be loaded or a bad
config override; 143 stopped by SIGTERM after saving a checkpoint (run the same
command again to resume).
"""

import difflib
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from medseg_jax import config as config_lib
from medseg_jax import config_fields
from medseg_jax.workdir import WorkdirInUse

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/unet.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                  "train: train (or resume) then evaluate; eval: evaluate a checkpoint; "
                  "predict: write label maps for NIfTI inputs.")
flags.DEFINE_string("input", None, "predict: a NIfTI file or a folder of them.")
flags.DEFINE_string("output", None, "predict: folder for the predicted label maps: a new "
                    "or empty folder, or one an earlier predict wrote (its files are listed "
                    "in .medseg_predict.json there). Never the input folder, a data set "
                    "folder (one holding imagesTr, labelsTr or dataset.json) or a folder "
                    "inside one, the run's workdir or its checkpoints.")
flags.DEFINE_string("task", None, "predict: the task (dataset.json name) whose intensity "
                    "normalisation the inputs need; only for runs trained on several tasks.")
flags.DEFINE_bool("save_probabilities", False, "predict: also write the softmax "
                  "probabilities as <case>_probabilities.nii.gz.")
flags.DEFINE_bool("overwrite", False, "predict: replace files an earlier predict wrote into "
                  "--output, when unchanged since (a file the user changed or added is never "
                  "replaced).")
flags.DEFINE_bool("traceback", False, "Show the full traceback of input/config errors.")
flags.DEFINE_string("coordinator_address", "",
                    "Multi-process runs: HOST:PORT of process 0 (else JAX_COORDINATOR_ADDRESS, "
                    "or detected on SLURM / Cloud TPU VMs).")
flags.DEFINE_integer("num_processes", 0, "Multi-process runs: number of processes (0: detect).")
flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's id (-1: detect).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() even when no flag or SLURM variable asks "
                  "for it (Cloud TPU VM pod slices: everything is detected).")
flags.DEFINE_bool("show_config", False, "Print every field of --config (overrides "
                  "applied) with its value and meaning, then exit; needs no --workdir.")
flags.DEFINE_bool("version", False, "Print the versions of medseg_jax, JAX, jaxlib and Flax "
                  "and JAX's default backend, then exit.")

# Errors caused by the input, the config, the workdir or the machine (a full disk),
# and divergence: reported in one line, exit status 1.
USER_ERRORS = (ValueError, OSError, FloatingPointError, WorkdirInUse)
EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if the signal had ended the process


def _quiet_libraries(record) -> bool:
    """Keeps library INFO chatter (Orbax per save, JAX backend probing) and Orbax's
    read-only notices (evaluation opens checkpoints read-only on purpose) out of the log."""
    library = "/orbax/" in record.pathname or record.name.startswith("jax")
    if not library:
        return True
    if record.levelno < std_logging.WARNING:
        return False
    record.exc_info, record.exc_text = None, None  # their message, not a traceback
    return "read only" not in str(record.msg) and "read_only" not in str(record.msg)


def main(argv):
    if FLAGS.version:
        print(_versions())
        return
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {' '.join(argv[1:])}; flags are written "
                     "--name=value (see --help)")
    if FLAGS.config is None:
        _usage_error("--config: missing; name a config file, e.g. --config=configs/unet.py")
    try:  # a config file that could not be loaded (a mistyped path) is reported only here
        FLAGS.config.keys()
    except OSError as e:
        _usage_error(_unloadable(e))
    if FLAGS.show_config:
        print(config_fields.listing(FLAGS.config, _config_path().split(":", 1)[0]), end="")
        return
    if FLAGS.workdir is None:
        _usage_error("--workdir: missing; name the run's folder (checkpoints, logs, "
                     "results), e.g. --workdir=runs/unet")
    if FLAGS.mode == "predict" and not (FLAGS.input and FLAGS.output):
        _usage_error("--mode=predict needs --input=DIR_OR_FILE and --output=DIR")
    config = FLAGS.config
    try:  # every field known, every number (a study's too): before JAX and any workdir
        config_lib.check_fields(config)
        config_lib.check_numbers(config)
    except ValueError as e:
        _user_error(e)
    # After flag parsing; the distributed runtime before any other JAX call.
    from medseg_jax import (checkpoint, choose, evaluate, predict, sharding,  # noqa: PLC0415
                            study, train)

    checkpoint.install_quiet_reports()  # before any Orbax read or write

    sharding.set_cpu_flags(FLAGS.config)  # XLA flags from the config, before the backend starts
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed)

    handler = logging.get_absl_handler()
    handler.setFormatter(None)  # plain progress lines
    handler.addFilter(_quiet_libraries)  # records of other loggers (jax)
    logging.get_absl_logger().addFilter(_quiet_libraries)  # absl.logging calls (orbax)
    try:
        if "benchmark" in config:
            if FLAGS.mode == "predict":
                raise ValueError("--mode=predict needs one run's config and workdir, e.g. "
                                 "--config=configs/run.py:<bench>/unet --workdir=<bench>/unet")
            study.run(config, FLAGS.workdir)  # reuses finished runs: train or eval
        elif "choose" in config:  # configs/auto.py: the configurations compared, the best kept
            if FLAGS.mode == "train":
                choose.run(config, FLAGS.workdir)  # reuses finished configurations
            elif FLAGS.mode == "eval":
                choose.evaluate_choice(config, FLAGS.workdir)
            else:
                choose.predict_choice(config, FLAGS.workdir, FLAGS.input, FLAGS.output,
                                      FLAGS.task, FLAGS.save_probabilities, FLAGS.overwrite)
        elif FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            evaluate.evaluate(config, FLAGS.workdir)
        else:
            predict.predict(config, FLAGS.workdir, FLAGS.input, FLAGS.output, FLAGS.task,
                            FLAGS.save_probabilities, FLAGS.overwrite)
    except train.Preempted as e:
        logging.warning("%s", e)
        print(f"medseg_jax: stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except USER_ERRORS as e:
        if FLAGS.traceback:
            raise
        checkpoint.join_background_writes()  # what they report comes before the line
        print(f"medseg_jax: error: {_one_line(_disk_full(e, checkpoint) or e)}",
              file=sys.stderr)
        sys.exit(1)
    finally:  # a run stopped by an error: no Orbax thread left to report after the line
        checkpoint.join_background_writes()


def _disk_full(e: BaseException, checkpoint) -> str | None:
    """A full disk met outside a checkpoint save (which says it itself): the path, what
    is intact and how to resume."""
    from medseg_jax import fileio  # noqa: PLC0415

    if isinstance(e, checkpoint.SaveFailed) or not fileio.is_disk_full(e):
        return None
    path = getattr(e, "filename", None) or FLAGS.workdir
    return checkpoint.disk_full_message(path, os.path.join(FLAGS.workdir, "checkpoints"))


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def _user_error(e: BaseException) -> None:
    """Bad input (data, config, workdir): one line, exit status 1 (--traceback: raise)."""
    if FLAGS.traceback:
        raise e
    print(f"medseg_jax: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(1)


def _usage_error(message: str) -> None:
    """A bad flag or override: one line, exit status 2."""
    print(f"medseg_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_path() -> str:
    """--config's value as given (also when parsing it failed)."""
    return FLAGS["config"].parser.path


def _unloadable(e: OSError) -> str:
    """The line for a config file that could not be loaded (a mistyped path)."""
    problem = next((line.strip() for line in str(e).splitlines() if "Errno" in line),
                   " ".join(str(e).split()))
    return f"--config={_config_path()}: {problem}"


def _versions() -> str:
    from importlib import metadata  # noqa: PLC0415

    import jax  # noqa: PLC0415

    import medseg_jax  # noqa: PLC0415

    lines = [f"medseg_jax {medseg_jax.__version__}"]
    lines += [f"{name} {metadata.version(name)}" for name in ("jax", "jaxlib", "flax")]
    try:
        count = jax.device_count()
        lines.append(f"backend {jax.default_backend()} ({count} device{'s' * (count > 1)})")
    except RuntimeError as e:  # no backend starts (a broken accelerator plugin)
        lines.append(f"backend none: {_one_line(e)}")
    return "\n".join(lines)


class _ConfigFileParser(type(FLAGS["config"].parser)):  # config_flags' file parser
    """Loads the config file once and keeps what came of it: the config (before the
    overrides), or the error its code raised. A bad override is then explained from
    that config, without running the file again."""

    loaded = None
    error = None
    path = ""

    def parse(self, path):
        self.loaded, self.error, self.path = None, None, path
        try:
            self.loaded = super().parse(path)
        except Exception as e:
            # config_flags re-raises a TypeError / ValueError with the traceback as text
            self.error = e.__context__ if "Error whilst parsing" in str(e) else e
            raise
        return self.loaded


FLAGS["config"].parser = _ConfigFileParser("config", lock_config=True)

# --config.a.b=v, --config.a.b v, --noconfig.a.b: the field a.b
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_HELP = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")


def _help() -> str:
    module = FLAGS.find_module_defining_flag("workdir")
    listed = FLAGS.module_help(module).lstrip("\n").split("\n", 1)[1]  # no module name
    return f"{__doc__.strip()}\n\nflags:\n{listed}\n"


def _last_overrides(argv: list[str]) -> list[str]:
    """``argv`` without the overrides that a later one of the same field replaces
    (absl would append a repeated tuple override to the earlier one)."""
    end = argv.index("--") if "--" in argv else len(argv)
    last = {}
    for i, arg in enumerate(argv[:end]):
        if _OVERRIDE.match(arg):
            last[_OVERRIDE.match(arg).group(1)] = i
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        match = _OVERRIDE.match(arg) if i < end else None
        if match and last[match.group(1)] != i:
            # "--config.a.b VALUE": the value goes too
            skip = ("=" not in arg and not arg.lstrip("-").startswith("no")
                    and i + 1 < end and not argv[i + 1].startswith("-"))
            continue
        kept.append(arg)
    return kept


def _unknown_field(argv: list[str], config) -> str | None:
    """Names the first ``--config.a.b`` override that is not a field of ``config``
    (the config as its file made it), with the closest field name."""
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match:
            continue
        node, walked = config, "config"
        for part in match.group(1).split("."):
            if not hasattr(node, "keys"):
                return f"--config.{match.group(1)}: {walked} is a value, not a section"
            if part not in node:
                names = sorted(node.keys())
                close = difflib.get_close_matches(part, names, n=1)
                hint = (f"did you mean {close[0]!r}?" if close else
                        f"valid: {', '.join(names)}")
                owners = [m for m, f in config_fields.model_extras().items() if part in f]
                if walked == "config.model" and owners:
                    hint = f"a field of model {owners[0]} (configs/{owners[0]}.py); {hint}"
                return f"--config.{match.group(1)}: {walked} has no field {part!r}; {hint}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def _failed_config(e: BaseException) -> str:
    """The line for a config file whose code raised ``e``, with the file's line."""
    path = _config_path()
    file = path.split(":", 1)[0]
    where = [f for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(file)]
    if isinstance(e, ValueError):  # the file's own message
        return f"--config={path}: {_one_line(e)}"
    line = where[-1].lineno if where and not isinstance(e, SyntaxError) else None  # (its own)
    return (f"--config={path}: {type(e).__name__}: {_one_line(e)}"
            + (f" (line {line})" if line else ""))


def _parse_flags(argv: list[str]) -> list[str]:
    argv = _last_overrides(argv)
    if any(arg in _HELP for arg in argv[1:argv.index("--") if "--" in argv else None]):
        print(_help() + (f"\nall flags:\n{FLAGS.get_help()}\n" if "--helpfull" in argv
                         else ""), end="")
        sys.exit(0)
    parser = FLAGS["config"].parser
    parser.loaded, parser.error = None, None  # of an earlier parse in this process
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (every problem with the flags: one line)
        if any(arg in ("--traceback", "--traceback=true", "--traceback=True") for arg in argv):
            raise
        if parser.error is not None:  # the config file's code raised
            _usage_error(_failed_config(parser.error))
        try:
            unknown = parser.loaded is not None and _unknown_field(argv, parser.loaded)
        except OSError as unloadable:  # the file could not be loaded
            _usage_error(_unloadable(unloadable))
        if unknown:
            message = unknown
        elif isinstance(e, flags.UnrecognizedFlagError):
            names = [n for n in FLAGS if not n.startswith("config.")]
            close = difflib.get_close_matches(e.flagname, names, n=1)
            message = (f"--{e.flagname}: unknown flag; " + (
                f"did you mean --{close[0]}?" if close else "see --help"))
        elif isinstance(e, flags.Error):
            message = re.sub(r"^flag ", "", " ".join(str(e).split()))
            message += "; see --help" if "--help" not in message else ""
        else:
            message = f"bad config override: {_one_line(e)}"
        _usage_error(message)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
