"""Reading CT (NIfTI files, DICOM series folders) and label maps; voxel-grid helpers.

Loaded volumes are MONAI ``MetaTensor``s ``[1, X, Y, Z]`` (file voxel order, HU float32) whose
``meta["affine"]`` is the RAS affine MONAI derives from the file. Nothing here ever writes to an input.

Also the one import place of the names of :mod:`fvae_ct.cases` (finding cases), :mod:`fvae_ct.dicom_folder`
(checking a DICOM series) and :mod:`fvae_ct.outputs` (writing outputs), re-exported for ``from fvae_ct.io import X``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from nibabel.spatialimages import SpatialImage

from . import dicom_index
from .cases import Case, broken_link, case_name, case_voxels, discover_cases, fetch_case, is_nifti, unique_names
from .dicom_folder import SLICE_GAP_TOLERANCE, _reading_order, _renumbered_copy, dicom_series, is_dicom_dir
from .errors import InputError
from .outputs import (
    OUTPUT_MARK,
    atomic_folder,
    atomic_write,
    clean_temporaries,
    folder_lock,
    is_own_output,
    save_nifti_atomic,
    write_text_atomic,
)

__all__ = [
    # reading (this module)
    "load_ct",
    "read_labels",
    "load_labels",
    "axial_axis",
    "spacing_of",
    # finding cases (fvae_ct.cases)
    "Case",
    "discover_cases",
    "fetch_case",
    "case_name",
    "unique_names",
    "case_voxels",
    # DICOM series folders (fvae_ct.dicom_folder)
    "is_dicom_dir",
    "dicom_series",
    "SLICE_GAP_TOLERANCE",
    # writing outputs (fvae_ct.outputs)
    "atomic_write",
    "atomic_folder",
    "write_text_atomic",
    "save_nifti_atomic",
    "clean_temporaries",
    "folder_lock",
    "is_own_output",
    "OUTPUT_MARK",
]

log = logging.getLogger("fvae_ct")


def _reader_error(reader: str, p: Path) -> Exception | None:
    """The exception MONAI's ``reader`` (class name) alone raises on ``p`` (``None`` if it reads it)."""
    import monai.data

    try:
        r = getattr(monai.data, reader)()
        r.get_data(r.read(str(p)))
    except Exception as e:  # noqa: BLE001 - this is the error to report
        return e
    return None


