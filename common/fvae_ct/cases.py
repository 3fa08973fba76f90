"""Finding the cases of an input: a NIfTI file, a DICOM series folder (or DICOMDIR export), a folder of those, or a
datalist JSON; case names (they name output files) and sizes from headers only."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.dataobj_images import DataobjImage

from . import dicom_index
from .datalist import CASE_SECTIONS, read_datalist
from .dicom_folder import is_dicom_dir
from .errors import InputError

__all__ = [
    "Case",
    "discover_cases",
    "case_name",
    "unique_names",
    "case_voxels",
    "fetch_case",
    "is_nifti",
    "broken_link",
    "NIFTI_SUFFIXES",
]

log = logging.getLogger("fvae_ct")

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Case:
    """One input volume: ``name`` (used for output files), ``path`` (NIfTI file or DICOM folder) and, for a series
    fetched from a PACS, ``source`` (its DICOMweb address, credentials redacted; ``path`` is filled when the case is
    run: :func:`fetch_case`) and ``size`` (its voxel count as estimated before the fetch, for sharding)."""

    name: str
    path: str
    label: str | None = None
    source: str | None = None
    size: int = 0

    @property
    def shown(self) -> str:
        """What tables and failure lists name as the case's input: ``source``, else ``path``."""
        return self.source or self.path


def is_nifti(p: Path) -> bool:
    """Whether ``p`` names a NIfTI file (``.nii`` / ``.nii.gz``, any case)."""
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def case_name(path: str | os.PathLike) -> str:
    """The file or folder name of ``path`` without a NIfTI suffix: ``/d/lung_001.nii.gz`` -> ``lung_001``."""
    name = Path(path).name
    for s in NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _from_datalist(path: Path) -> list[Case]:
    """The cases of a datalist JSON (a list, or a dict's ``testing``/``test``/``validation``/``training``/``data``);
    a missing listed file fails as its case, not the batch."""
    items = read_datalist(path, CASE_SECTIONS, check_files=False)
    cases = []
    for d in items:
        img = d["image"][0] if isinstance(d["image"], list) else d["image"]
        cases.append(Case(case_name(img), str(img), d.get("label")))
    return cases


def broken_link(p: Path) -> str | None:
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


def discover_cases(input_path: str | os.PathLike, fetch: bool = True) -> list[Case]:
    """Cases from a NIfTI file, a DICOM series folder, a folder of NIfTI files / DICOM folders, a datalist JSON, or a
    DICOMweb study / series address (each CT series a case, fetched into a temporary folder now, or with ``fetch``
    false when it is run: :func:`fetch_case`; :mod:`fvae_ct.dicomweb`)."""
    from . import dicomweb

    if dicomweb.is_address(input_path):
        return dicomweb.fetch_cases(input_path) if fetch else dicomweb.find_series(input_path)
    p = Path(input_path)
    datalist = p.suffix.lower() == ".json" and not p.is_dir()
    if not p.exists() and not (datalist and not p.is_symlink()):  # a missing JSON: read_datalist's message
        raise InputError(p, broken_link(p) or "input path does not exist")
    if datalist:
        cases = _from_datalist(p)
    elif p.is_file():
        cases = [Case(case_name(p), str(p))]
    elif is_dicom_dir(p):
        nifti = sorted(e.name for e in p.iterdir() if e.is_file() and is_nifti(e) and not e.name.startswith("."))
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
            elif (e.is_file() and is_nifti(e)) or (e.is_symlink() and not e.exists()):  # broken: fails as a case
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


def fetch_case(case: Case) -> None:
    """Bring a case fetched from a PACS (``source``) into its folder ``path`` if it is not there yet (WADO-RS,
    :func:`fvae_ct.dicomweb.fetch_series`); a local case is left alone."""
    if case.source:
        from .dicomweb import fetch_series

        fetch_series(case)


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
        img = nib.load(str(p))
        assert isinstance(img, DataobjImage)  # an image with a shape (NIfTI, ...)
        return int(np.prod(img.shape))
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
