"""What a run is made of, for every job that builds or restores one.

- the network (``build_model``: ``Model(**config.model)``), the optimizer and the
  ``TrainState`` (params, BatchNorm statistics, optimizer state, the params' moving
  average with ``train.ema_decay``), initialised on the mesh (``init_state``) or
  described for a restore (``abstract_state``); the weights evaluated (``for_eval``);
- the jitted train and eval steps (``train_step``, ``eval_step``: ``jit_steps``);
- ``initialize``: all of these at once, the one set-up of training, evaluation,
  prediction, ``tools/throughput.py`` and the benchmarks;
- the jitted prediction function (``make_predict_fn``: softmax, averaged over flips
  with ``eval.tta``);
- a trained run restored from its workdir (``restore_run``): its config check, data,
  plans and the chosen checkpoint, ready for evaluation, prediction and figures; and the
  other runs of an ensemble (``restore_members``: ``eval.ensemble``).

Training (``train.py``), evaluation, prediction, the study and the tools all build on
this module; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax.training import train_state

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import config as config_lib
from medseg_jax import fileio, losses, metrics, models, planning, sharding, transfer
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import augment, laterality
from medseg_jax.data import dataset as dataset_lib


class TrainState(train_state.TrainState):
    batch_stats: Any = None


class EmaTrainState(TrainState):
    """A TrainState that also keeps the exponential moving average of its params
    (``train.ema_decay``). A subclass, so that the state of a run without it (and its
    checkpoints) keeps its tree: a None field would be a node of Orbax's metadata."""

    ema_params: Any = None


def setup_compilation_cache(config) -> None:
    path = config.train.compilation_cache_dir
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_model(config, num_classes: int):
    """The network of ``config.model`` (``models.from_config``)."""
    return models.from_config(config.model, num_classes)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """``train.optimizer`` with ``train.lr_schedule`` over ``total_steps``, after global
    gradient-norm clipping (``train.grad_clip_norm``; a no-op when 0).

    adam: Adam, or AdamW with ``weight_decay`` > 0 (the study's). sgd: SGD with Nesterov
    momentum ``train.momentum`` and L2 weight decay added to the gradient (nnU-Net's).
    Schedules: constant, cosine, poly (``lr * (1 - step / total) ** 0.9``, nnU-Net's).
    """
    t = config.train
    if t.lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(t.learning_rate, max(1, total_steps))
    elif t.lr_schedule == "poly":
        lr = optax.polynomial_schedule(t.learning_rate, 0.0, 0.9, max(1, total_steps))
    else:
        lr = t.learning_rate
    if t.optimizer == "sgd":
        opt = optax.chain(optax.add_decayed_weights(t.weight_decay),
                          optax.sgd(lr, momentum=t.momentum, nesterov=True))
    elif t.weight_decay > 0:
        opt = optax.adamw(lr, weight_decay=t.weight_decay)
    else:
        opt = optax.adam(lr)
    # Always in the chain (a no-op at inf), so clipping can be switched on when
    # resuming a run that diverged: the optimizer state keeps its structure.
    max_norm = t.grad_clip_norm if t.grad_clip_norm > 0 else float("inf")
    return optax.chain(optax.clip_by_global_norm(max_norm), opt)


def create_state(config, model, input_shape, total_steps: int, rng) -> TrainState:
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=make_optimizer(config, total_steps))
    return with_ema(config, state)


def with_ema(config, state: TrainState) -> TrainState:
    """``state`` with its average started at its params (an ``EmaTrainState``; with
    ``train.ema_decay`` > 0), e.g. after they were set from another run; as it is when
    off."""
    if not config.train.ema_decay:
        return state
    ema = jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32), state.params)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return EmaTrainState(**dict(fields, ema_params=ema))


def ema_decay_at(decay, step):
    """The decay of the update after ``step`` steps: ``min(decay, (1 + step) / (10 +
    step))``, a warm-up (as TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``) so that the average forgets the random initial weights within the
    first steps instead of after ``1 / (1 - decay)`` of them."""
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def update_ema(config, state: TrainState) -> TrainState:
    """``ema = d * ema + (1 - d) * params`` in float32, ``d`` = ``train.ema_decay`` after
    its warm-up (``ema_decay_at`` of the steps taken, this one included)."""
    if getattr(state, "ema_params", None) is None:
        return state
    d = ema_decay_at(config.train.ema_decay, state.step.astype(jnp.float32))
    return state.replace(ema_params=jax.tree.map(
        lambda e, p: d * e + (1 - d) * p.astype(jnp.float32), state.ema_params, state.params))