def _read_image(src: Path, reader: str, p: Path) -> MetaTensor:
    """``src`` read with MONAI's ``reader`` (class name) as float32; errors and reader warnings name ``p``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = LoadImage(reader=reader, image_only=True, dtype=np.float32)(str(src))
            img = MetaTensor(torch.as_tensor(np.asarray(img), dtype=torch.float32), meta=dict(img.meta))
    except Exception as e:  # nibabel/gzip/pydicom errors on truncated or corrupt files
        # LoadImage tried every reader and embeds all their tracebacks: report the chosen reader's own error
        cause = _reader_error(reader, src) or e
        msg = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        raise InputError(p, f"cannot read the image, truncated or corrupt file? ({msg})") from e
    _log_reader_warnings(p, caught)
    return img


def _note(info: dict | None, p: Path, msg: str, loud: bool = True) -> None:
    """Log (and, ``loud``, warn) ``msg`` about ``p``; record it in ``info["warnings"]``."""
    log.warning("%s: %s", p, msg)
    if loud:
        warnings.warn(f"{p}: {msg}", stacklevel=3)
    if info is not None:
        info.setdefault("warnings", []).append(msg)


def _read_series(src: Path, p: Path, info: dict | None) -> MetaTensor:
    """The DICOM series in folder ``src`` (checked by :func:`dicom_series`) as a 3D image; messages name ``p``; a
    one-slice series is a volume of one slice (as a 3D NIfTI of depth 1 is)."""
    reader = "PydicomReader"
    try:
        series = dicom_series(src)
    except InputError as e:
        raise InputError(p, e.problem) from e
    modality = str(series[0][1].get("Modality", "") or "")
    if info is not None:
        info["modality"] = modality or None
    if modality.upper() != "CT":
        _note(
            info,
            p,
            f"DICOM Modality is {modality or '(missing)'}, not CT: it is processed as if it were CT in HU and the "
            "results will not mean much",
        )
    order = _reading_order(series)
    if order is None:
        img = _read_image(src, reader, p)
    else:
        _note(
            info,
            p,
            "InstanceNumbers do not follow the slice positions; slices ordered by position along the normal",
            loud=False,
        )
        with tempfile.TemporaryDirectory(prefix="fvae_dicom_") as tmp:
            img = _read_image(_renumbered_copy(order, Path(tmp)), reader, p)
    if img.ndim == 2:
        img = dicom_index.one_slice(img, series[0][1])
    return img


def load_ct(path: str | os.PathLike, check_hu: bool = True, info: dict | None = None) -> MetaTensor:
    """Load a CT volume as ``MetaTensor [1, X, Y, Z]`` in HU (float32), validated.

    Raises :class:`InputError` naming the file for: a missing path, an unreadable / truncated / corrupt
    file, an unsupported format, a 2D or 4D image, NaN or Inf voxels. Warns loudly (does not guess) when
    the intensities do not look like HU (an MR, or an image normalised to [0, 1]) and when a DICOM series is not
    CT (Modality). The reader's own warnings go to the ``fvae_ct`` log. ``info`` (optional dict) receives
    ``modality`` (DICOM Modality, ``None`` for NIfTI) and ``warnings`` (the messages above, for this file).
    """
    if info is not None:
        info.setdefault("modality", None)
        info.setdefault("warnings", [])
    p = Path(path)
    if not p.exists():
        raise InputError(p, broken_link(p) or "file or folder does not exist")
    multiframe = dicom_index.multiframe_file(p) if not is_nifti(p) else None
    if multiframe is not None:  # Enhanced CT: its frames as a classic series, read and checked like one
        with tempfile.TemporaryDirectory(prefix="fvae_dicom_") as tmp:
            img = _read_series(dicom_index.classic_copy(multiframe, Path(tmp)), p, info)
    elif p.is_dir():
        if not is_dicom_dir(p):
            raise InputError(p, "folder is not a DICOM series (no .dcm files and no DICM preamble)")
        img = _read_series(p, p, info)
    elif is_nifti(p):
        img = _read_image(p, "NibabelReader", p)
    elif p.suffix.lower() == ".dcm":
        raise InputError(p, "a single DICOM file: give the folder of the whole series")
    else:
        raise InputError(p, "unsupported format: give a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[-1] == 1:
        img = img[..., 0]  # type: ignore[assignment]  # indexing a MetaTensor gives a MetaTensor (its __torch_function__)
        shape = tuple(img.shape)
    if len(shape) < 3:
        raise InputError(p, f"a 2D image of shape {shape}: a 3D CT volume is needed")
    if len(shape) > 3:
        raise InputError(p, f"a {len(shape)}D image of shape {shape} (time points or channels): give one 3D volume")
    if min(shape) < 1:
        raise InputError(p, f"empty image of shape {shape}")
    bad = ~torch.isfinite(img)
    if bool(bad.any()):
        raise InputError(p, f"{int(bad.sum())} NaN/Inf voxels; fix or mask them before reconstruction")
    if check_hu:
        lo, hi = float(img.min()), float(img.max())
        q01 = float(torch.quantile(img.flatten()[:: max(1, img.numel() // 1_000_000)], 0.01))
        if hi - lo < 100 or q01 > -300:
            msg = (
                f"intensities in [{lo:.4g}, {hi:.4g}] (1st percentile {q01:.4g}) do not look like CT in HU "
                "(no air near -1000 HU). An MR or a normalised image? It is processed as if it were HU and the "
                "results will not mean much."
            )
            _note(info, p, msg)
    out: MetaTensor = img[None]  # type: ignore[assignment]  # a MetaTensor, as above
    out.meta["filename_or_obj"] = str(p)
    return out


# warnings about this machine, not about the file (MONAI's optional GPU DICOM decoder)
_ENVIRONMENT_WARNINGS = ("nvImageCodec",)


def _log_reader_warnings(p: Path, caught) -> None:
    """The image reader's warnings about ``p`` to the ``fvae_ct`` log (those about the machine at debug level)."""
    for w in caught:
        msg = " ".join(str(w.message).split())
        env = any(k in msg for k in _ENVIRONMENT_WARNINGS)
        log.log(logging.DEBUG if env else logging.WARNING, "%s: reader %s: %s", p, w.category.__name__, msg)


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(integer label map ``[X, Y, Z]`` int32, its affine) of a NIfTI file; a missing, unreadable, non-3D or
    non-integer file is an :class:`InputError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "label map does not exist")
    try:
        img = nib.load(str(p))
        assert isinstance(img, SpatialImage)  # an image with data and an affine (NIfTI, ...)
        lab = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel / gzip errors on truncated or corrupt files
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise InputError(p, f"cannot read the label map, truncated or corrupt file? ({msg})") from e
    if lab.ndim == 4 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if lab.ndim != 3:
        raise InputError(p, f"label map is {lab.ndim}D (shape {lab.shape}), not a 3D volume")
    if not np.isfinite(lab).all():
        raise InputError(p, "label map holds NaN/Inf voxels")
    if not np.allclose(lab, np.round(lab)):
        raise InputError(p, "label map holds non-integer values")
    return np.round(lab).astype(np.int32), np.asarray(img.affine, dtype=np.float64)


def load_labels(path: str | os.PathLike, affine, shape) -> np.ndarray:
    """An integer label map resampled (nearest neighbour, through the two affines) onto a reference grid.

    Label maps written by other tools often store the same grid with flipped axes (the TotalSegmentator
    label map of the sample DICOM series does); mapping world coordinates keeps organs where they are.
    """
    lab, lab_affine = read_labels(path)
    ref = np.asarray(affine, dtype=np.float64)
    if lab.shape == tuple(shape) and np.allclose(lab_affine, ref, atol=1e-3):
        return lab
    from scipy.ndimage import affine_transform

    m = np.linalg.inv(lab_affine) @ ref
    out = affine_transform(lab, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape), order=0, cval=0)
    if not out.any():
        raise InputError(path, "label map does not overlap the image (check both affines)")
    return out


def axial_axis(affine) -> int:
    """Index (0, 1 or 2) of the voxel axis closest to the patient's superior-inferior direction."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    cols = a / np.linalg.norm(a, axis=0, keepdims=True)
    return int(np.argmax(np.abs(cols[2])))


def spacing_of(affine) -> np.ndarray:
    """Voxel spacing (mm) of the three voxel axes from an affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
