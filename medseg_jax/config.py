"""The default configuration: the study's protocol on the embedded synthetic data.

Lives in the package (``medseg_jax.config``) so that config files work from any
directory; ``configs/*.py`` start from it.

Every field can be overridden on the command line, e.g.
``--config.train.learning_rate=3e-4`` or ``--config.data.root=/data/Task04_Hippocampus``.
Every numeric field has a constraint in ``NUMBERS`` (``check_numbers``) and
``check_fields`` refuses a field the package does not define (a misspelling): both in
``config_checks`` (no JAX, no files: run before a run touches its workdir), re-exported
here; ``validate`` checks the rest. Nothing here imports JAX.
"""

import ml_collections

from medseg_jax import architectures, config_checks, geometry, postprocess
from medseg_jax.config_augment import default_augment_config, nnunet_augment_config
from medseg_jax.config_checks import (  # noqa: F401 (re-exported)
    NUMBERS, PROBABILITY_PREFIX, SWEEP_FIELDS, Number, check_numbers, dotted_value)


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Seed of the train / val / test split (data.splits_file empty), the parameter
    # initialisation, the training draws (batches, augmentation) and the bootstrap.
    config.seed = 0

    # --- data -------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    # Decathlon / nnU-Net raw folder(s), comma-separated. Empty: the embedded
    # synthetic MRI + CT + ultrasound set, generated from `seed` into the workdir.
    data.root = ""
    data.synthetic_seed = 0  # the synthetic data set is fixed by its own seed
    data.synthetic_cases = 24  # synthetic cases per modality
    data.synthetic_size = 64  # in-plane size of the synthetic images
    data.synthetic_depth = 24  # slices of the synthetic 3D volumes
    # Preprocessed arrays are cached here (keyed by a fingerprint of the data
    # and the settings). Empty: <workdir>/cache.
    data.cache_dir = ""
    # Network input size: (H, W) for 2D models, (X, Y, Z) for 3D models: the patch
    # size for 3D models and for data.in_plane="spacing".
    data.image_size = (64, 64)
    # Axis (of the canonical RAS volume) along which 3D volumes are sliced for
    # 2D models; 2 = axial.
    data.slice_axis = 2
    # 2D models on volumes: the k slices on each side of a slice become extra input
    # channels (2.5D: some 3D context for the cost of the first convolution), edge
    # slices repeated at the volume's ends; 0: the slice alone. The label is the centre
    # slice's. Per-channel augmentation draws stay per modality.
    data.context_slices = 0
    # After the modality's normalisation, optionally min-max rescale each case and
    # channel to [0, 1].
    data.rescale_01 = False
    # 2D models: how a slice (or 2D image) becomes a network input.
    #   "resize": every slice is resized to `image_size` (predictions resized back);
    #     simple, but pixels of different sizes are stretched to one grid.
    #   "spacing": as nnU-Net's 2D configuration: every case is resampled in plane
    #     to `target_spacing`, trained on random `image_size` patches of its slices and
    #     predicted with a 2D sliding window (eval.sw_overlap, Gaussian weighting), so
    #     a pixel covers the same mm everywhere. For data whose pixel size varies (HC18).
    # 3D models always resample (as "spacing").
    data.in_plane = "resize"
    # Voxel size (mm, RAS axes) cases are resampled to: 3D models and
    # in_plane="spacing". Empty: the median spacing of the training cases. 2D models
    # take the two in-plane entries (a third, slice-axis entry is ignored: slices
    # keep their own thickness).
    data.target_spacing = ()
    # How cases are resampled (3D models, in_plane="spacing") or resized (2D slices):
    # "simple": images linear, labels nearest-neighbour, every axis alike; "nnunet":
    # images cubic, labels per class linear then argmax, the coarse axis of anisotropic
    # cases (spacing ratio > 3) separately with order 0 (data/resampling.py).
    data.resampling = "simple"
    # Cut each case to the bounding box of its non-zero voxels (any channel) before
    # resampling, as nnU-Net does; predictions are background outside the box.
    data.crop_nonzero = False
    # The most memory one case may take while it is preprocessed or evaluated, in GiB,
    # estimated from its header before it is read (a header whose voxel size is off
    # would resample it to a huge grid). 0: half of this machine's physical memory.
    data.max_case_gib = 0.0
    data.split_fractions = (0.7, 0.15, 0.15)  # train / val / test, by case
    # A JSON file {"train": [...], "val": [...], "test": [...]} of case ids
    # ("Task/case"). Empty: made from `seed` and written to <workdir>/splits.json.
    data.splits_file = ""
    # Share of each training batch drawn from slices that contain foreground.
    data.foreground_fraction = 0.33
    # How that share is centred: "foreground" (any labelled voxel) or "class" (a class
    # drawn among those the case or slice holds, then one of its voxels: nnU-Net's).
    data.oversample = "foreground"
    data.num_workers = 0  # grain worker processes (0: read in the main process)
    # Left / right organ pairs (data/laterality.py): a mirrored training sample and a
    # mirrored TTA prediction exchange their labels, as a mirrored patient's would be.
    # "auto": the pairs named so in dataset.json (LeftParotid / RightParotid,
    # Kidney_L / Kidney_R, ...); "none": mirrors keep the labels; or values "3:4,5:6".
    data.lateral_pairs = "auto"
    # Plans from the data, as nnU-Net makes them (medseg_jax/planning): "auto" fills the
    # fields left "to the plan" (image_size (), target_spacing (), train.batch_size 0,
    # model.base_features 0, model.depth 0, model.max_features 0) from the training
    # cases; the run's plans.json says what was used and why. "": off.
    data.plan = ""
    data.plan_budget = "auto"  # auto (by backend) | cpu | gpu: how big a step may be

    # --- model: the network is built as Model(**config.model) ------------------
    # The fields every architecture has; an architecture's own fields (FCN's
    # dropout_rate, Attention U-Net's output_transform) are added by its config file
    # (configs/fcn.py) and listed in medseg_jax/models.
    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"  # the architecture: unet | fcn | attention_unet | resenc_unet
    model.spatial_dims = 2  # 2: a 2D network on slices or 2D images; 3: a 3D network
    model.base_features = 16  # features of the finest level, doubled at each coarser one
    model.depth = 4  # resolution levels; sizes must be divisible by the total pooling
    model.norm = "batch"  # normalisation after each convolution: batch | instance | none
    # Compute dtype: float32 | bfloat16 (mixed precision: convolutions in bfloat16, the
    # parameters, optimizer, BatchNorm statistics, logits and loss stay float32).
    model.dtype = "float32"
    # Rematerialise the encoder blocks in the backward pass (nn.remat): less peak memory
    # for large 3D inputs, about one more forward pass of compute; same results.
    model.remat = False
    # Per level and axis: pooling factors (depth - 1 entries) and kernel sizes (depth
    # entries), e.g. ((2, 2, 1), (2, 2, 2), ...) for thick slices. Empty: 2 and 3 on
    # every axis. A plan (data.plan="auto") fills them from the data.
    model.pool_sizes = ()
    model.kernel_sizes = ()  # per level and axis (depth entries); see pool_sizes
    model.max_features = 0  # cap on a level's features (nnU-Net: 320 in 3D); 0: none
    # Transposed conv and max pool: "reshape" (matmul / reshape forms, fastest on XLA's
    # CPU backend), "lax" (lax.conv_transpose / reduce_window, cuDNN on GPUs), or
    # "auto" (per backend, see models/layers.py); same parameters and results.
    model.layer_impl = "auto"
    # Deep supervision: the loss also scores the coarser decoder levels' outputs
    # (weights 1/2^level, normalised), as nnU-Net trains.
    model.deep_supervision = False

    # --- training ---------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 16  # global batch, split over all devices
    train.optimizer = "adam"  # adam (the study's) | sgd (Nesterov momentum, nnU-Net's)
    train.learning_rate = 1e-3  # the initial learning rate (lr_schedule decays it)
    train.lr_schedule = "constant"  # constant | cosine | poly (nnU-Net: (1 - t/T)**0.9)
    train.momentum = 0.99  # sgd only
    train.weight_decay = 0.0  # adam: >0 switches to AdamW; sgd: L2 added to the gradient
    train.grad_clip_norm = 0.0  # 0: no clipping
    # 0 < d < 1: keep an exponential moving average of the params, ema = d * ema +
    # (1 - d) * params after each step t, d warmed up as min(d, (1 + t) / (10 + t))
    # (e.g. 0.999); validation, the best checkpoint, evaluation and prediction use it. 0: off.
    train.ema_decay = 0.0
    train.num_epochs = 30  # at most (early stopping: patience)
    train.steps_per_epoch = 0  # 0: one pass over the training samples
    # A wall-time budget for training, in minutes (0: off): the step and validation times
    # are measured before training and num_epochs is set so that the run fits, then
    # revised once from the first epoch's measured time (recorded in config.json; a
    # resumed run keeps it).
    train.budget_minutes = 0.0
    # Validate on at most this many samples (2D slices or 3D patches) of the validation
    # split, evenly spaced over it (0: all). nnU-Net scores 50 batches per epoch; every
    # slice of a large CT split can cost as much as the epoch's training.
    train.val_max_samples = 0
    # case_dice: predict at most this many validation cases, evenly spaced over the split
    # (0: all).
    train.val_max_cases = 0
    # The evaluators run at epoch ends, comma-separated: dice (val_loss, val_dice and
    # val_dice_per_class in the epoch's row; required) | dice_raw (val_loss_raw and
    # val_dice_raw of the raw weights, with train.ema_decay) | overlay (a validation
    # sample's outlines in TensorBoard, with train.tensorboard) | case_dice
    # (val_case_dice and val_case_dice_per_class: Dice per validation case, each predicted
    # whole as evaluation does (eval.sw_window, sw_overlap, tta) on the preprocessed grid).
    train.evals = "dice,overlay"
    # The metric choosing the best checkpoint: val_dice (highest) | val_loss (lowest) |
    # val_case_dice (highest; needs case_dice in train.evals).
    train.best_metric = "val_dice"
    # 0: the best checkpoint by the epoch's raw best_metric; 0 < a < 1: by its exponential
    # moving average over epochs, ema = a * ema + (1 - a) * value from the first epoch's
    # value (nnU-Net: 0.9 on its pseudo Dice), logged as best_metric_ema.
    train.best_ema = 0.0
    train.patience = 8  # early stopping on validation loss, in epochs (0: off)
    train.min_delta = 0.0  # a validation loss lower by more than this is an improvement
    train.init_from = ""  # another run's workdir: start from its best checkpoint (transfer)
    train.freeze_encoder_epochs = 0  # with init_from: keep the encoder fixed this many epochs
    train.dice_weight = 1.0  # loss = dice_weight * soft Dice loss + ce_weight * cross-entropy
    train.ce_weight = 1.0  # see dice_weight
    train.log_every_steps = 50  # the only steps whose loss is fetched to the host
    train.prefetch = 2  # batches put on the devices ahead of the step consuming them
    # Debugging: run the step loop under jax.transfer_guard(...): "" (off) | "log" |
    # "disallow" (an implicit host<->device copy in the loop raises).
    train.transfer_guard = ""
    # A jax.profiler trace of training steps A..B ("A:B", 1-based; "" off) written to
    # <workdir>/profile: `tensorboard --logdir <workdir>/profile` (tensorboard-plugin-profile)
    # or its perfetto_trace.json.gz in ui.perfetto.dev.
    train.profile_steps = ""
    train.checkpoint_max_to_keep = 2  # besides the best, always kept
    # Also keep a checkpoint every N minutes of training (0: off), e.g. to evaluate what
    # 15, 30 and 60 minutes give: --config.eval.checkpoint=<step>.
    train.keep_every_minutes = 0.0
    # TensorBoard event files in the workdir (the logged scalars and a validation overlay
    # image per epoch), beside metrics.jsonl: `tensorboard --logdir runs` (the viewer:
    # pip install -e '.[tensorboard]').
    train.tensorboard = True
    train.compilation_cache_dir = "~/.cache/medseg_jax/jit"  # empty: off
    # False: XLA:CPU's YNNPACK fusions for reductions only, not convolutions: 2-5x faster
    # training on the CPUs measured (docs/performance.md; numbers change in the last
    # bits). True: XLA's defaults. Set once, at the start of the process (python -m
    # medseg_jax.main), where the CPU is the only backend, jaxlib 0.10 to 0.12
    # (sharding.py).
    train.xla_cpu_ynn = False

    # --- augmentation -----------------------------------------------------
    # On the device, in the train step (medseg_jax/data/augment.py); the recipe takes
    # nnU-Net's set (nnunet_augment_config).
    config.augment = default_augment_config()

    # --- evaluation -------------------------------------------------------
    config.eval = ev = ml_collections.ConfigDict()
    ev.batch_size = 32  # slices or sliding-window patches per prediction call
    ev.split = "test"  # the split evaluated: train | val | test
    ev.checkpoint = "best"  # best | latest | a step number
    ev.sw_overlap = 0.5  # sliding window: overlap of neighbouring patches (0 to <1)
    # Sliding window size: "patch" (data.image_size, the training patch; nnU-Net's) or
    # "whole" (one window over the whole case or slice, padded up to the network's total
    # pooling and never smaller than the patch: fewer, larger inputs; as MONAI's
    # roi_size, set to the image; docs/evaluation.md, "Evaluation windows").
    ev.sw_window = "patch"
    # Test-time augmentation: average the softmax over every combination of the axes
    # training mirrors (augment.flip_axes, empty: all; none with augment.p_flip = 0).
    ev.tta = False
    # Post-processing of the label maps (postprocess.py): "" (none), "largest" (every
    # class keeps only its largest connected component; nnU-Net's), "largest:1,7" (those
    # label values), "choose" (score each class of the validation split with and without
    # it, keep it where it raises the class's Dice, write <workdir>/postprocessing.json,
    # then evaluate eval.split with it), "auto" (apply that file's choice).
    ev.postprocess = ""
    # Ensemble: workdirs of other runs on the same data and classes (comma-separated),
    # whose class probabilities are averaged with this run's, each with its own network,
    # plan and flips, before the argmax (evaluation and prediction; nnU-Net's ensembling
    # of configurations). Files "<split>_ensemble_<their folder names>_*".
    ev.ensemble = ""
    ev.nsd_tolerance_mm = 1.0  # normalised surface Dice: surface distance counted as a hit
    ev.bootstrap_samples = 2000  # resamples for the 95% interval of each mean
    ev.figures = True  # overlays, uncertainty / attention maps and curves in <workdir>/figures

    return config