def for_eval(state: TrainState) -> TrainState:
    """The state whose params are the weights to evaluate and predict with: the
    average (``ema_params``) when the run keeps one, else its params."""
    if getattr(state, "ema_params", None) is None:
        return state
    return state.replace(params=state.ema_params)


def init_state(config, model, input_shape, total_steps: int, mesh) -> TrainState:
    """Initialises the state directly onto the mesh, replicated."""
    init = jax.jit(
        functools.partial(create_state, config, model, input_shape, total_steps),
        out_shardings=sharding.replicated(mesh))
    return init(jax.random.key(config.seed))


def abstract_state(config, model, input_shape, total_steps: int, mesh):
    shapes = jax.eval_shape(
        functools.partial(create_state, config, model, input_shape, total_steps),
        jax.random.key(config.seed))
    return ckpt_lib.abstract_like(shapes, sharding.replicated(mesh))


def variables(state) -> dict:
    """The model variables of a state (what ``model.apply`` takes)."""
    return {"params": state.params, "batch_stats": state.batch_stats}


# --------------------------------------------------------------------------- #
# The steps
# --------------------------------------------------------------------------- #


def train_step(state: TrainState, batch: dict, *, config, num_classes: int,
               freeze_steps: int = 0, swap: tuple[int, ...] | None = None):
    """One optimizer step on a global batch: on-device augmentation, Dice + CE (plus the
    coarser outputs with ``model.deep_supervision``).

    For the first ``freeze_steps`` steps the encoder stays fixed (transfer learning).
    ``swap``: the left / right label permutation a mirrored sample takes (laterality).
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    annotated = batch.get("annotated")
    images, labels, *rest = augment.augment_batch(
        aug_rng, batch["image"], batch["label"], config.augment, swap, annotated,
        context=config.data.context_slices)
    annotated = rest[0] if rest else None

    deep = bool(config.model.deep_supervision)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats", "aux"] if deep else ["batch_stats"],
            rngs={"dropout": dropout_rng})
        aux = {int(name.split("_")[1]): value[-1]
               for name, value in updates.get("aux", {}).items()}
        loss = losses.supervised_loss(logits, labels, num_classes,
                                      dice_weight=config.train.dice_weight,
                                      ce_weight=config.train.ce_weight, aux=aux,
                                      annotated=annotated)
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if freeze_steps:
        frozen = state.step < freeze_steps
        grads = transfer.zero_encoder(grads, frozen)
        old = state
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        state = state.replace(
            params=transfer.freeze_encoder(old.params, state.params, frozen),
            batch_stats=transfer.freeze_encoder(old.batch_stats, state.batch_stats, frozen))
    else:
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    state = update_ema(config, state)
    grad_norm = optax.tree.norm(grads)
    return state, {"loss": loss, "grad_norm": grad_norm}


def eval_step(state: TrainState, batch: dict, *, config, num_classes: int):
    """Loss (weighted by real rows) and Dice counts of one padded batch."""
    logits = state.apply_fn(variables(state), batch["image"], train=False)
    mask, annotated = batch["mask"], batch.get("annotated")
    loss = losses.supervised_loss(logits, batch["label"], num_classes,
                                  dice_weight=config.train.dice_weight,
                                  ce_weight=config.train.ce_weight, mask=mask,
                                  annotated=annotated)
    counts = metrics.dice_counts(jnp.argmax(logits, -1), batch["label"], num_classes, mask=mask,
                                 annotated=annotated)
    return {"loss_sum": loss * mask.sum(), "n": mask.sum(), "counts": jnp.stack(counts)}


def jit_steps(config, mesh, num_classes: int, freeze_steps: int = 0,
              swap: tuple[int, ...] | None = None):
    repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    train = jax.jit(
        functools.partial(train_step, config=config, num_classes=num_classes,
                          freeze_steps=freeze_steps, swap=swap),
        in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
    evaluate = jax.jit(
        functools.partial(eval_step, config=config, num_classes=num_classes),
        in_shardings=(repl, data), out_shardings=repl)
    return train, evaluate


@dataclasses.dataclass
class Setup:
    """What a job steps: the mesh, the network, its state and the jitted step functions."""

    mesh: jax.sharding.Mesh
    model: Any
    state: Any  # a TrainState, or its abstract description (``abstract=True``)
    train_fn: Any  # jitted ``(state, batch) -> (state, {"loss", "grad_norm"})``
    eval_fn: Any  # jitted ``(state, batch) -> {"loss_sum", "n", "counts"}``
    input_shape: tuple[int, ...]


def initialize(config, num_classes: int, num_channels: int, total_steps: int = 1000,
               mesh=None, *, abstract: bool = False, freeze_steps: int = 0,
               swap: tuple[int, ...] | None = None) -> Setup:
    """The one set-up of every job that steps or restores a network: the model of
    ``config.model``, its state on ``mesh`` (default: all devices) with an optimizer
    scheduled over ``total_steps`` (``abstract``: only described, for a restore) and the
    jitted train / eval steps (compiled on first call)."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    model = build_model(config, num_classes)
    shape = (config.train.batch_size, *config.data.image_size, num_channels)
    make = abstract_state if abstract else init_state
    state = make(config, model, shape, total_steps, mesh)
    train_fn, eval_fn = jit_steps(config, mesh, num_classes, freeze_steps, swap)
    return Setup(mesh, model, state, train_fn, eval_fn, shape)


