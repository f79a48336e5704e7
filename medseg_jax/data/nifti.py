"""Reading one case's NIfTI files: checked, reoriented to RAS+, and mapped back.

``load_case`` reads the image channels and the label of a ``decathlon.CaseRef``,
reoriented to the closest canonical (RAS+) orientation, and checks them thoroughly
(geometry, finiteness in float32, label values): every problem is a ValueError naming
the file. ``load_header`` refuses, before any data is read, a header whose affine is
not finite or not invertible and a file too small for the data its header declares;
``header_geometry`` gives a case's shape and voxel size from the header alone.
``write_nifti`` writes the converters' and the synthetic generator's files.
``to_original_orientation`` maps a label map back onto the voxel grid of the file it
came from (predictions are written in the input's geometry).
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import nibabel as nib
import numpy as np
from nibabel import orientations

from medseg_jax.data.decathlon import CaseRef, DatasetInfo


@dataclasses.dataclass
class Case:
    """One loaded case. ``image`` is ``(C, *spatial)``, ``label`` ``spatial``.

    ``affine`` and ``spacing`` describe the arrays as returned (after
    reorientation); ``original_affine`` and ``original_shape`` (spatial shape
    of the file on disk, e.g. ``(X, Y, 1)`` for a 2D image stored as 3D)
    describe the image file, for writing predictions back.
    """

    case_id: str
    task: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, ...]
    modalities: tuple[str, ...]
    image_path: str = ""  # the (first) image file, named by later errors


# Deflate compresses at most about 1032:1, so a .nii.gz cannot hold more than this many
# times its own size: a header declaring more is refused before anything is allocated.
GZIP_MAX_RATIO = 1032


def load_header(path: str) -> nib.Nifti1Image:
    """The NIfTI image at ``path``, header read, data not yet (a ValueError naming the file
    if it is missing, unreadable or not NIfTI, if its affine is not finite or not
    invertible, or if the file is too small to hold the data its header declares)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"{path}: cannot read NIfTI header ({_reason(e)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{path}: not a NIfTI image ({type(img).__name__})")
    _check_affine(img, path)
    _check_declared_size(img, path)
    return img


def _check_affine(img: nib.Nifti1Image, path: str, axes: int | None = None) -> None:
    """The voxel-to-world affine must be finite, and invertible on the image's ``axes``
    (default: the two in-plane ones of an image of one slice, else three): else grids
    cannot be compared or reoriented."""
    affine = np.asarray(img.affine, dtype=np.float64)
    rows = np.array2string(affine[:3], separator=", ", max_line_width=10_000).replace("\n", "")
    if not np.isfinite(affine).all():
        raise ValueError(f"{path}: the header's affine (sform/qform) holds NaN or inf: "
                         f"{rows}; fix the file's geometry")
    shape = img.shape
    axes = axes or (2 if len(shape) == 2 or shape[2] == 1 else 3)
    sv = np.linalg.svd(affine[:3, :axes], compute_uv=False)
    if not sv[-1] > 1e-6 * sv[0]:
        raise ValueError(f"{path}: the header's affine (sform/qform) is not invertible "
                         f"(voxel axes of zero length or parallel): {rows}; fix the file's "
                         "geometry")


def declared_bytes(img: nib.Nifti1Image) -> int:
    """The bytes of data the header declares (shape x bytes per voxel)."""
    return int(np.prod(img.shape, dtype=np.float64)) * img.get_data_dtype().itemsize


def _check_declared_size(img: nib.Nifti1Image, path: str) -> None:
    """A file smaller than the data its header declares is refused before any array is
    allocated (a .nii holds vox_offset + data bytes; a .nii.gz at most GZIP_MAX_RATIO
    times its size)."""
    need = declared_bytes(img) + int(getattr(img.dataobj, "offset", 0))
    size = os.path.getsize(path)
    gz = path.endswith(".gz")
    if need <= (size * GZIP_MAX_RATIO if gz else size) or not path.endswith((".gz", ".nii")):
        return
    holds = (f"a {size}-byte gzip file holds at most {size * GZIP_MAX_RATIO / 2**30:.3g} GiB"
             if gz else f"the file has {size} bytes")
    raise ValueError(f"{path}: header declares shape {tuple(img.shape)} of "
                     f"{img.get_data_dtype()} ({need / 2**30:.3g} GiB) but {holds}: the "
                     "header or the file is damaged; replace the file")