def study_section() -> ml_collections.ConfigDict:
    """The ``benchmark`` section of a study config (configs/benchmark.py): what to compare."""
    b = ml_collections.ConfigDict()
    # Architectures, comma-separated: unet, fcn, attention_unet; "_3d" for the 3D variant
    # (e.g. "unet,unet_3d"; 3D runs skip 2D data sets such as the synthetic ultrasound).
    b.models = "unet,fcn,attention_unet"
    # Several data sets, each with its own label set: "name:folder,name:folder" (a
    # Decathlon folder, or the raw HC18 / OpenKBP folders, converted once into
    # <workdir>/converted/). Empty: data.root (or the embedded synthetic set).
    b.datasets = ""
    # Wall-time budget of the whole study in minutes (0: off): shared by the runs, each
    # sets its epochs to fit (train.budget_minutes); 15% is left for evaluation.
    b.budget_minutes = 0.0
    # Weights of the data sets in that sharing, "name:weight,..." (unlisted: 1), e.g.
    # "openkbp:3" for a data set whose epochs cost 3x the others'. Empty: equal shares.
    b.budget_shares = ""
    b.image_size_3d = (64, 64, 24)  # patch size of the 3D variants; (): from the plan
    b.batch_size_3d = 2  # 0: from the plan
    # Transfer learning: an earlier benchmark workdir; each architecture is fine-tuned
    # from its counterpart there (and, with compare_scratch, also trained from scratch).
    b.init_from = ""
    b.compare_scratch = True  # with init_from: also train each architecture from scratch
    b.freeze_encoder_epochs = 0  # with init_from: as train.freeze_encoder_epochs
    # Hyperparameter search (the study's): every combination is trained and scored on the
    # validation split; the best by validation Dice is evaluated once on the test split.
    # An empty list leaves its field as the config has it (not swept).
    b.sweep = s = ml_collections.ConfigDict()
    s.enabled = False  # run the search (False: one run per architecture and data set)
    s.learning_rates = "1e-3,3e-4"  # values of train.learning_rate, comma-separated
    s.batch_sizes = "16"  # values of train.batch_size
    s.num_epochs = "30"  # values of train.num_epochs
    s.patience = "8"  # values of train.patience
    return b


