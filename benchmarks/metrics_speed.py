"""Time every metric of one case on 256^3 masks: bounding-box crop vs full volume.

``metrics.binary_metrics`` (Dice, IoU, precision, recall, volume difference, HD,
HD95, ASSD and NSD from one pair of distance transforms) runs the distance
transforms on the bounding box of the two masks; the straightforward version
runs them on the whole volume. Both give identical values (checked here). Two
pairs: a large lesion (balls of radius 60 / 62 voxels) and a small nodule
(radius 8 / 9) in a 256^3 volume with anisotropic spacing. Median of --repeats.

Usage: python benchmarks/metrics_speed.py [--repeats=3]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from medseg_jax import metrics, timing

SHAPE = (256, 256, 256)
SPACING = (1.0, 1.0, 1.5)


def ball(center: tuple[float, ...], radius: float) -> np.ndarray:
    """Boolean ball of ``radius`` voxels around ``center``."""
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return dist2 <= radius**2


def median_time(fn, repeats: int) -> tuple[dict, float]:
    timer, value = timing.StepTimer(), None
    for _ in range(repeats):
        value = timer.call(fn)
    return value, timer.median()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pairs = {"large lesion (r 60 / 62)": (ball((131, 126, 129), 62), ball((128, 128, 128), 60)),
             "small nodule (r 8 / 9)": (ball((100, 150, 60), 9), ball((101, 149, 61), 8))}
    print(f"shape {SHAPE}, spacing {SPACING} mm, median of {args.repeats}")
    for name, (pred, gt) in pairs.items():
        crop, t_crop = median_time(
            lambda: metrics.binary_metrics(pred, gt, SPACING, crop=True), args.repeats)
        full, t_full = median_time(
            lambda: metrics.binary_metrics(pred, gt, SPACING, crop=False), args.repeats)
        same = all(crop[k] == full[k] or (math.isnan(crop[k]) and math.isnan(full[k]))
                   for k in crop)
        assert same, (crop, full)
        print(f"{name}: all metrics {t_crop:.3f} s with the bounding box, {t_full:.3f} s on "
              f"the full volume: {t_full / t_crop:.1f}x faster, identical values")
        print("  " + json.dumps({k: round(v, 4) for k, v in crop.items()}))


if __name__ == "__main__":
    main()
