"""Command line: ``python -m medseg_jax.main --config=configs/unet.py --workdir=runs/unet``.

Modes: ``train`` (default: train, resuming from the latest checkpoint in the
workdir, then evaluate the best checkpoint on the test split), ``eval``
(restore a checkpoint and evaluate) and ``predict`` (NIfTI in, NIfTI label maps
out: ``--mode=predict --input=DIR_OR_FILE --output=DIR``). A config with a
``benchmark`` section (configs/benchmark.py) runs the whole study (``study.py``). Any config
field can be overridden, e.g. ``--config.train.learning_rate=3e-4``.

Exit status: 0 done; 1 an error, reported on one line ``medseg_jax: error: ...``
(bad data or config, a workdir in use or not writable, a failed checkpoint save,
divergence); 2 a bad flag or config override; 143 stopped by SIGTERM after
saving a checkpoint (run the same command again to resume).
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medseg_jax.workdir import WorkdirInUse

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/unet.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                  "train: train (or resume) then evaluate; eval: evaluate a checkpoint; "
                  "predict: write label maps for NIfTI inputs.")
flags.DEFINE_string("input", None, "predict: a NIfTI file or a folder of them.")
flags.DEFINE_string("output", None, "predict: folder for the predicted label maps.")
flags.DEFINE_string("task", None, "predict: the task (dataset.json name) whose intensity "
                    "normalisation the inputs need; only for runs trained on several tasks.")
flags.DEFINE_bool("save_probabilities", False, "predict: also write the softmax "
                  "probabilities as <case>_probabilities.nii.gz.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of input/config errors.")
flags.DEFINE_string("coordinator_address", "",
                    "Multi-process runs: HOST:PORT of process 0 (else JAX_COORDINATOR_ADDRESS, "
                    "or detected on SLURM / Cloud TPU VMs).")
flags.DEFINE_integer("num_processes", 0, "Multi-process runs: number of processes (0: detect).")
flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's id (-1: detect).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() even when no flag or SLURM variable asks "
                  "for it (Cloud TPU VM pod slices: everything is detected).")
flags.mark_flags_as_required(["config", "workdir"])

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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.mode == "predict" and not (FLAGS.input and FLAGS.output):
        raise app.UsageError("--mode=predict needs --input=DIR_OR_FILE and --output=DIR")
    try:  # a config file that could not be loaded (a mistyped path) is reported only here
        FLAGS.config.keys()
    except OSError as e:
        problem = next((line.strip() for line in str(e).splitlines() if "Errno" in line),
                       " ".join(str(e).split()))
        print(f"medseg_jax: error: --config={FLAGS['config'].serialize().split('=', 1)[-1]}: "
              f"{problem}", file=sys.stderr)
        sys.exit(2)
    # After flag parsing; the distributed runtime before any other JAX call.
    from medseg_jax import checkpoint, evaluate, predict, sharding, study, train  # noqa: PLC0415

    sharding.set_cpu_flags(FLAGS.config)  # XLA flags from the config, before the backend starts
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed)

    handler = logging.get_absl_handler()
    handler.setFormatter(None)  # plain progress lines
    handler.addFilter(_quiet_libraries)  # records of other loggers (jax)
    logging.get_absl_logger().addFilter(_quiet_libraries)  # absl.logging calls (orbax)
    config = FLAGS.config
    try:
        if "benchmark" in config:
            if FLAGS.mode == "predict":
                raise ValueError("--mode=predict needs one run's config and workdir, e.g. "
                                 "--config=configs/run.py:<bench>/unet --workdir=<bench>/unet")
            study.run(config, FLAGS.workdir)  # reuses finished runs: train or eval
        elif FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            evaluate.evaluate(config, FLAGS.workdir)
        else:
            predict.predict(config, FLAGS.workdir, FLAGS.input, FLAGS.output, FLAGS.task,
                            FLAGS.save_probabilities)
    except train.Preempted as e:
        logging.warning("%s", e)
        print(f"medseg_jax: stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except USER_ERRORS as e:
        if FLAGS.traceback:
            raise
        checkpoint.close_all()  # what closing reports comes before the line, not after
        print(f"medseg_jax: error: {_one_line(_disk_full(e, checkpoint) or e)}",
              file=sys.stderr)
        sys.exit(1)
    finally:  # a run stopped by an error: no Orbax thread left to report after the line
        checkpoint.close_all()


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


def _override_error(argv: list[str]) -> str | None:
    """Names the first ``--config.a.b=...`` override that is not a config field."""
    import runpy  # noqa: PLC0415

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    try:
        file, *given = path.split(":", 1)  # configs/run.py:WORKDIR passes WORKDIR
        config = runpy.run_path(file)["get_config"](*given)
    except Exception:  # noqa: BLE001 (the flag parser reports problems with the file)
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, walked = config, "config"
        for part in arg[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return f"{arg.split('=', 1)[0]}: {walked} has no field {part!r}; valid: {valid}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if "Traceback" in message:  # raised by the config file's get_config: its last line
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0]} {lines[-1]}"
        print(f"medseg_jax: error: {message}\nPass --help for the flags.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = _override_error(argv) or f"bad config override: {e}"
        print(f"medseg_jax: error: {message}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
