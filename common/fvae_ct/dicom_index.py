"""DICOM beyond a plain folder of slices: non-image objects (DICOMDIR, presentation states, reports) left out,
DICOMDIR exports followed to their CT series, Enhanced (multi-frame) CT rewritten as a classic series, missing
pixel-data decoders named, one-slice series given their slice thickness."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

log = logging.getLogger("fvae_ct")

#: SOP classes that hold no image even when they carry Rows / Columns (e.g. a DICOMDIR, raw data, encapsulated PDF)
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data Storage
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def sop_class(ds) -> str:
    return str(ds.get("SOPClassUID", "") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID", "") or "")


def is_image(ds) -> bool:
    """Whether a header (read without pixel data) is an image: it has Rows / Columns and is not a directory, a
    presentation state, a structured report or another non-image SOP class."""
    return "Rows" in ds and "Columns" in ds and sop_class(ds) not in NON_IMAGE_SOP_CLASSES


def frames(ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def split_images(folder: Path, headers: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """The image headers of ``headers``; the others (DICOMDIR, presentation states, reports, ...) are named in one
    warning line of the ``fvae_ct`` log."""
    images = [(f, ds) for f, ds in headers if is_image(ds)]
    ignored = [(f, ds) for f, ds in headers if not is_image(ds)]
    if ignored and images:
        names = ", ".join(f"{f.name} ({_sop_name(ds)})" for f, ds in ignored[:5]) + (
            ", ..." if len(ignored) > 5 else ""
        )
        log.warning("%s: ignored %d non-image DICOM file(s): %s", folder, len(ignored), names)
    return images


def _sop_name(ds) -> str:
    from pydicom.uid import UID

    uid = sop_class(ds)
    return UID(uid).name if uid else "no SOP class"


def check_decoder(p: Path, ds) -> None:
    """Refuse (naming the missing packages) a series whose transfer syntax no installed pixel-data decoder reads."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = ds.get("file_meta", {}).get("TransferSyntaxUID")
    if not ts:
        return
    ts = UID(ts)
    try:
        dec = get_decoder(ts)
    except NotImplementedError:
        raise InputError(p, f"pixel data in transfer syntax {ts} ({ts.name}): no decoder for it exists") from None
    if dec.is_available:
        return
    missing = dec.missing_dependencies
    pkgs = re.split(r"\s+and\s+", missing[0].split(" - requires ", 1)[-1]) if missing else []
    pkgs = [{"gdcm": "python-gdcm"}.get(n, n) for n in (re.sub(r"[<>=!~].*", "", x).strip() for x in pkgs) if n]
    raise InputError(
        p,
        f"{ts.name} pixel data (transfer syntax {ts}) needs a decoder that is not installed: "
        + "; or ".join(missing)
        + (f" (pip install {' '.join(pkgs)})" if pkgs else ""),
    )


def one_slice(img, ds):
    """A one-slice series (MONAI reads it as 2D) as a 3D ``[X, Y, 1]`` volume, the slice thickness as its third
    spacing (SpacingBetweenSlices, else SliceThickness, else 1 mm) along the slice normal (RAS)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:]) * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    dz = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    out = img[..., None]
    aff = np.asarray(img.affine, dtype=np.float64).copy()
    aff[:3, 2] = normal * dz
    out.affine = aff
    return out


# ---- Enhanced (multi-frame) CT ---------------------------------------------------------------------------------
def multiframe_file(p: Path) -> Path | None:
    """The multi-frame image file ``p`` is (a file) or holds (a folder whose only image is one), else ``None``."""
    import pydicom

    if p.is_file():
        cands = [p]
    elif p.is_dir():
        cands = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
        if len(cands) > 8:  # a classic series
            return None
    else:
        return None
    images = []
    for f in cands:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if is_image(ds):
            images.append((f, ds))
    if len(images) == 1 and (frames(images[0][1]) > 1 or sop_class(images[0][1]) == ENHANCED_CT):
        return images[0][0]
    return None


def _group(per, shared, i: int, name: str):
    for g in (per[i] if per is not None and i < len(per) else None, shared):
        seq = g.get(name) if g is not None else None
        if seq:
            return seq[0]
    return None


def classic_copy(src: Path, dest: Path) -> Path:
    """The frames of the multi-frame (Enhanced CT) file ``src`` as a classic single-frame series in ``dest``
    (``frame_0001.dcm``, ...), geometry and rescale from the functional groups (per frame over shared)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    hdr = pydicom.dcmread(str(src), stop_before_pixels=True)
    check_decoder(src, hdr)
    ds = pydicom.dcmread(str(src))
    n = frames(ds)
    shared = ds["SharedFunctionalGroupsSequence"][0] if "SharedFunctionalGroupsSequence" in ds else None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and len(per) != n:
        raise InputError(src, f"{len(per)} per-frame functional groups for {n} frames")
    pix = np.asarray(ds.pixel_array).reshape(n, int(ds.Rows), int(ds.Columns))
    uid = ds.get("SeriesInstanceUID") or generate_uid()
    for i in range(n):
        pos, ori = _group(per, shared, i, "PlanePositionSequence"), _group(per, shared, i, "PlaneOrientationSequence")
        meas, vt = _group(per, shared, i, "PixelMeasuresSequence"), _group(
            per, shared, i, "PixelValueTransformationSequence"
        )
        lacking = [
            n
            for n, g in (
                ("PlanePositionSequence", pos),
                ("PlaneOrientationSequence", ori),
                ("PixelMeasuresSequence", meas),
            )
            if g is None
        ]
        if lacking:
            raise InputError(
                src,
                f"frame {i + 1} of {n} has no {' / '.join(lacking)} (per-frame or shared functional "
                "groups): its geometry is unknown",
            )
        out = Dataset()
        for e in ds:
            if e.tag.group in (0x0008, 0x0010, 0x0018, 0x0020) and e.VR != "SQ" and e.tag != 0x00200013:
                out.add(e)
        out.SOPClassUID, out.SOPInstanceUID, out.SeriesInstanceUID = _CT_IMAGE, generate_uid(), uid
        out.InstanceNumber = i + 1
        out.ImagePositionPatient = list(pos.ImagePositionPatient)
        out.ImageOrientationPatient = list(ori.ImageOrientationPatient)
        out.PixelSpacing = list(meas.PixelSpacing)
        if meas.get("SliceThickness") is not None:
            out.SliceThickness = meas.SliceThickness
        src_vt = vt if vt is not None else ds
        out.RescaleSlope = src_vt.get("RescaleSlope", 1)
        out.RescaleIntercept = src_vt.get("RescaleIntercept", 0)
        for k in (
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "Rows",
            "Columns",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
        ):
            setattr(out, k, ds.get(k))
        arr = pix[i].astype(np.int16 if int(ds.PixelRepresentation) else np.uint16)
        out.BitsAllocated, out.PixelData = 16, arr.tobytes()
        out.file_meta = FileMetaDataset()
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.file_meta.MediaStorageSOPClassUID, out.file_meta.MediaStorageSOPInstanceUID = (
            UID(_CT_IMAGE),
            out.SOPInstanceUID,
        )
        out.save_as(str(dest / f"frame_{i + 1:04d}.dcm"), enforce_file_format=True)
    return dest