def auto_config() -> ml_collections.ConfigDict:
    """configs/auto.py: the defaults every configuration starts from (nnU-Net's recipe;
    each its own plan when it trains) and the ``choose`` section."""
    config = default_config()
    recipe(config)
    config.choose = choose_section()
    return config


def choose_section() -> ml_collections.ConfigDict:
    """The ``choose`` section of configs/auto.py: which planned configurations to train
    and compare, and the time they share (medseg_jax/choose.py)."""
    c = ml_collections.ConfigDict()
    # The planned configurations to train, in this order (the first makes the split the
    # others reuse), comma-separated: 2d (configs/unet_2d_planned.py) | 3d
    # (configs/unet_3d.py). Each trains in <workdir>/<name>.
    c.configurations = "2d,3d"
    # Wall time of the whole command in minutes (> 0): 80% of it is shared equally by
    # the configurations' training (each fits its epochs: train.budget_minutes), the rest
    # is left for preprocessing and the evaluations.
    c.budget_minutes = 60.0
    # Also score the ensemble of all the configurations (their probabilities averaged:
    # eval.ensemble) on the validation split as a candidate.
    c.ensemble = True
    return c


def recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """nnU-Net's training recipe, beside the study's protocol, the same for every
    architecture (the comparison stays fair): a plan from the data (patch, spacing,
    per-axis pooling, depth, batch: ``data.plan``), deep supervision, polynomial
    learning-rate decay over epochs of a fixed 250 iterations, per-class foreground
    oversampling, nnU-Net's resampling and crop to the non-zero region, nnU-Net's
    augmentation set, no early stopping (the best checkpoint by
    validation Dice is kept), flip test-time augmentation. Adam stays the optimizer (the
    study's); ``train.optimizer="sgd"`` gives nnU-Net's SGD with Nesterov momentum
    (``learning_rate=1e-2``, ``weight_decay=3e-5``). Changes ``config`` in place."""
    config.data.plan = "auto"
    config.data.image_size = ()
    config.data.target_spacing = ()
    config.train.batch_size = 0
    config.model.base_features = 0
    config.model.depth = 0
    config.model.max_features = 0
    config.model.deep_supervision = True
    config.data.oversample = "class"
    config.data.resampling = "nnunet"
    config.data.crop_nonzero = True
    config.train.lr_schedule = "poly"
    config.train.steps_per_epoch = 250
    config.train.patience = 0
    config.train.val_max_samples = 2048  # more than Hippocampus or HC18 have
    config.eval.tta = True
    config.augment = nnunet_augment_config(config.model.spatial_dims)
    return config


