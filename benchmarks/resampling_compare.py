"""What the geometry alone costs: nnU-Net's resampling and crop against the simple path.

For each case of a split, the ground truth itself is taken through the run's geometry and
back, as a prediction is: cropped (``data.crop_nonzero``), resampled to the planned target
spacing (``data.resampling``), turned into one-hot class probabilities and mapped back to the
case's own grid (``preprocess.to_case_grid``), then the argmax. The Dice of that round trip
against the ground truth is the best a perfect network could score at that grid. It needs
no training, so it compares the two paths on every data set in minutes:

    python benchmarks/resampling_compare.py --config=configs/unet_3d.py \\
        --config.data.root=../shared/data/Task04_Hippocampus --split=val

Printed per path: the share of voxels the crop keeps, the voxels of the network's grid,
the seconds per case to resample (image and label) and to map back, and the round-trip
Dice per class (mean and minimum over the cases annotated with the class). The plan is
made from the training cases (``data.plan="auto"``) as a run would make it; both paths
use the same plan and split.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined when run, so that ``round_trip`` can be imported)."""
    config_flags.DEFINE_config_file("config", None,
                                    "A get_config() file, e.g. configs/unet_3d.py.")
    flags.DEFINE_enum("split", "val", ["train", "val", "test"], "The cases to take.")
    flags.DEFINE_integer("cases", 0, "Only the first N cases of the split (0: all).")

PATHS = {"simple, whole case": ("simple", False), "nnunet + crop": ("nnunet", True)}


def round_trip(case, plans, config, k: int) -> tuple[dict, float, float, float, int]:
    """({class: Dice}, share of voxels kept by the crop, seconds to resample, seconds back,
    voxels of the network's grid) for the ground truth of one case with ``k`` classes."""
    from medseg_jax import metrics  # noqa: PLC0415
    from medseg_jax.data import preprocess  # noqa: PLC0415

    geometry = preprocess.case_geometry(case, plans, config)
    box = geometry["box"]
    kept = float(np.prod([hi - lo for lo, hi in box]) / np.prod(case.image.shape[1:]))
    cropped = preprocess.crop_case(case, box)
    target = preprocess.case_target_spacing(cropped.spacing, plans["target_spacing"],
                                            config.data.slice_axis)
    start = time.perf_counter()
    _, grid_label = preprocess.resample(cropped.image, cropped.label, cropped.spacing,
                                        target, preprocess.resampling_method(config))
    forward = time.perf_counter() - start
    probs = np.eye(k, dtype=np.float32)[grid_label]
    start = time.perf_counter()
    back = preprocess.to_case_grid(probs, case, plans, config).argmax(-1)
    backward = time.perf_counter() - start
    dice = {c: metrics.dice(back == c, case.label == c)
            for c in range(1, k) if (case.label == c).any()}
    return dice, kept, forward, backward, int(grid_label.size)


def main(argv) -> None:
    del argv
    from medseg_jax import config as config_lib  # noqa: PLC0415
    from medseg_jax import planning  # noqa: PLC0415
    from medseg_jax.data import cache, dataset as dataset_lib, preprocess  # noqa: PLC0415

    workdir = tempfile.mkdtemp(prefix="resampling_compare_")
    config, _ = planning.resolve(FLAGS.config, workdir)
    config_lib.validate(config)
    if not preprocess.uses_patches(config):
        raise SystemExit("--config: a patch-based run is needed (a 3D model, or a 2D model "
                         "with data.in_plane='spacing'); resized slices have no target spacing")
    dataset = dataset_lib.open_dataset(config, workdir)
    keys = dataset.splits[FLAGS.split][: FLAGS.cases or None]
    plans = {"target_spacing": cache.target_spacing(config, dataset)}
    names = {int(v): n for v, n in dataset.labels.items()}
    print(f"{config.data.root}: {len(keys)} {FLAGS.split} cases, target spacing "
          f"{tuple(round(s, 3) for s in plans['target_spacing'])} mm, model "
          f"{config.model.spatial_dims}D")
    variants = {}
    for name, (method, crop) in PATHS.items():
        variants[name] = config.copy_and_resolve_references()
        variants[name].data.resampling, variants[name].data.crop_nonzero = method, crop
    rows = {name: ({}, [], [], [], []) for name in PATHS}
    for key in keys:  # each case read once, taken through both paths
        case = dataset.load(key)
        annotated = dataset.annotated(key)
        for name, variant in variants.items():
            per_class, *lists = rows[name]
            dice, *values = round_trip(case, plans, variant, dataset.num_classes)
            for c, d in dice.items():
                if annotated[c]:
                    per_class.setdefault(c, []).append(d)
            for column, value in zip(lists, values):
                column.append(value)
    classes = sorted({c for per_class, *_ in rows.values() for c in per_class})
    print("\n| path | crop keeps | grid voxels | resample s/case | back s/case | "
          + " | ".join(f"{names.get(c, c)} Dice mean (min)" for c in classes) + " |")
    print("|---" * (5 + len(classes)) + "|")
    for name, (per_class, kept, forward, backward, voxels) in rows.items():
        cells = [f"{np.mean(per_class[c]):.4f} ({np.min(per_class[c]):.4f})"
                 if c in per_class else "n/a" for c in classes]
        print(f"| {name} | {np.mean(kept):.1%} (min {np.min(kept):.1%}) | "
              f"{np.mean(voxels):,.0f} | {np.median(forward):.3f} | {np.median(backward):.3f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
