"""The embedded default data set: seeded MRI, CT and ultrasound phantoms with lesions.

``make_synthetic`` writes three task folders in the Medical Segmentation
Decathlon layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``), which are then
read back through the real loader (``medseg_jax.data.decathlon``):

* ``SynthMRI``: 3D T1-like head (scalp, skull, CSF, grey/white matter,
  ventricles), bias field, Rician noise, arbitrary per-case intensity scale;
  hyper- or hypo-intense brain lesions. RAS affine with a small obliquity.
* ``SynthCT``: 3D chest in Hounsfield units (air, fat, soft tissue, lungs,
  spine, ribs, aorta) with unlabelled lung vessels as distractors and a nodule
  inside a lung. LPS-like affine, as many CT conversions write it.
* ``SynthUS``: 2D B-mode ultrasound: fan-shaped acquisition cone, tissue
  layers, correlated Rayleigh speckle, log compression, a hypo- or hyperechoic
  lesion, sometimes with acoustic shadowing or posterior enhancement.

Label 1 marks the lesion(s); every case holds at least one lesion voxel.
Output is a pure function of the arguments: arrays, headers and the gzip
streams (mtime 0) are byte-identical between runs. Each task is built in a
temporary sibling folder and moved into place (``fileio.build_folder``); a
``synthetic.json`` marker (written last) lets later calls reuse it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from medseg_jax import fileio
from medseg_jax.data.nifti import write_nifti

_DESCRIP = b"medseg_jax synthetic"  # the NIfTI header's description

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
TASKS = ("SynthMRI", "SynthCT", "SynthUS")
_OWN_ENTRIES = {"dataset.json", "imagesTr", "labelsTr", MARKER}

Phantom = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, label, affine


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ~``scale`` voxels.

    White noise on a coarse grid (one node per ``scale`` voxels) is interpolated
    with Gaussian weights, one axis at a time (small matrix products: fast).
    """
    low_shape = [int(np.ceil(n / scale)) + 3 for n in shape]
    field = rng.standard_normal(low_shape, dtype=np.float32)
    letters = "ijklm"[: len(shape)]
    for axis, (n, low_n) in enumerate(zip(shape, low_shape)):
        t = np.arange(n) / scale + 1.0  # output positions on the coarse grid
        w = np.exp(-0.5 * ((t[:, None] - np.arange(low_n)[None, :]) / 0.8) ** 2)
        w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
        out = letters[:axis] + "z" + letters[axis + 1 :]
        field = np.einsum(f"z{letters[axis]},{letters}->{out}", w, field)  # einsum: no BLAS threads
    field = field - field.mean()
    return field / (field.std() + 1e-8)


