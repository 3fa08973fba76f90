"""Reading CT (NIfTI files, DICOM series folders), finding cases, and writing outputs atomically.

Loaded volumes are MONAI ``MetaTensor``s ``[1, X, Y, Z]`` (file voxel order, HU float32) whose
``meta["affine"]`` is the RAS affine MONAI derives from the file. Nothing here ever writes to an input.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from . import dicom_index
from .errors import InputError

__all__ = [
    "Case",
    "discover_cases",
    "load_ct",
    "save_nifti_atomic",
    "write_text_atomic",
    "atomic_write",
    "is_dicom_dir",
    "axial_axis",
    "spacing_of",
    "case_name",
    "load_labels",
    "read_labels",
    "folder_lock",
    "is_own_output",
    "OUTPUT_MARK",
    "case_voxels",
]

log = logging.getLogger("fvae_ct")

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Case:
    """One input volume: ``name`` (used for output files) and ``path`` (NIfTI file or DICOM folder)."""

    name: str
    path: str
    label: str | None = None


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_dir(p: Path) -> bool:
    """A folder holding ``*.dcm`` files, or files with the DICOM preamble ``DICM`` at byte 128."""
    if not p.is_dir():
        return False
    for f in sorted(p.iterdir())[:20]:
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


#: largest deviation of a slice gap from the series' median gap, as a fraction of it, before the series is refused
SLICE_GAP_TOLERANCE = 0.05


def dicom_series(folder: str | os.PathLike) -> list[tuple[Path, Any]]:
    """``(file, header)`` of the one DICOM series in ``folder``, ordered by position along the slice normal (the
    headers are read once, without pixel data).

    Refuses (:class:`InputError` naming the folder) what MONAI's reader would silently get wrong: several series in
    one folder (listed: UID, description, slice count; never merged), slices of different sizes, pixel spacings
    (relative difference over 1e-3) or orientations, slices at one position twice, gaps or
    non-uniform spacing (deviation over :data:`SLICE_GAP_TOLERANCE` of the median gap, the gap listed), and
    gantry tilt (the slice positions do not advance along the normal of ImageOrientationPatient). Hidden files and
    non-DICOM files are ignored.
    """
    import pydicom

    p = Path(folder)
    headers = []
    entries = [f for f in sorted(p.iterdir()) if not f.name.startswith(".")]
    # a slice behind a broken link (an unmounted share) would otherwise be left out without a word
    broken = [f"{f.name} -> {os.readlink(f)}" for f in entries if f.is_symlink() and not f.exists()]
    if broken:
        raise InputError(
            p,
            f"{len(broken)} broken or looping symbolic link(s) among the files ({', '.join(broken[:3])}"
            + (", ..." if len(broken) > 3 else "")
            + "): slices may be missing (an unmounted share?)",
        )
    for f in entries:
        if f.is_file():
            try:
                headers.append((f, pydicom.dcmread(str(f), stop_before_pixels=True)))
            except Exception:  # noqa: BLE001 - not a DICOM file: not part of the series
                continue
    if not headers:
        raise InputError(p, "folder holds no readable DICOM files")
    images = dicom_index.split_images(p, headers)  # DICOMDIR, presentation states, reports: left out (logged)
    if not images:
        raise InputError(p, dicom_index.no_images_problem(p, headers))
    multi = [f.name for f, ds in images if dicom_index.frames(ds) > 1]
    if multi:
        raise InputError(p, f"multi-frame DICOM file(s) among the images ({', '.join(multi[:3])}): give one per folder")
    headers = images
    series: dict[str, list] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        listing = "; ".join(
            f"{uid or '(no UID)'} '{items[0][1].get('SeriesDescription', '')}' {len(items)} slices"
            for uid, items in series.items()
        )
        raise InputError(p, f"{len(series)} DICOM series in one folder ({listing}): put each series in its own folder")
    items = next(iter(series.values()))
    dicom_index.check_decoder(p, items[0][1])
    lacking = [f.name for f, ds in items if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds]
    if lacking:
        raise InputError(
            p,
            f"{len(lacking)} of {len(items)} slice(s) without ImagePositionPatient / ImageOrientationPatient ("
            + ", ".join(lacking[:5])
            + (", ..." if len(lacking) > 5 else "")
            + "): their place in the volume is unknown",
        )
    iop = np.asarray(items[0][1].ImageOrientationPatient, dtype=float)
    pos = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in items])
    first, ref = items[0]
    for f, ds in items[1:]:  # MONAI's reader stacks whatever it gets (mixed spacings with only a warning)
        if (ds.get("Rows"), ds.get("Columns")) != (ref.get("Rows"), ref.get("Columns")):
            raise InputError(
                p,
                f"slices of different sizes ({first.name}: {ref.get('Rows')}x{ref.get('Columns')}, {f.name}: "
                f"{ds.get('Rows')}x{ds.get('Columns')})",
            )
        a, b = ref.get("PixelSpacing"), ds.get("PixelSpacing")
        if (a is None) != (b is None) or (a is not None and not np.allclose(a, b, rtol=1e-3)):
            raise InputError(p, f"slices with different pixel spacing ({first.name}: {a}, {f.name}: {b})")
        if not np.allclose(np.asarray(ds.get("ImageOrientationPatient", iop), dtype=float), iop, atol=1e-4):
            raise InputError(p, f"slices with different orientations ({first.name}, {f.name})")
    normal = np.cross(iop[:3], iop[3:])
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    items, pos, proj = [items[i] for i in order], pos[order], proj[order]
    if len(items) > 1:
        steps = np.diff(proj)
        if np.any(steps < 1e-3):
            i = int(np.argmin(steps))
            raise InputError(p, f"two slices at one position ({items[i][0].name}, {items[i + 1][0].name})")
        med = float(np.median(steps))
        bad = np.abs(steps - med) > SLICE_GAP_TOLERANCE * med
        if np.any(bad):
            i = int(np.argmax(np.abs(steps - med)))
            raise InputError(
                p,
                f"non-uniform slice spacing: {steps[i]:.3g} mm between {items[i][0].name} and {items[i + 1][0].name}, "
                f"median {med:.3g} mm (a missing slice?); the series is not resampled: complete it or resample it",
            )
        drift = pos[-1] - pos[0] - (proj[-1] - proj[0]) * normal
        tilt = np.degrees(np.arctan2(np.linalg.norm(drift), proj[-1] - proj[0]))
        if tilt > 0.5:
            raise InputError(
                p,
                f"gantry tilt of {tilt:.1f} degrees (slices shift in-plane along the normal): the volume is sheared; "
                "resample it to an orthogonal grid first (e.g. dcm2niix corrects tilt)",
            )
    return items


def _reading_order(series: list[tuple[Path, Any]]) -> list[Path] | None:
    """``None`` when MONAI's reader, which orders slices by InstanceNumber, gets the ``(file, header)`` series of
    :func:`dicom_series` right (the numbers follow the position order up or down); else its files in the position
    order the numbers mostly follow (the series should then be read in that order)."""
    files = [f for f, _ in series]
    numbers = [ds.get("InstanceNumber") for _, ds in series]
    if all(n is not None for n in numbers) and len({int(n) for n in numbers}) == len(numbers):
        numbers = [int(n) for n in numbers]
        if numbers == sorted(numbers) or numbers == sorted(numbers, reverse=True):
            return None
        rank = np.argsort(np.argsort(numbers))
        if np.corrcoef(rank, np.arange(len(files)))[0, 1] < 0:
            return files[::-1]
    return files


def _renumbered_copy(files: list[Path], dest: Path) -> Path:
    """Copies of ``files`` in ``dest`` with InstanceNumber = 1, 2, ... in the given (position) order."""
    import pydicom

    for i, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        ds.InstanceNumber = i + 1
        ds.save_as(str(dest / f"{i:05d}.dcm"))
    return dest


def case_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for s in NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _from_datalist(path: Path) -> list[Case]:
    """The cases of a datalist JSON (a list, or a dict's ``testing``/``test``/``validation``/``training``/``data``);
    a missing listed file fails as its case, not the batch."""
    from .datalist import read_datalist

    items = read_datalist(path, ("testing", "test", "validation", "training", "data"), check_files=False)
    cases = []
    for d in items:
        img = d["image"][0] if isinstance(d["image"], list) else d["image"]
        cases.append(Case(case_name(img), str(img), d.get("label")))
    return cases


def _broken_link(p: Path) -> str | None:
    """Why the symbolic link ``p`` leads nowhere (``None`` when ``p`` is not one)."""
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
    return f"broken symbolic link to {os.readlink(p)} (the target does not exist; an unmounted share?)"


def _dicom_cases(p: Path) -> list[Case]:
    """One case for a DICOM series folder; one per CT series for a DICOMDIR export (CD/DVD)."""
    series = dicom_index.dicomdir_series(p)
    return [Case(n, str(f)) for n, f in series] if series else [Case(p.name, str(p))]


def discover_cases(input_path: str | os.PathLike) -> list[Case]:
    """Cases from a NIfTI file, a DICOM series folder, a folder of NIfTI files / DICOM folders, or a datalist JSON."""
    p = Path(input_path)
    if not p.exists():
        raise InputError(p, _broken_link(p) or "input path does not exist")
    if p.is_file():
        if p.suffix.lower() == ".json":
            cases = _from_datalist(p)
        else:
            cases = [Case(case_name(p), str(p))]
    elif is_dicom_dir(p):
        nifti = sorted(e.name for e in p.iterdir() if e.is_file() and _is_nifti(e) and not e.name.startswith("."))
        if nifti:  # read as a series, the NIfTI files would be left out
            raise InputError(
                p,
                f"folder mixes DICOM files with {len(nifti)} NIfTI file(s) ({', '.join(nifti[:3])}"
                + (", ..." if len(nifti) > 3 else "")
                + "): put each DICOM series in a folder of its own",
            )
        cases = _dicom_cases(p)
    else:
        # hidden entries are never cases: macOS "._x.nii.gz" resource forks, our own ".x.<random>.tmp.nii.gz" files
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
        cases, left = [], []
        for e in entries:
            if is_dicom_dir(e):
                cases += _dicom_cases(e)
            elif (e.is_file() and _is_nifti(e)) or (e.is_symlink() and not e.exists()):  # broken: fails as a case
                cases.append(Case(case_name(e), str(e)))
            else:
                left.append(e.name + ("/" if e.is_dir() else ""))
        if left:
            log.warning(
                "%s: %d entr%s neither NIfTI files nor DICOM series folders, left out: %s",
                p,
                len(left),
                "y" if len(left) == 1 else "ies",
                ", ".join(left[:5]) + (", ..." if len(left) > 5 else ""),
            )
        if not cases:
            raise InputError(
                p, "folder holds no NIfTI files (.nii/.nii.gz), no DICOM files and no DICOM series folders"
            )
    return unique_names(cases)


def case_voxels(path: str | os.PathLike) -> int:
    """Voxel count of a NIfTI file or DICOM series folder from its header(s) only (no pixel data); 0 when it
    cannot be read (the case then fails with the reader's error when it is processed)."""
    p = Path(path)
    try:
        if p.is_dir():
            import pydicom

            files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
            for f in files:
                try:
                    h = pydicom.dcmread(f, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - not a DICOM file: try the next
                    continue
                return int(h.Rows) * int(h.Columns) * len(files)
            return 0
        return int(np.prod(nib.load(str(p)).shape))
    except Exception:  # noqa: BLE001 - unreadable: size unknown
        return 0


def unique_names(cases: list[Case]) -> list[Case]:
    """Make case names unique (they name output files): a repeated name gets ``_1``, ``_2``, ..."""
    seen: dict[str, int] = {}
    for c in cases:
        if c.name in seen:
            seen[c.name] += 1
            c.name = f"{c.name}_{seen[c.name]}"
        else:
            seen[c.name] = 0
    return cases


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
        raise InputError(p, _broken_link(p) or "file or folder does not exist")
    multiframe = dicom_index.multiframe_file(p) if not _is_nifti(p) else None
    if multiframe is not None:  # Enhanced CT: its frames as a classic series, read and checked like one
        with tempfile.TemporaryDirectory(prefix="fvae_dicom_") as tmp:
            img = _read_series(dicom_index.classic_copy(multiframe, Path(tmp)), p, info)
    elif p.is_dir():
        if not is_dicom_dir(p):
            raise InputError(p, "folder is not a DICOM series (no .dcm files and no DICM preamble)")
        img = _read_series(p, p, info)
    elif _is_nifti(p):
        img = _read_image(p, "NibabelReader", p)
    elif p.suffix.lower() == ".dcm":
        raise InputError(p, "a single DICOM file: give the folder of the whole series")
    else:
        raise InputError(p, "unsupported format: give a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[-1] == 1:
        img = img[..., 0]
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
    out = img[None]
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


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*$")


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_write` left in ``folder``
    (``.<name>.<8 random>.tmp<suffixes>``); returns what was removed."""
    removed = []
    if Path(folder).is_dir():
        for f in Path(folder).iterdir():
            if f.is_file() and _TEMPORARY.match(f.name):
                f.unlink()
                removed.append(f)
    return removed


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a temporary ``.<name>.<8 random>.tmp<suffixes>`` beside it,
    which is then renamed over ``path`` (usual permissions); returns ``path``. A failing ``write`` leaves
    ``path`` as it was (the temporary is removed; one left by a kill is what :func:`clean_temporaries` removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_nifti_atomic(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    like: str | os.PathLike | None = None,
    forbid=(),
    description: str | None = None,
) -> Path:
    """Write ``data`` (X, Y, Z) as NIfTI via a temporary file + rename, never over a path in ``forbid``.

    ``like``: a NIfTI whose header (codes, units, description) is reused, with the data type of ``data``; when
    ``data`` lies on its grid, its qform and sform are kept exactly (matrices and codes). ``description``: the
    header's ``descrip`` (at most 79 characters), e.g. :data:`OUTPUT_MARK` to mark our own outputs.
    """
    path = Path(path)
    if any(os.path.realpath(path) == os.path.realpath(f) for f in forbid):  # realpath: a link loop is no error
        raise InputError(path, "refusing to overwrite an input file; choose another output folder")
    header, same_grid = None, False
    if like is not None and _is_nifti(Path(like)):
        ref = nib.load(str(like))
        header = ref.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)
        same_grid = tuple(ref.shape[:3]) == tuple(data.shape[:3]) and np.allclose(ref.affine, affine, atol=1e-5)
        if same_grid and len(ref.shape) == 4 and ref.shape[3] == 1 and data.ndim == 3:
            data = data[..., None]  # keep a singleton 4th dimension of the input
    if description is not None:
        if header is None:
            header = nib.Nifti1Header()
            header.set_data_dtype(data.dtype)
        header["descrip"] = description.encode("utf-8")[:79]
    if same_grid:
        # the input's grid: keep its qform and sform exactly (matrices and codes, also code 0, a qform that differs
        # from the sform, a sheared sform), as nibabel keeps a header it is given without an affine
        img = nib.Nifti1Image(data, None, header=header)
        atomic_write(path, lambda tmp: nib.save(img, tmp))
        return path
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header)
    img.set_sform(
        np.asarray(affine, dtype=np.float64),
        code=int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 1,
    )
    img.set_qform(
        np.asarray(affine, dtype=np.float64),
        code=int(header["qform_code"]) if header is not None and int(header["qform_code"]) > 0 else 1,
    )
    atomic_write(path, lambda tmp: nib.save(img, tmp))
    return path


OUTPUT_MARK = "fvae-ct reconstruction"  # NIfTI descrip of the reconstructions we write


def is_own_output(path: str | os.PathLike) -> bool:
    """Whether the NIfTI at ``path`` is a reconstruction fvae-ct wrote (its header's ``descrip``)."""
    try:
        descrip = bytes(nib.load(str(path)).header["descrip"].item())
    except Exception:  # noqa: BLE001 - unreadable: not something we can call ours
        return False
    return descrip.decode("utf-8", "replace").startswith(OUTPUT_MARK)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str):
    """Hold an exclusive lock on ``folder`` (``<folder>/.fvae.lock``) for the ``with`` block, or refuse at once
    (:class:`InputError` naming the folder and the holder's pid) when another process holds it. The operating
    system releases the lock when its holder dies, even by SIGKILL, so a crashed run never blocks the next. The folder
    is created; one that cannot be written (read-only, no permission) is refused as :class:`InputError`."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock
        log.warning("%s: file locking is not available here; do not run two jobs into this folder", folder)
        yield None
        return
    path = Path(folder) / ".fvae.lock"
    while True:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only folder or file system, a file where a folder should be, no permission
            raise InputError(folder, f"cannot write here (read-only?): {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise InputError(
                folder, f"another run is writing into this output folder ({holder}); wait for it or use another folder"
            ) from None
        try:  # the file we locked may have been unlinked by a holder that just finished: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what}, pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)

    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, w)
    return path
