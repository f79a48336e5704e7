"""Evaluation: restore a checkpoint, predict whole cases, per-case metrics in mm.

Each case of the split is read from its NIfTI files, normalised with the plan
of the training run (``preprocess.json``), cut into network samples (slices or
the whole volume), predicted, and the class probabilities are resized back to
the case's own grid before the argmax. Metrics are computed per case on the
whole volume with the case's voxel spacing, so Hausdorff distances are in mm.

Writes ``<split>_metrics.json`` (per case and aggregated, overall and per task)
and ``<split>_metrics.md`` (the table that is also printed).
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging
from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import inference, metrics, report, sharding, train
from medseg_jax.data import pipeline


def load_plans(workdir: str) -> dict:
    path = os.path.join(workdir, "preprocess.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} holds no training run")
    with open(path) as f:
        return json.load(f)


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str | None = None,
             checkpoint: str | None = None) -> dict:
    """Evaluates a checkpoint of the run in ``workdir`` on a split; returns the results."""
    config_lib.validate(config)
    train.setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    if not os.path.exists(os.path.join(workdir, "splits.json")):
        raise FileNotFoundError(f"{workdir}/splits.json not found: train in this workdir first")
    train.check_workdir_config(config, workdir, train.EVAL_FIELDS)
    with train.workdir_lock(workdir):
        return _evaluate(config, workdir, mesh, split or config.eval.split,
                         str(checkpoint or config.eval.checkpoint))


def _evaluate(config, workdir: str, mesh, split: str, which: str) -> dict:
    plans = load_plans(workdir)
    dataset = pipeline.open_dataset(config, workdir)
    keys = dataset.splits[split]
    if not keys:
        raise ValueError(f"{workdir}/splits.json: split {split!r} has no cases")

    model = train.build_model(config, dataset.num_classes)
    input_shape = (config.train.batch_size, *config.data.image_size, dataset.num_channels)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = checkpointer.resolve(which)
    # The optimizer state is restored too: the schedule length does not change shapes.
    abstract = train.abstract_state(config, model, input_shape, 1, mesh)
    state, meta = checkpointer.restore(step, abstract)
    checkpointer.close()
    _, _, predict_fn = train.jit_steps(config, mesh, dataset.num_classes)
    labels = {v: n for v, n in dataset.labels.items() if v != 0}
    logging.info("Evaluating the %s checkpoint (step %d, epoch %d) on %d %s cases", which,
                 step, meta.get("epoch", -1) + 1, len(keys), split)

    per_case, t0, n_samples = [], time.time(), 0
    for key in keys:
        case = dataset.load(key)
        pred, n = inference.predict_case(case, plans, config, state, predict_fn, mesh)
        n_samples += n
        per_case.append({"case": key, "task": case.task,
                         "spacing": [float(s) for s in case.spacing],
                         "metrics": metrics.evaluate_case(pred, case.label, case.spacing,
                                                          labels)})
    seconds = time.time() - t0

    groups = {"all": metrics.aggregate([c["metrics"] for c in per_case])}
    tasks = sorted({c["task"] for c in per_case})
    if len(tasks) > 1:
        for task in tasks:
            groups[task] = metrics.aggregate(
                [c["metrics"] for c in per_case if c["task"] == task])
    title = (f"{config.model.name}: {split} split, {which} checkpoint (step {step}, "
             f"epoch {meta.get('epoch', -1) + 1})")
    table = report.metrics_table(groups, title)
    results = {"model": config.model.name, "split": split, "checkpoint": which,
               "step": step, "epoch": meta.get("epoch", -1) + 1,
               "aggregate": groups, "per_case": per_case,
               "seconds": seconds, "cases_per_second": len(keys) / max(seconds, 1e-9),
               "network_inputs": n_samples}
    if jax.process_index() == 0:
        pipeline.write_json_atomic(os.path.join(workdir, f"{split}_metrics.json"), results)
        tmp = os.path.join(workdir, f".{split}_metrics.md.tmp")
        with open(tmp, "w") as f:
            f.write(table)
        os.replace(tmp, os.path.join(workdir, f"{split}_metrics.md"))
    print(table, flush=True)
    logging.info("Evaluated %d cases in %.1f s; wrote %s", len(keys), seconds,
                 os.path.join(workdir, f"{split}_metrics.json"))
    return results