def _axes_mm(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Centred physical coordinates (mm) per axis, shaped for broadcasting."""
    out = []
    for i, (n, s) in enumerate(zip(shape, spacing)):
        v = ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).astype(np.float32)
        out.append(v.reshape([-1 if j == i else 1 for j in range(len(shape))]))
    return out


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _blob(
    rng: np.random.Generator,
    axes: list[np.ndarray],
    center: Sequence[float],
    radii: Sequence[float],
    irregularity: float = 0.25,
) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid whose radius varies smoothly with direction.

    The surface is ``r(u) = 1 + wave(u)`` in the ellipsoid frame, a star shape
    with ``|wave| <= 2 * irregularity``.
    """
    ndim = len(axes)
    shape = tuple(a.size for a in axes)
    rot = _random_rotation(rng, ndim)
    k = 6
    dirs = rng.standard_normal((k, ndim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs = rng.uniform(0.5, 1.5, k)
    phases = rng.uniform(0, 2 * np.pi, k)
    amps = rng.uniform(0.5, 1.0, k) * 2.0 * min(irregularity, 0.45) / k
    mask = np.zeros(shape, dtype=bool)
    reach = (1.0 + 2.0 * min(irregularity, 0.45)) * max(radii) + 1e-3
    box = []
    for a, c in zip(axes, center):  # only evaluate inside the bounding box
        flat = a.ravel()
        idx = np.nonzero(np.abs(flat - c) <= reach)[0]
        if idx.size == 0:
            idx = np.array([int(np.argmin(np.abs(flat - c)))])
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    local = [a.ravel()[b] - c for a, b, c in zip(axes, box, center)]
    grids = np.meshgrid(*local, indexing="ij")
    d = np.stack(grids, axis=-1) @ rot / np.asarray(radii, dtype=np.float32)
    r = np.sqrt((d * d).sum(-1))
    u = d / np.maximum(r, 1e-6)[..., None]
    wave = np.cos(2 * np.pi * (u @ dirs.T) * freqs + phases) @ amps
    inside = r < 1.0 + wave
    if not inside.any():
        inside[tuple(int(np.argmin(np.abs(loc))) for loc in local)] = True
    mask[tuple(box)] = inside
    return mask


def _ellipse_r(
    axes: list[np.ndarray], center: Sequence[float], semi: Sequence[float]
) -> np.ndarray:
    """Normalised elliptic radius (1 on the surface)."""
    return np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip(axes, center, semi)))


def _nearest_voxel(axes: list[np.ndarray], point: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(np.argmin(np.abs(a.ravel() - c))) for a, c in zip(axes, point))


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    return np.sqrt((signal + n1) ** 2 + n2**2)


# --------------------------------------------------------------------------
# Modalities: each returns (image, label, affine)
# --------------------------------------------------------------------------


def _mri_case(rng: np.random.Generator, size: int, depth: int) -> Phantom:
    s = float(rng.uniform(0.8, 1.2))
    sz = float(rng.uniform(1.3, 1.7))
    shape = (size, size, depth)
    spacing = (s, s, sz)
    x, y, z = _axes_mm(shape, spacing)
    a = 0.44 * size * s * rng.uniform(0.92, 1.04)
    b = 0.47 * size * s * rng.uniform(0.95, 1.04)
    c = max(0.75 * depth * sz, 0.6 * b)
    z0 = rng.uniform(-0.1, 0.1) * depth * sz
    wobble = _smooth_field(rng, shape, max(4.0, size / 6))
    r = _ellipse_r([x, y, z], (0.0, 0.0, z0), (a, b, c)) * (1.0 + 0.025 * wobble)

    fold = _smooth_field(rng, shape, max(2.0, size / 16))
    wm = 1.0 / (1.0 + np.exp(-((0.62 - r) * 18.0 + 1.4 * fold)))
    tissue = np.where(r < 0.8, 0.5 + 0.32 * wm, 0.0).astype(np.float32)
    tissue[(r >= 0.8) & (r < 0.84)] = 0.2  # CSF
    tissue[(r >= 0.84) & (r < 0.91)] = 0.1  # skull
    tissue[(r >= 0.91) & (r < 1.0)] = 0.95  # scalp fat
    vent_dx = a * rng.uniform(0.08, 0.14)
    vent_semi = (a * rng.uniform(0.05, 0.09), b * rng.uniform(0.2, 0.3), c * rng.uniform(0.15, 0.3))
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        ventricles |= _ellipse_r([x, y, z], (side * vent_dx, -0.05 * b, z0), vent_semi) < 1.0
    tissue[ventricles] = 0.2

    label = np.zeros(shape, dtype=np.uint8)
    n_lesions = 2 if rng.random() < 0.25 else 1
    for _ in range(n_lesions):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        rho = 0.55 * rng.random() ** (1 / 3)
        semi_z = min(c, 0.4 * depth * sz)
        center = (direction[0] * rho * a, direction[1] * rho * b, z0 + direction[2] * rho * semi_z)
        radius = max(2.0, rng.uniform(2.5, 11.0) * size / 64) * s
        radii = radius * rng.uniform(0.7, 1.3, 3)
        lesion = _blob(rng, [x, y, z], center, radii, irregularity=rng.uniform(0.15, 0.35))
        lesion &= (r < 0.8) & ~ventricles
        if not lesion.any():
            lesion[_nearest_voxel([x, y, z], center)] = True
        if rng.random() < 0.25:
            contrast = rng.uniform(0.08, 0.18)  # subtle
        else:
            contrast = rng.uniform(0.15, 0.5)
        sign = 1.0 if rng.random() < 0.6 else -1.0
        hetero = 1.0 + 0.08 * _smooth_field(rng, shape, 2.0)
        tissue = np.where(lesion, tissue * (1.0 + sign * contrast) * hetero, tissue)
        label[lesion] = 1

    tissue = ndimage.gaussian_filter(tissue, (0.6, 0.6, 0.4))
    bias = np.exp(0.15 * _smooth_field(rng, shape, max(8.0, size / 2.5)))
    scale = 10 ** rng.uniform(2.5, 3.3)
    noisy = _rician(rng, tissue * bias * scale, rng.uniform(0.02, 0.05) * scale)
    image = np.clip(np.rint(noisy), 0, 32767).astype(np.int16)

    # Slightly oblique RAS affine.
    ax, az = np.deg2rad(rng.uniform(-6, 6, 2))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ rx @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2) + rng.uniform(-10, 10, 3)
    return image, label, affine