# --------------------------------------------------------------------------- #
# Prediction
# --------------------------------------------------------------------------- #


def predict_step(state: TrainState, images):
    logits = state.apply_fn(variables(state), images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def flip_axes(spatial_dims: int, spatial_axes=None) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a (B, *spatial, C) batch, () first; only of
    ``spatial_axes`` (0-based, batch not counted) when given."""
    axes = [a + 1 for a in (range(spatial_dims) if spatial_axes is None else spatial_axes)]
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _tta_predict_step(state, images, flips: tuple[tuple[int, ...], ...],
                      swap: tuple[int, ...] | None = None):
    total = 0.0
    for axes in flips:
        probs = predict_step(state, jnp.flip(images, axes) if axes else images)
        if axes:
            probs = jnp.flip(probs, axes)
            if swap is not None and len(axes) % 2:  # a mirror: left and right exchanged
                probs = probs[..., list(swap)]
        total = total + probs
    return total / len(flips)


def make_predict_fn(config, mesh, tta: bool | None = None,
                    swap: tuple[int, ...] | None = None):
    """Jitted ``(state, images) -> softmax``, averaged over flips when ``tta`` (default:
    ``eval.tta``): every combination of the axes training mirrored (``augment.flip_axes``,
    empty: all). ``swap``: the label permutation of a mirror (``data/laterality.py``); the
    probabilities of a mirrored input have their left / right channels exchanged back."""
    tta = config.eval.tta if tta is None else tta
    dims = config.model.spatial_dims
    flips = tuple(flip_axes(dims, augment.mirror_axes(config.augment, dims))) if tta else ((),)
    if tta and len(flips) == 1:
        logging.warning("eval.tta: training mirrors no axis (augment.enabled / p_flip), so "
                        "test-time augmentation has no flip to average; predicting once")
    return jax.jit(functools.partial(_tta_predict_step, flips=flips, swap=swap),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                   out_shardings=sharding.batch_sharded(mesh))


# --------------------------------------------------------------------------- #
# A trained run, restored
# --------------------------------------------------------------------------- #


def load_plans(workdir: str) -> dict:
    """The run's ``preprocess.json``: intensity normalisation and target spacing."""
    path = os.path.join(workdir, "preprocess.json")
    if not os.path.exists(path) and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{path} not found: {workdir} holds no training run")
    return fileio.read_json(path, "the run's preprocessing plan",
                            "it is rewritten by training: run the training command again "
                            "(it resumes from the checkpoints)")


@dataclasses.dataclass
class Run:
    """A trained run restored for inference."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    plans: dict
    dataset: dataset_lib.Dataset
    model: Any
    state: TrainState  # its params: the weights to predict with (``for_eval``)
    step: int
    epoch: int
    which: str
    predict_fn: Any

    @property
    def labels(self) -> dict[int, str]:
        """Foreground label value -> class name."""
        return {v: n for v, n in self.dataset.labels.items() if v != 0}


def restore_run(config: ml_collections.ConfigDict, workdir: str,
                checkpoint: str | None = None) -> Run:
    """Restores the ``checkpoint`` (best, latest or a step) of the run in ``workdir``;
    ``Run.config`` is the run's config with its plan applied (``data.plan``)."""
    config_lib.check_numbers(config)
    # Before anything that could write (planning opens the data set): a workdir without a
    # run is refused as it is, not filled with a split or synthetic data first.
    if not os.path.exists(os.path.join(workdir, "splits.json")):
        if os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise FileNotFoundError(
                f"{workdir}/splits.json: missing (the run's case split); run the training "
                "command: it makes it again from config.seed and config.data.split_fractions "
                "(the same split while the data are unchanged) and resumes from the "
                "checkpoints")
        raise FileNotFoundError(f"{workdir}/splits.json not found: train in this workdir first")
    config, _ = planning.resolve(config, workdir)
    config_lib.validate(config)
    which = str(checkpoint or config.eval.checkpoint)
    setup_compilation_cache(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    workdir_lib.check_config(config, workdir, workdir_lib.EVAL_FIELDS)
    plans = load_plans(workdir)
    dataset = dataset_lib.open_dataset(config, workdir)
    # The optimizer state is restored too: the schedule length does not change shapes.
    setup = initialize(config, dataset.num_classes, dataset.num_channels, 1, mesh,
                       abstract=True)
    # Verified first: a damaged checkpoint is named with the kept steps that verify.
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
        step, state, meta = ckpt.restore_chosen(which, setup.state)
    swap = laterality.label_permutation(config, dataset.labels, dataset.num_classes)
    return Run(config, workdir, mesh, plans, dataset, setup.model, for_eval(state), step,
               meta.get("epoch", -1) + 1, which, make_predict_fn(config, mesh, swap=swap))


# The evaluation settings an ensemble's members take from the evaluated run's config.
MEMBER_EVAL_FIELDS = ("batch_size", "checkpoint", "sw_overlap", "sw_window", "tta")


def ensemble_paths(config, workdir: str) -> list[str]:
    """The member workdirs ``eval.ensemble`` names (not the run itself); one-line errors,
    also for a per-run post-processing choice ("choose", "auto") asked of an ensemble."""
    entries = [e.strip() for e in str(config.eval.ensemble or "").split(",")]
    entries = [e for e in entries if e]
    mode = str(config.eval.postprocess).strip()
    if entries and mode in ("choose", "auto"):
        raise ValueError(f"config.eval.postprocess={mode!r} with config.eval.ensemble: a "
                         "choice is made per run; give the ensemble '' or 'largest' (or "
                         "'largest:1,7')")
    seen = {os.path.realpath(workdir): workdir}
    for entry in entries:
        real = os.path.realpath(entry)
        if real in seen:
            raise ValueError(f"config.eval.ensemble: {entry} is "
                             + ("the evaluated run itself (--workdir)" if seen[real] == workdir
                                else f"listed twice (as {seen[real]})"))
        seen[real] = entry
    return entries


def restore_members(run: Run, checkpoint: str | None = None) -> list[Run]:
    """The other runs of ``run.config.eval.ensemble``, each restored from its own recorded
    config (its network, plan and data: ``workdir.read_run_config``) with ``run``'s
    evaluation settings (``MEMBER_EVAL_FIELDS``, no post-processing: the ensemble's is
    applied once, after averaging). Every member must have ``run``'s classes. Raises
    ValueError naming the member."""
    members = []
    for path in ensemble_paths(run.config, run.workdir):
        try:
            config = workdir_lib.read_run_config(path)
        except ValueError as e:
            raise ValueError(f"config.eval.ensemble: {e}") from None
        for field in MEMBER_EVAL_FIELDS:
            config.eval[field] = run.config.eval[field]
        config.eval.postprocess, config.eval.ensemble = "", ""
        member = restore_run(config, path, checkpoint)
        if member.dataset.labels != run.dataset.labels:
            raise ValueError(f"config.eval.ensemble: {path} has the classes "
                             f"{member.dataset.labels}, the evaluated run {run.dataset.labels}")
        modalities = [[len(i.modalities) for i in r.dataset.infos] for r in (member, run)]
        if modalities[0] != modalities[1]:
            raise ValueError(f"config.eval.ensemble: {path} reads {modalities[0][0]} "
                             f"modalities per case, the evaluated run {modalities[1][0]}")
        members.append(member)
    return members
