"""One DICOM series folder: whether a folder is one, its slices checked and ordered along the slice normal, and
the order MONAI's reader must be given them in. Reads headers only (pixel data: :func:`fvae_ct.io.load_ct`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import dicom_index
from .errors import InputError

__all__ = ["is_dicom_dir", "dicom_series", "SLICE_GAP_TOLERANCE"]


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