def _ct_case(rng: np.random.Generator, size: int, depth: int) -> Phantom:
    s = float(rng.uniform(0.7, 0.9))
    sz = 2.5
    shape = (size, size, depth)
    spacing = (s, s, sz)
    x, y, z = _axes_mm(shape, spacing)
    zn = z / max(depth * sz / 2, 1e-3)  # -1..1 along the volume
    a = 0.46 * size * s * rng.uniform(0.93, 1.03)
    b = 0.36 * size * s * rng.uniform(0.93, 1.05)
    wobble = _smooth_field(rng, (size, size, 1), max(4.0, size / 6))
    body_r = _ellipse_r([x, y], (0.0, 0.03 * b), (a, b)) * (1.0 + 0.02 * wobble)
    body_r = body_r * (1.0 + 0.03 * zn)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body_r < 1.0] = -90.0  # subcutaneous fat
    hu[body_r < 0.9] = 40.0  # muscle / soft tissue
    hu += np.where(body_r < 0.9, 10.0 * _smooth_field(rng, shape, 3.0), 0.0)

    lungs = []
    lung_mask = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        semi = (a * rng.uniform(0.3, 0.36), b * rng.uniform(0.55, 0.65), 1.0)
        center = (side * a * rng.uniform(0.42, 0.48), -0.05 * b)
        lr = _ellipse_r([x, y], center, semi[:2]) * (1.0 + 0.12 * zn**2)
        lung = np.broadcast_to(lr < 1.0, shape)
        lungs.append((center, semi))
        lung_mask |= lung
    hu[lung_mask] = -850.0
    hu += np.where(lung_mask, 25.0 * _smooth_field(rng, shape, 2.5), 0.0)

    # Spine (cortex + cancellous bone), aorta, ribs: bright, unlabelled.
    spine_c = (0.0, 0.68 * b)
    spine_r = 0.14 * min(a, b)
    d_spine = _ellipse_r([x, y], spine_c, (spine_r, spine_r * 0.9))
    hu[np.broadcast_to(d_spine < 1.0, shape)] = 900.0
    hu[np.broadcast_to(d_spine < 0.75, shape)] = rng.uniform(250.0, 450.0)
    aorta = _ellipse_r([x, y], (0.12 * a, 0.38 * b), (0.09 * a, 0.09 * a))
    hu[np.broadcast_to(aorta < 1.0, shape)] = 200.0 if rng.random() < 0.5 else 45.0
    for phi in np.linspace(-np.pi, np.pi, 16, endpoint=False):
        if min(abs(phi - np.pi / 2), abs(phi + np.pi / 2)) < 0.35:
            continue  # no ribs over the spine and the sternum
        rc = (0.85 * a * np.cos(phi), 0.03 * b + 0.85 * b * np.sin(phi))
        rib = _ellipse_r([x, y], rc, (0.05 * a, 0.04 * a)) < 1.0
        present = np.sin(zn * rng.uniform(2.0, 4.0) + rng.uniform(0, 2 * np.pi)) > -0.2
        hu[rib & present] = 700.0

    # Lung vessels: thin tubes along z with drift, same density as a nodule.
    vessels = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(8, 16))):
        center, semi = lungs[int(rng.integers(2))]
        t = rng.uniform(0, 2 * np.pi)
        rho = 0.8 * np.sqrt(rng.random())
        cx, cy = center[0] + rho * semi[0] * np.cos(t), center[1] + rho * semi[1] * np.sin(t)
        dx, dy = rng.uniform(-0.4, 0.4, 2)
        rv = rng.uniform(0.6, 1.8)
        vessels |= ((x - cx - dx * z) ** 2 + (y - cy - dy * z) ** 2) < rv**2
    vessel_hu = rng.uniform(0.0, 80.0)
    hu[vessels & lung_mask] = vessel_hu

    # The nodule, inside a lung.
    label = np.zeros(shape, dtype=np.uint8)
    n_lesions = 2 if rng.random() < 0.2 else 1
    for _ in range(n_lesions):
        center, semi = lungs[int(rng.integers(2))]
        radius = min(rng.uniform(2.5, 9.0), 0.4 * min(semi[:2]))
        t = rng.uniform(0, 2 * np.pi)
        rho = (0.6 - radius / min(semi[:2]) * 0.5) * np.sqrt(rng.random())
        half_z = depth * sz / 2
        cz = rng.uniform(-1, 1) * max(0.0, half_z - radius - sz) * 0.6
        nc = (center[0] + rho * semi[0] * np.cos(t), center[1] + rho * semi[1] * np.sin(t), cz)
        radii = radius * rng.uniform(0.75, 1.25, 3)
        nodule = _blob(rng, [x, y, z], nc, radii, irregularity=rng.uniform(0.2, 0.4))
        hu[nodule] = rng.uniform(-100.0, 100.0) + 15.0 * rng.standard_normal(int(nodule.sum()))
        label[nodule] = 1

    hu = ndimage.gaussian_filter(hu, (0.7, 0.7, 0.3))
    hu += rng.standard_normal(shape, dtype=np.float32) * rng.uniform(10.0, 30.0)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.diag([-s, -s, sz, 1.0])  # LPS-like axes, as ITK/DICOM conversions write CT
    affine[:3, 3] = [
        s * (size - 1) / 2 + rng.uniform(-5, 5),
        s * (size - 1) / 2 + rng.uniform(-5, 5),
        rng.uniform(-400.0, -200.0),
    ]
    return image, label, affine


