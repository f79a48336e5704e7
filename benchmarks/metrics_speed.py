"""Time HD95 on a 256^3 pair of balls: bounding-box crop vs full-volume distance transforms.

Usage: python benchmarks/metrics_speed.py
"""

from __future__ import annotations

import time

import numpy as np

from medseg_jax.metrics import hausdorff

SHAPE = (256, 256, 256)
SPACING = (1.0, 1.0, 1.5)


def ball(center: tuple[float, ...], radius: float) -> np.ndarray:
    """Boolean ball of ``radius`` voxels around ``center``."""
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return dist2 <= radius**2


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    gt = ball((128, 128, 128), 60)
    pred = ball((131, 126, 129), 62)
    hd_crop, t_crop = timed(lambda: hausdorff(pred, gt, SPACING, percentile=95, crop=True))
    hd_full, t_full = timed(lambda: hausdorff(pred, gt, SPACING, percentile=95, crop=False))
    assert hd_crop == hd_full, (hd_crop, hd_full)
    print(f"HD95 = {hd_crop:.4f} (shape {SHAPE}, spacing {SPACING})")
    print(f"bbox crop:   {t_crop:.3f} s")
    print(f"full volume: {t_full:.3f} s")
    print(f"speed-up:    {t_full / t_crop:.1f}x")


if __name__ == "__main__":
    main()