def _read_array(img: nib.Nifti1Image, path: str) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError, ...
        raise ValueError(f"{path}: cannot read NIfTI data ({_reason(e)})") from e


def _reason(e: Exception) -> str:
    """A library's error on one line (nibabel's may span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _in_plane_ornt(affine: np.ndarray) -> np.ndarray:
    """Reorientation of a 2D image (as X, Y, 1) that keeps the singleton axis last.

    The two in-plane axes are flipped / swapped so that they point along
    increasing world axes, in world-axis order, like ``as_closest_canonical``.
    """
    ornt = orientations.io_orientation(affine)
    world = ornt[:2, 0]
    order = np.argsort(world)  # rank of each in-plane axis
    rank = np.empty(2, dtype=float)
    rank[order] = [0, 1]
    return np.array([[rank[0], ornt[0, 1]], [rank[1], ornt[1, 1]], [2, 1]], dtype=float)


def _reorient(
    img: nib.Nifti1Image, data: np.ndarray, is_2d: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``data`` (spatial axes first) to closest canonical; return data, affine."""
    if not is_2d:
        canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
        return np.asanyarray(canonical.dataobj), canonical.affine
    flat = data.ndim == 2
    data3 = data[:, :, None] if flat else data
    ornt = _in_plane_ornt(img.affine)
    out = orientations.apply_orientation(data3, ornt)
    affine = img.affine @ orientations.inv_ornt_aff(ornt, data3.shape[:3])
    return (out[:, :, 0] if flat else out), affine


def _spatial(data: np.ndarray, path: str, is_2d: bool, channels: bool) -> np.ndarray:
    """Bring ``data`` to ``(X, Y[, Z])`` or ``(X, Y[, Z], C)`` with ``C`` only when ``channels``."""
    shape = data.shape
    if is_2d:
        if data.ndim == 2:
            return data[..., None] if channels else data
        if data.ndim == 3 and shape[2] == 1:
            return data[:, :, 0][..., None] if channels else data[:, :, 0]
        if channels and data.ndim == 4 and shape[2] == 1:
            return data[:, :, 0, :]
        if channels and data.ndim == 3:
            return data  # (X, Y, C)
        raise ValueError(
            f"{path}: shape {shape} is not a 2D image (expected (X, Y) or (X, Y, 1))"
        )
    if data.ndim == 3:
        return data[..., None] if channels else data
    if data.ndim == 4 and (channels or shape[3] == 1):
        return data if channels else data[..., 0]
    raise ValueError(f"{path}: shape {shape} is not a 3D {'image' if channels else 'label map'}")


def _file_is_2d(img: nib.Nifti1Image, info: DatasetInfo) -> bool:
    shape = img.shape
    return len(shape) == 2 or (info.tensor_dims == 2 and len(shape) >= 3 and shape[2] == 1)