def _us_case(rng: np.random.Generator, size: int, depth: int) -> Phantom:
    del depth  # 2D
    p = float(rng.uniform(0.1, 0.3))
    shape = (size, int(size * 1.25))  # (lateral, depth)
    x, d = _axes_mm(shape, (p, p))
    d = d - d.min()  # depth from the probe face, mm
    extent = shape[1] * p
    apex = rng.uniform(0.1, 0.3) * extent
    half_angle = np.deg2rad(rng.uniform(30.0, 40.0))
    rho = np.sqrt(x**2 + (d + apex) ** 2)
    theta = np.arctan2(x, d + apex)
    rho_max = apex + 0.98 * extent
    cone = (np.abs(theta) < half_angle) & (rho > apex + 0.01 * extent) & (rho < rho_max)

    echo = 1.0 + 0.15 * _smooth_field(rng, shape, max(3.0, size / 8))
    for _ in range(int(rng.integers(1, 3))):  # fascia-like bright layers
        level = rng.uniform(0.08, 0.3) * extent
        freq = rng.uniform(1.0, 3.0) / (0.3 * extent)
        wave = 0.02 * extent * np.sin(x * freq + rng.uniform(0, 2 * np.pi))
        width = 0.012 * extent + 0.5 * p
        echo = echo + rng.uniform(0.8, 1.8) * np.exp(-(((d - level - wave) / width) ** 2))
    if rng.random() < 0.6:  # an anechoic vessel: a distractor for dark lesions
        vc = (
            rng.uniform(-0.25, 0.25) * extent * np.tan(half_angle),
            rng.uniform(0.5, 0.85) * extent,
        )
        vr = rng.uniform(0.03, 0.06) * extent
        vessel = _ellipse_r([x, d], vc, (vr, vr * rng.uniform(0.6, 1.0))) < 1.0
        echo = np.where(vessel, 0.06, echo)

    # Lesion, inside the cone.
    label = np.zeros(shape, dtype=np.uint8)
    radius_px = rng.uniform(3.0, 12.0) * size / 64
    radius = max(radius_px, 2.0) * p
    lr = rng.uniform(apex + 0.3 * extent + radius, apex + 0.75 * extent)
    lt = rng.uniform(-0.6, 0.6) * (half_angle - radius / lr)
    center = (lr * np.sin(lt), lr * np.cos(lt) - apex)
    radii = radius * rng.uniform(0.7, 1.3, 2)
    lesion = _blob(rng, [x, d], center, radii, irregularity=rng.uniform(0.15, 0.35)) & cone
    if not lesion.any():
        lesion[_nearest_voxel([x, d], center)] = True
    hyper = rng.random() < 0.4
    subtle = rng.random() < 0.25
    if hyper:
        factor = rng.uniform(1.2, 1.45) if subtle else rng.uniform(1.5, 2.5)
    else:
        factor = rng.uniform(0.6, 0.8) if subtle else rng.uniform(0.15, 0.6)
    echo = np.where(lesion, echo * factor * (1.0 + 0.1 * _smooth_field(rng, shape, 2.0)), echo)
    span = theta[lesion]
    behind = (theta > span.min()) & (theta < span.max()) & (rho > lr + 0.7 * radius)
    if hyper and rng.random() < 0.5:
        echo = np.where(behind, echo * rng.uniform(0.25, 0.5), echo)  # acoustic shadow
    elif not hyper and rng.random() < 0.5:
        echo = np.where(behind, echo * rng.uniform(1.15, 1.4), echo)  # posterior enhancement
    label[lesion] = 1

    echo = echo * np.exp(-rng.uniform(0.3, 0.7) * d / extent)  # residual attenuation after TGC
    # Correlated speckle: smoothed complex Gaussian -> Rayleigh amplitude.
    sig = (rng.uniform(0.8, 1.4), rng.uniform(0.4, 0.7))
    re = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sig)
    im = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sig)
    speckle = np.sqrt(re**2 + im**2)
    speckle /= speckle.mean()
    amp = echo * speckle
    gain = rng.uniform(4.0, 10.0)
    bmode = 255.0 * np.log1p(gain * amp) / np.log1p(gain * 4.0)
    edge = np.clip((half_angle - np.abs(theta)) / np.deg2rad(1.5), 0, 1)
    bmode = np.clip(bmode * edge, 0, 255) * cone
    image = np.rint(bmode).astype(np.uint8)

    affine = np.diag([p, p, 1.0, 1.0])
    affine[:2, 3] = [-(shape[0] - 1) / 2 * p, 0.0]
    return image, label, affine