EVALUATORS = ("dice", "dice_raw", "overlay", "case_dice")  # the names train.evals may list


def evaluator_names(spec: str) -> list[str]:
    """``train.evals`` -> its evaluator names, in order; ValueError naming the field."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    for n in names:
        if n not in EVALUATORS:
            raise ValueError(f"config.train.evals: unknown evaluator {n!r}; "
                             f"use a comma-separated list of {', '.join(EVALUATORS)}")
    if "dice" not in names:
        raise ValueError(f"config.train.evals: {spec!r} lacks 'dice' (early stopping and "
                         "the best checkpoint read its val_loss and val_dice); add it")
    return names


_CHOICES = {
    "model.spatial_dims": (2, 3),
    "model.norm": ("batch", "instance", "none"),
    "data.in_plane": ("resize", "spacing"),
    "data.resampling": ("simple", "nnunet"),
    "data.plan": ("", "auto"),
    "data.oversample": ("foreground", "class"),
    "data.plan_budget": ("auto", "cpu", "gpu"),
    "data.slice_axis": (0, 1, 2),
    "model.dtype": ("float32", "bfloat16"),
    "model.layer_impl": ("auto", "reshape", "lax"),
    "train.lr_schedule": ("constant", "cosine", "poly"),
    "train.optimizer": ("adam", "sgd"),
    "train.transfer_guard": ("", "log", "disallow"),
    "train.best_metric": ("val_dice", "val_loss", "val_case_dice"),
    "eval.split": ("train", "val", "test"),
    "eval.sw_window": ("patch", "whole"),
}


def input_divisor(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The network's total pooling per spatial axis: its input sizes are multiples of it."""
    dims = config.model.spatial_dims
    try:  # (.get: the model section of a run recorded before these fields has none)
        pools, _ = geometry.level_geometry("config.model", dims, config.model.depth,
                                           config.model.get("pool_sizes", ()),
                                           config.model.get("kernel_sizes", ()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{e}" if str(e).startswith("config.") else
                         f"config.model.pool_sizes / kernel_sizes: {e}") from None
    return geometry.total_stride(pools, dims)


def profile_steps(spec: str) -> tuple[int, int] | None:
    """``train.profile_steps``: "A:B" -> (A, B), "" -> None; ValueError naming the field."""
    spec = str(spec).strip()
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not (
            1 <= int(parts[0]) <= int(parts[1])):
        raise ValueError(f"config.train.profile_steps: {spec!r} is not 'A:B' with steps "
                         "1 <= A <= B (e.g. '10:15'); '' turns profiling off")
    return int(parts[0]), int(parts[1])


def check_fields(config: ml_collections.ConfigDict) -> None:
    """``config_checks.check_fields`` against ``default_config``, ``study_section`` and
    ``choose_section``."""
    config_checks.check_fields(config, default_config().to_dict(), study_section().to_dict(),
                               choose_section().to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the fields that a run depends on (every field known: ``check_fields``;
    every number: ``check_numbers``); raises ValueError naming the field. No JAX."""
    check_fields(config)
    check_numbers(config)
    models = architectures.fields()
    if config.model.name not in models:
        raise ValueError(
            f"config.model.name: unknown model {config.model.name!r}; "
            f"valid models: {', '.join(sorted(models))}")
    valid = models[config.model.name]
    for key in config.model:
        if key != "name" and key not in valid:
            raise ValueError(f"config.model.{key}: {config.model.name} has no field {key!r}; "
                             f"valid: name, {', '.join(sorted(valid))}")
    for field, choices in _CHOICES.items():
        if (value := dotted_value(config, field)) not in choices:
            raise ValueError(
                f"config.{field}: {value!r} is not one of "
                f"{', '.join(map(str, choices))}")
    dims = config.model.spatial_dims
    size = tuple(config.data.image_size)
    if len(size) != dims:
        raise ValueError(
            f"config.data.image_size: {size} has {len(size)} entries but "
            f"config.model.spatial_dims is {dims}")
    if config.model.depth < 1:
        raise ValueError(f"config.model.depth: must be >= 1, got {config.model.depth}")
    divisor = input_divisor(config)
    if any(s <= 0 or s % d for s, d in zip(size, divisor)):
        what = (f"2**(depth-1) = {divisor[0]} for config.model.depth={config.model.depth}"
                if not len(config.model.get("pool_sizes", ())) else  # (as input_divisor)
                f"the total pooling {divisor} of config.model.pool_sizes")
        raise ValueError(
            f"config.data.image_size: {size} must be positive multiples of {what}")
    for field in ("train.batch_size", "model.base_features"):  # 0 before the plan
        if int(value := dotted_value(config, field)) <= 0:
            raise ValueError(f"config.{field}: must be positive, got {value}")
    fractions = tuple(config.data.split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"config.data.split_fractions: {fractions} must be three non-negative "
            "numbers (train, val, test) that sum to 1")
    context = int(config.data.context_slices)
    if context < 0 or (context and dims != 2):
        raise ValueError(f"config.data.context_slices: {context}: neighbouring slices as "
                         "channels need model.spatial_dims=2 and a count >= 0")
    postprocess.check_spec(config.eval.postprocess)
    if (config.train.best_metric == "val_case_dice"
            and "case_dice" not in evaluator_names(config.train.evals)):
        raise ValueError(f"config.train.best_metric: val_case_dice is the case_dice "
                         f"evaluator's, which config.train.evals={config.train.evals!r} "
                         "lacks; add case_dice to train.evals")
    if "dice_raw" in evaluator_names(config.train.evals) and not config.train.ema_decay:
        raise ValueError("config.train.evals: 'dice_raw' scores the raw weights beside "
                         "their average, but config.train.ema_decay is 0 (no average); "
                         "set config.train.ema_decay (e.g. 0.999) or drop dice_raw")
    profile_steps(config.train.profile_steps)
    ckpt = str(config.eval.checkpoint)
    if ckpt not in ("best", "latest") and not ckpt.isdigit():
        raise ValueError(
            f"config.eval.checkpoint: {ckpt!r} is not 'best', 'latest' or a step number")