def _voxel_sizes(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    return tuple(float(v) for v in np.sqrt((affine[:3, :ndim] ** 2).sum(axis=0)))


def _check_same_grid(
    path_a: str, shape_a: tuple[int, ...], aff_a: np.ndarray,
    path_b: str, shape_b: tuple[int, ...], aff_b: np.ndarray, what: str,
) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(
            f"{what} spatial shapes differ: {path_a} has {tuple(shape_a)}, "
            f"{path_b} has {tuple(shape_b)}"
        )
    tol = 1e-3 * max(_voxel_sizes(aff_a, 3))
    diff = float(np.max(np.abs(aff_a - aff_b)))
    if not diff <= tol:  # NaN differs too
        raise ValueError(
            f"{what} affines differ by {diff:.4g} (> {tol:.3g}): {path_a} has "
            f"{np.round(aff_a[:3], 4).tolist()}, {path_b} has {np.round(aff_b[:3], 4).tolist()}"
        )


def _label_values(label: np.ndarray) -> np.ndarray:
    """Distinct values of an integer array (bincount when the range is small)."""
    lo, hi = int(label.min()), int(label.max())
    if hi - lo < 1 << 16:
        counts = np.bincount((label.ravel().astype(np.int64) - lo))
        return np.nonzero(counts)[0] + lo
    return np.unique(label)


def _to_uint8_label(data: np.ndarray, path: str, labels: dict[int, str]) -> np.ndarray:
    if data.size == 0:
        raise ValueError(f"{path}: empty label map")
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            raise ValueError(f"{path}: label map holds {int((~finite).sum())} NaN/inf voxels")
        rounded = np.rint(data)
        frac = rounded != data
        if frac.any():
            examples = np.unique(data[frac])[:5].tolist()
            raise ValueError(f"{path}: label map holds non-integer values, e.g. {examples}")
        data = rounded.astype(np.int64)
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise ValueError(f"{path}: label map has unsupported dtype {data.dtype}")
    values = _label_values(data)
    undeclared = sorted(set(values.tolist()) - set(labels))
    if undeclared:
        raise ValueError(
            f"{path}: label values {undeclared[:10]} are not declared in dataset.json "
            f"'labels' {sorted(labels)}"
        )
    return data.astype(np.uint8)


def load_case(ref: CaseRef, info: DatasetInfo, canonical: bool = True) -> Case:
    """Load and check one case; with ``canonical`` reorient to closest RAS+."""
    n_mod = len(info.modalities)
    channels: list[np.ndarray] = []
    ref_path, ref_shape, ref_is_2d = "", (), False
    ref_affine: np.ndarray | None = None
    original_affine: np.ndarray | None = None
    original_shape: tuple[int, ...] = ()
    for path in ref.image_paths:
        img = load_header(path)
        is_2d = _file_is_2d(img, info)
        if not is_2d:  # one slice of a 3D data set: reoriented in 3D
            _check_affine(img, path, axes=3)
        data = _spatial(_read_array(img, path), path, is_2d, channels=True)
        if len(ref.image_paths) > 1 and data.shape[-1] != 1:
            raise ValueError(f"{path}: channel file holds {data.shape[-1]} channels, expected 1")
        if np.issubdtype(data.dtype, np.floating):
            bad = ~np.isfinite(data)
            if bad.any():
                raise ValueError(
                    f"{path}: image holds {int(bad.sum())} non-finite (NaN/inf) voxels"
                )
        elif not (np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_):
            raise ValueError(f"{path}: unsupported image dtype {data.dtype}")
        wide = np.issubdtype(data.dtype, np.floating) and data.dtype.itemsize > 4
        largest = max(float(data.max()), -float(data.min())) if wide and data.size else 0.0
        if largest > float(np.finfo(np.float32).max):
            raise ValueError(f"{path}: intensities up to {largest:.3g} ({data.dtype}) exceed "
                             "the float32 range (3.4e38) the pipeline computes in; rescale "
                             "the image")
        data = data.astype(np.float32, copy=False)
        if original_affine is None:
            original_affine = img.affine.copy()
            original_shape = tuple(int(s) for s in img.shape[: 2 if len(img.shape) == 2 else 3])
        affine = img.affine
        if canonical:
            data, affine = _reorient(img, data, is_2d)
        if ref_affine is None:
            ref_path, ref_shape, ref_affine, ref_is_2d = path, data.shape[:-1], affine, is_2d
        else:
            if is_2d != ref_is_2d:
                raise ValueError(f"{path}: channel files mix 2D and 3D images ({ref_path})")
            _check_same_grid(
                ref_path, ref_shape, ref_affine, path, data.shape[:-1], affine, "channel"
            )
        channels.extend(np.moveaxis(data, -1, 0))
    if len(channels) != n_mod:
        raise ValueError(
            f"{ref.image_paths[0]}: image holds {len(channels)} channel(s) but dataset.json "
            f"declares {n_mod} modalities {info.modalities}"
        )
    image = np.ascontiguousarray(np.stack(channels).astype(np.float32, copy=False))
    assert ref_affine is not None and original_affine is not None
    label = None
    if ref.label_path is not None:
        limg = load_header(ref.label_path)
        lpath = ref.label_path
        lshape = limg.shape
        lis_2d = ref_is_2d and (len(lshape) == 2 or (len(lshape) == 3 and lshape[2] == 1))
        if not lis_2d:
            _check_affine(limg, lpath, axes=3)
        ldata = _spatial(_read_array(limg, lpath), lpath, lis_2d, channels=False)
        ldata = _to_uint8_label(ldata, lpath, info.labels)
        laffine = limg.affine
        if canonical:
            ldata, laffine = _reorient(limg, ldata, lis_2d)
        _check_same_grid(
            ref_path, ref_shape, ref_affine, lpath, ldata.shape, laffine, "image/label"
        )
        label = np.ascontiguousarray(ldata)
    spacing = _voxel_sizes(ref_affine, image.ndim - 1)
    return Case(
        case_id=ref.case_id,
        task=ref.task,
        image=image,
        label=label,
        spacing=spacing,
        affine=np.asarray(ref_affine, dtype=np.float64),
        original_affine=np.asarray(original_affine, dtype=np.float64),
        original_shape=original_shape,
        modalities=info.modalities,
        image_path=ref.image_paths[0],
    )


def to_original_orientation(array: np.ndarray, case: Case) -> np.ndarray:
    """Map a label map on ``case``'s (reoriented) grid back to the file's voxel grid.

    Returns an array of shape ``case.original_shape``; write it with
    ``case.original_affine`` to get a mask in the original geometry.
    """
    array = np.asarray(array)
    spatial = case.image.shape[1:]
    if array.shape != spatial:
        raise ValueError(
            f"array shape {array.shape} does not match case {case.case_id} grid {spatial}"
        )
    arr3 = array[..., None] if array.ndim == 2 else array
    transform = orientations.ornt_transform(
        orientations.io_orientation(case.affine), orientations.io_orientation(case.original_affine)
    )
    out = orientations.apply_orientation(arr3, transform)
    return np.ascontiguousarray(out.reshape(case.original_shape))


def canonical_spacing(path: str) -> tuple[float, ...]:
    """Voxel size (mm) of a NIfTI file along the RAS axes, from its header only."""
    img = load_header(path)
    zooms = img.header.get_zooms()[:3]
    ornt = nib.io_orientation(img.affine)
    spacing = [0.0] * len(zooms)
    for axis, (target, _) in enumerate(ornt[: len(zooms)]):
        spacing[int(target)] = float(zooms[axis])
    return tuple(spacing)


def header_geometry(path: str, info: DatasetInfo) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(spatial shape, voxel size in mm) of an image file as ``load_case`` returns its
    arrays (reoriented), from the header only: nothing is read or allocated."""
    img = load_header(path)
    is_2d = _file_is_2d(img, info)
    ndim = 2 if is_2d else 3
    if len(img.shape) < ndim:
        raise ValueError(f"{path}: shape {img.shape} is not a {ndim}D image")
    ornt = _in_plane_ornt(img.affine) if is_2d else orientations.io_orientation(img.affine)
    sizes = _voxel_sizes(img.affine, ndim)
    shape, spacing = [0] * ndim, [0.0] * ndim
    for axis in range(ndim):
        target = int(ornt[axis, 0]) if np.isfinite(ornt[axis, 0]) else axis
        shape[target], spacing[target] = int(img.shape[axis]), sizes[axis]
    return tuple(shape), tuple(spacing)


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray, descrip: bytes,
                compresslevel: int = 6) -> None:
    """``data`` unscaled in its own dtype, ``affine`` as qform and sform, units mm, gzip
    mtime 0: the same array and affine give the same bytes (reproducible conversions)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = descrip
    with open(path, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0))