_MODALITY: dict[str, tuple[str, str, str, str, Callable[..., Phantom]]] = {
    # task: (file prefix, modality, tensorImageSize, description, generator)
    "SynthMRI": (
        "mri", "MRI", "3D", "T1-like head MRI phantoms (arbitrary units) with brain lesions",
        _mri_case,
    ),
    "SynthCT": (
        "ct", "CT", "3D", "chest CT phantoms (Hounsfield units) with lung nodules", _ct_case
    ),
    "SynthUS": (
        "us", "US", "2D", "2D B-mode ultrasound phantoms (speckle, fan) with lesions", _us_case
    ),
}


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _marker(task: str, seed: int, num_cases: int, size: int, depth: int) -> dict:
    return {
        "generator": "medseg_jax.data.synthetic",
        "version": GENERATOR_VERSION,
        "task": task,
        "seed": seed,
        "num_cases": num_cases,
        "size": size,
        "depth": depth,
    }


def _is_complete(folder: str, marker: dict) -> bool:
    try:  # a FIFO or a damaged file in its place: not complete (rebuilt)
        if fileio.read_json(os.path.join(folder, MARKER)) != marker:
            return False
        meta = fileio.read_json(os.path.join(folder, "dataset.json"))
    except ValueError:
        return False
    return all(
        os.path.isfile(os.path.join(folder, entry[key][2:]))
        for entry in meta.get("training", [])
        for key in ("image", "label")
    ) and len(meta.get("training", [])) == marker["num_cases"]


