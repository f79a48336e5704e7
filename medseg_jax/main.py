"""Command line: ``python -m medseg_jax.main --config=configs/unet.py --workdir=runs/unet``.

Modes: ``train`` (default: train, resuming from the latest checkpoint in the
workdir, then evaluate the best checkpoint on the test split) and ``eval``
(restore a checkpoint and evaluate). Any config field can be overridden, e.g.
``--config.train.learning_rate=3e-4``.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/unet.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (or resume) then evaluate; eval: evaluate a checkpoint.")
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

# Errors caused by the user's input (config, data, workdir): reported in one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError)


def _quiet_libraries(record) -> bool:
    """Keeps library INFO chatter (Orbax per save, JAX backend probing) and Orbax's
    read-only notices (evaluation opens checkpoints read-only on purpose) out of the log."""
    library = "/orbax/" in record.pathname or record.name.startswith("jax")
    if not library:
        return True
    if record.levelno < std_logging.WARNING:
        return False
    return "read only" not in str(record.msg) and "read_only" not in str(record.msg)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from medseg_jax import evaluate, sharding, train  # noqa: PLC0415 (after flag parsing)

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed)

    handler = logging.get_absl_handler()
    handler.setFormatter(None)  # plain progress lines
    handler.addFilter(_quiet_libraries)  # records of other loggers (jax)
    logging.get_absl_logger().addFilter(_quiet_libraries)  # absl.logging calls (orbax)
    config = FLAGS.config
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        else:
            evaluate.evaluate(config, FLAGS.workdir)
    except USER_ERRORS as e:
        if FLAGS.traceback:
            raise
        logging.error("%s: %s", type(e).__name__, e)
        print(f"medseg_jax: error: {e}", file=sys.stderr)
        sys.exit(1)


def _override_error(argv: list[str]) -> str | None:
    """Names the first ``--config.a.b=...`` override that is not a config field."""
    import runpy  # noqa: PLC0415

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    try:
        config = runpy.run_path(path.split(":")[0])["get_config"]()
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
        print(f"medseg_jax: error: {e}\nPass --help for the flags.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = _override_error(argv) or f"bad config override: {e}"
        print(f"medseg_jax: error: {message}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