# ---- DICOMDIR exports ------------------------------------------------------------------------------------------
def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_")


def dicomdir_series(root: Path) -> list[tuple[str, Path]] | None:
    """``(case name, folder)`` of each CT image series the ``DICOMDIR`` in ``root`` lists (localizers and other
    modalities left out, named in the log); ``None`` when ``root`` has no readable DICOMDIR listing images.
    Refuses (:class:`InputError`) a series whose files do not lie alone in one folder."""
    import pydicom
    from pydicom.fileset import FileSet

    dd = next((f for f in (root / "DICOMDIR", root / "dicomdir") if f.is_file()), None)
    if dd is None:
        return None
    try:
        fs = FileSet(pydicom.dcmread(str(dd)))
        insts = [i for i in fs if i.node.record_type == "IMAGE" and Path(i.path).is_file()]
    except Exception as e:  # noqa: BLE001 - a foreign or broken DICOMDIR: read the folder as it is
        log.warning(
            "%s: cannot read the DICOMDIR (%s); the folder is read as it is", dd, " ".join(str(e).split())[:200]
        )
        return None
    if not insts:
        return None
    series: dict[str, list] = {}
    for i in insts:
        series.setdefault(str(i.SeriesInstanceUID), []).append(Path(i.path))
    folder_of: dict[Path, set] = {}
    for uid, files in series.items():
        for f in files:
            folder_of.setdefault(f.parent, set()).add(uid)
    found, skipped = [], []
    for uid, files in series.items():
        folders = {f.parent for f in files}
        hdr = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        desc, num = str(hdr.get("SeriesDescription", "") or ""), hdr.get("SeriesNumber")
        rel = os.path.relpath(next(iter(folders)), root)
        what = f"{rel} ({hdr.get('Modality', '?')} '{desc}', {len(files)} images)"
        if str(hdr.get("Modality", "")).upper() != "CT" or "LOCALIZER" in [
            str(t).upper() for t in hdr.get("ImageType", [])
        ]:
            skipped.append(what)
            continue
        if len(folders) != 1 or len(folder_of[next(iter(folders))]) != 1:
            raise InputError(
                root,
                f"DICOMDIR series {uid} '{desc}' is spread over {len(folders)} folder(s) or shares "
                "one with another series: copy each series into its own folder",
            )
        folder = next(iter(folders))
        parts = [root.name] + ([f"S{num}"] if num not in (None, "") else [] if desc else [rel]) + [desc]
        found.append((root.name if folder == root else _safe("_".join(p for p in parts if p)), folder, what))
    if skipped:
        log.warning("%s: DICOMDIR series left out (not CT, or localizers): %s", root, "; ".join(skipped))
    if not found:
        raise InputError(root, f"the DICOMDIR lists no CT image series (only: {'; '.join(skipped)})")
    log.info("%s: DICOMDIR export, %d CT series: %s", root, len(found), "; ".join(w for _, _, w in found))
    return [(n, f) for n, f, _ in found]


def no_images_problem(p: Path, headers: list[tuple[Path, Any]]) -> str:
    """Why a folder holding only non-image DICOM files cannot be read (a DICOMDIR export: its series folders)."""
    if any(sop_class(ds) == "1.2.840.10008.1.3.10" for _, ds in headers):
        try:
            series = dicomdir_series(p) or []
        except InputError as e:
            return f"folder is a DICOMDIR export (CD/DVD) ({e.problem})"
        listing = ", ".join(os.path.relpath(f, p) for _, f in series) or "none listed"
        return (
            f"folder is a DICOMDIR export (CD/DVD), not one series: pass one of its CT series folders ({listing}), "
            "or the export folder as the input of fvae recon, which reads every CT series as one case"
        )
    return (
        "folder holds no DICOM images (only " + ", ".join(f"{f.name}: {_sop_name(ds)}" for f, ds in headers[:3]) + ")"
    )