def _build_task(folder: str, task: str, seed: int, num_cases: int, size: int, depth: int) -> None:
    prefix, modality, tensor_size, what, generate = _MODALITY[task]
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    training = []
    for i in range(num_cases):
        rng = np.random.default_rng(np.random.SeedSequence([seed, TASKS.index(task), i]))
        image, label, affine = generate(rng, size, depth)
        assert label.any(), (task, i)
        name = f"{prefix}_{i:03d}.nii.gz"
        write_nifti(os.path.join(folder, "imagesTr", name), image, affine, _DESCRIP, 1)
        write_nifti(os.path.join(folder, "labelsTr", name), label, affine, _DESCRIP, 1)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": task,
        "description": f"Synthetic data (not patient data): {what}; medseg_jax.data.synthetic "
        f"v{GENERATOR_VERSION}, seed {seed}",
        "reference": "medseg_jax synthetic phantom generator",
        "licence": "CC0-1.0",
        "release": f"{GENERATOR_VERSION}",
        "tensorImageSize": tensor_size,
        "modality": {"0": modality},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:  # last
        json.dump(_marker(task, seed, num_cases, size, depth), f, indent=2)


def _make_task(root: str, task: str, seed: int, num_cases: int, size: int, depth: int) -> str:
    target = os.path.join(root, task)
    marker = _marker(task, seed, num_cases, size, depth)
    if _is_complete(target, marker):
        return target
    if os.path.exists(target):
        foreign = set(os.listdir(target)) - _OWN_ENTRIES
        if foreign:
            raise FileExistsError(
                f"{target} exists and holds files the synthetic generator did not write "
                f"({sorted(foreign)[:5]}); move it away or choose another root"
            )
    try:
        with fileio.build_folder(target) as tmp:  # outdated or incomplete: replaced whole
            _build_task(tmp, task, seed, num_cases, size, depth)
    except OSError:
        if _is_complete(target, marker):  # a concurrent call finished first
            return target
        raise
    return target


def make_synthetic(
    root: str, seed: int = 0, num_cases: int = 24, size: int = 64, depth: int = 24
) -> list[str]:
    """Write (or reuse) ``SynthMRI``, ``SynthCT``, ``SynthUS`` under ``root``; return their paths.

    ``size`` is the in-plane size (the 2D ultrasound images are ``size x 1.25*size``),
    ``depth`` the number of slices of the 3D volumes; ``num_cases`` per task.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if size < 16 or depth < 4:
        raise ValueError(f"size must be >= 16 and depth >= 4, got size={size}, depth={depth}")
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    args = (int(seed), int(num_cases), int(size), int(depth))
    return [_make_task(root, task, *args) for task in TASKS]
