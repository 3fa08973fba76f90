"""The reconstruction of a DICOM series written back as DICOM (``output_format: dicom | both``): a new derived series of
the source's study, one CT Image Storage file per source slice, that the project's own reader gives back as exactly the
NIfTI output's voxels and affine.

Per slice: new SOPInstanceUID, one new SeriesInstanceUID for the series, ImageType ``DERIVED\\SECONDARY`` (and the
source's third value, e.g. AXIAL), SeriesNumber = the source's + :data:`SERIES_NUMBER_OFFSET`, SeriesDescription and
DerivationDescription naming the VAE and the bundle, the source slice referenced in Source Image Sequence (purpose
``121322`` "Source image for image processing operation"), the source slice's geometry tags copied unchanged
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, SliceLocation), the patient / study /
acquisition attributes of :data:`COPIED` that the source has (nothing invented; a Type 2 one it lacks is written
empty), General Equipment naming the software that made the series, as the SEG of fvae_aug_seg does (Manufacturer
``fvae-ct``, ManufacturerModelName and SoftwareVersions from ``derived_by``; the scanner's are not copied), int16
pixels stored with the source slice's RescaleSlope / RescaleIntercept, creation dates = now, uncompressed explicit VR
little endian with a file meta header. A source without StudyInstanceUID or
FrameOfReferenceUID (an anonymised export) gets new ones for the derived series, with a warning: it is then not part
of the source's study.

Each voxel slice is matched to its source file by geometry (the source pixel grid through the inverse of the output's
affine), never by list position; a series that does not lie on the output's grid is refused in one line.
"""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, OptionError
from ..io import OUTPUT_MARK, atomic_folder, dicom_series, load_ct

__all__ = [
    "DICOM_SUFFIX",
    "OUTPUT_FORMATS",
    "COPIED",
    "MANUFACTURER",
    "SERIES_NUMBER_OFFSET",
    "check_output_format",
    "write_derived_series",
    "existing_series",
    "is_own_series",
]

#: ``<case><DICOM_SUFFIX>/``: the folder of the derived series, beside ``<case>_recon.nii.gz``
DICOM_SUFFIX = "_recon_dicom"
#: ``nifti`` (default), ``dicom`` (the derived series only; DICOM inputs), ``both``
OUTPUT_FORMATS = ("nifti", "dicom", "both")
#: the derived series' SeriesNumber: the source's plus this (this alone when the source has none)
SERIES_NUMBER_OFFSET = 1000
#: voxels: how far a corner of a source slice's pixel grid may lie from the output's voxel grid
GEOMETRY_TOLERANCE = 0.1
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: the derived series' Manufacturer (General Equipment: the maker of the software that produced it)
MANUFACTURER = "fvae-ct"

#: copied from each source slice when it has them: SOP common, patient, study, series (acquisition side), frame of
#: reference, acquisition and contrast, image plane (the geometry), display (rescale type, window presets); not the
#: General Equipment module, which describes what made the derived series (:data:`MANUFACTURER`)
COPIED = (
    "SpecificCharacterSet",
    *("PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID"),
    *("OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientComments"),
    *("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"),
    *("PatientSpeciesDescription", "PatientSpeciesCodeSequence", "ResponsiblePerson", "ResponsibleOrganization"),
    *("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"),
    *("IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord", "ProcedureCodeSequence"),
    *("PatientAge", "PatientSize", "PatientWeight", "PregnancyStatus", "AdditionalPatientHistory"),
    *("Modality", "Laterality", "PatientPosition", "BodyPartExamined", "ProtocolName", "RequestAttributesSequence"),
    *("FrameOfReferenceUID", "PositionReferenceIndicator"),
    *("AcquisitionNumber", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "KVP"),
    *("DataCollectionDiameter", "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient"),
    *("GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure"),
    *("FilterType", "GeneratorPower", "FocalSpots", "ConvolutionKernel", "RevolutionTime", "SingleCollimationWidth"),
    *("TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor", "CTDIvol"),
    "CTDIPhantomTypeCodeSequence",
    *("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume", "ContrastBolusStartTime"),
    *("ContrastBolusStopTime", "ContrastBolusTotalDose", "ContrastFlowRate", "ContrastFlowDuration"),
    *("ContrastBolusIngredient", "ContrastBolusIngredientConcentration"),
    *("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation"),
    *("RescaleType", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"),
)
# Type 2 attributes of the CT Image IOD's modules above: written empty (unknown) when the source lacks them
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
_TYPE2 += ("ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator")
_TYPE2 += ("KVP", "AcquisitionNumber", "Laterality")  # Laterality: 2C, needed unless the body part is unpaired
# Type 1 UIDs a derived series cannot go without: new ones (with a warning) when an anonymised source lacks them
_NEEDED_UIDS = {
    "StudyInstanceUID": "not in the source's study",
    "FrameOfReferenceUID": "in a frame of reference of its own",
}


def check_output_format(value) -> str:
    """``value`` if it is one of :data:`OUTPUT_FORMATS` (any case), else :class:`OptionError`."""
    v = str(value).strip().lower() if isinstance(value, str) else value
    if v not in OUTPUT_FORMATS:
        raise OptionError(f"output_format {value!r}: give one of {', '.join(OUTPUT_FORMATS)}")
    return v


def _uid(ds, keyword: str, meta_keyword: str) -> str:
    """A UID of the dataset, else of its file meta header (an anonymiser may empty one and keep the other)."""
    v = str(ds.get(keyword, "") or "").strip()
    return v or str(getattr(ds, "file_meta", {}).get(meta_keyword, "") or "").strip()


def _grid(f: Path, ds, shape, inv: np.ndarray) -> tuple[int, tuple[int, int, int, int, int]]:
    """``(k, (slice axis, row axis, column axis, row step, column step))``: where the pixels of source slice ``ds``
    lie on the output's voxel grid (``inv``: the inverse RAS affine); :class:`InputError` naming ``f`` when they do not
    lie on it within :data:`GEOMETRY_TOLERANCE` voxels."""
    if ds.get("PixelSpacing") is None:
        raise InputError(f, "no PixelSpacing: its pixels cannot be placed on the reconstruction's grid")
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns

    def voxel(m, n):  # pixel (row m, column n) -> voxel coordinates (LPS -> RAS -> voxel)
        w = (ipp + n * dc * iop[:3] + m * dr * iop[3:]) * np.array([-1.0, -1.0, 1.0])
        return inv[:3, :3] @ w + inv[:3, 3]

    v0 = voxel(0, 0)
    vc, vr = voxel(0, 1) - v0, voxel(1, 0) - v0
    a, b = int(np.argmax(np.abs(vc))), int(np.argmax(np.abs(vr)))
    s = 3 - a - b
    rows, cols = int(ds.Rows), int(ds.Columns)
    if a == b or (shape[b], shape[a]) != (rows, cols):
        raise InputError(f, f"its {rows}x{cols} pixels do not lie along the reconstruction's {shape} voxel grid")
    sa, sb = (1 if vc[a] > 0 else -1), (1 if vr[b] > 0 else -1)
    k = int(round(v0[s]))
    err = 0.0
    for m, n in ((0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1)):
        ideal = np.zeros(3)
        ideal[s], ideal[a], ideal[b] = k, (0 if sa > 0 else cols - 1) + sa * n, (0 if sb > 0 else rows - 1) + sb * m
        err = max(err, float(np.abs(voxel(m, n) - ideal).max()))
    if err > GEOMETRY_TOLERANCE or not 0 <= k < shape[s]:
        raise InputError(
            f,
            f"does not lie on the reconstruction's voxel grid (slice {v0[s]:.3g} of {shape[s]}, off by {err:.3g} "
            "voxels): geometry does not match, no DICOM series written",
        )
    return k, (s, b, a, sb, sa)


def _pixels(hu: np.ndarray, k: int, axes) -> np.ndarray:
    """Voxel slice ``k`` of ``hu`` as the ``[row, column]`` pixel array of the source slice (see :func:`_grid`)."""
    s, b, a, sb, sa = axes
    sl = np.take(hu, k, axis=s)
    arr = sl if [x for x in range(3) if x != s] == [b, a] else sl.T
    return arr[:: 1 if sb > 0 else -1, :: 1 if sa > 0 else -1]


def _stored(f: Path, ds, hu: np.ndarray) -> np.ndarray:
    """``round((hu - intercept) / slope)`` as int16 with the rescale of source slice ``ds``; :class:`InputError`
    naming ``f`` when that cannot hold ``hu`` exactly (outside int16, or a slope between the values)."""
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    v = np.round((hu.astype(np.float64) - intercept) / slope)
    back = v * slope + intercept
    worst = int(np.argmax(np.abs(back - hu)))
    if v.min() < -32768 or v.max() > 32767 or abs(back.flat[worst] - hu.flat[worst]) > 1e-3:
        bad = (
            hu.flat[worst] if abs(back.flat[worst] - hu.flat[worst]) > 1e-3 else (hu.min() if v.min() < 0 else hu.max())
        )
        raise InputError(
            f,
            f"its RescaleSlope {slope:g} / RescaleIntercept {intercept:g} cannot store the reconstruction's value "
            f"{float(bad):g} HU exactly in int16: no DICOM series written",
        )
    return v.astype(np.int16)


def _now() -> tuple[str, str]:
    t = datetime.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S.%f")


def write_derived_series(
    source, hu: np.ndarray, affine, out, vae: str, derived_by: str, details: str = "", forbid=()
) -> list[str]:
    """Write ``hu`` (``[X, Y, Z]`` integer HU, the NIfTI output's array; ``affine``: its RAS affine) as a derived series
    of the DICOM series folder ``source`` into the folder ``out``, all or nothing (see the module docstring); returns
    the warnings (new study / frame-of-reference UIDs). ``vae``, ``derived_by`` (bundle name and version) and
    ``details`` go into SeriesDescription / DerivationDescription. Never writes over a path of ``forbid`` or a folder
    holding one, nor over an existing ``out`` that is not an earlier derived series of ours."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src, out = Path(source), Path(out)
    if not src.is_dir():
        raise InputError(src, "output_format dicom needs a DICOM series input (a folder of slices)")
    real = os.path.realpath(out)
    for p in (src, *forbid):
        rp = os.path.realpath(p)
        if rp == real or rp.startswith(real + os.sep):
            raise InputError(out, "refusing to write the DICOM output over an input; choose another output folder")
    series = dicom_series(src)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(src, f"a {hu.ndim}D reconstruction cannot be written as a series of its slices")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    slices = []
    for f, ds in series:
        sop_class = _uid(ds, "SOPClassUID", "MediaStorageSOPClassUID")
        if sop_class != CT_IMAGE_STORAGE:
            raise InputError(f, f"SOP Class {sop_class or '(none)'}, not CT Image Storage: no DICOM series written")
        if not _uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID"):
            raise InputError(f, "no SOP Instance UID: the derived series could not reference it")
        k, axes = _grid(f, ds, hu.shape, inv)
        slices.append((k, f, ds, _stored(f, ds, _pixels(hu, k, axes))))
    taken, depth = sorted(k for k, *_ in slices), hu.shape[axes[0]]
    if taken != list(range(depth)):
        raise InputError(src, f"its {len(slices)} slices do not match the reconstruction's {depth} slices one to one")

    notes, uids = [], {}
    for key, what in _NEEDED_UIDS.items():
        if not str(series[0][1].get(key, "") or "").strip():
            uids[key] = generate_uid()
            notes.append(f"the source series has no {key} (anonymised?): the derived series gets a new one ({what})")
    number = series[0][1].get("SeriesNumber")
    series_number = (int(number) if number not in (None, "") else 0) + SERIES_NUMBER_OFFSET
    series_uid = generate_uid()
    day, time = _now()
    description = f"{vae} VAE reconstruction, {derived_by}"[:64]
    model_name = derived_by.split(" ")[0][:64]  # "fvae_recon 0.5.1" -> fvae_recon
    derivation = (
        f"{OUTPUT_MARK} of the source series through the frozen VAE {vae} (encoded and decoded, not fine-tuned) by "
        f"{derived_by}" + (f"; {details}" if details else "")
    )[:1024]

    def write(folder: str) -> None:
        for k, _, s, pixels in sorted(slices, key=lambda t: t[0]):
            ds = Dataset()
            for kw in COPIED:
                if kw in s:
                    ds[kw] = copy.deepcopy(s[kw])
            for kw in _TYPE2:
                if kw not in ds:
                    setattr(ds, kw, None)  # present and empty: unknown
            for kw, uid in uids.items():
                setattr(ds, kw, uid)
            ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, generate_uid()
            ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = day
            ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = time
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
            ds.InstanceNumber = k + 1  # the output's slice order, which the reader then keeps
            source_type = s.get("ImageType") or []
            third = [source_type][2:3] if isinstance(source_type, str) else list(source_type)[2:3]
            ds.ImageType = ["DERIVED", "SECONDARY", *third]
            ds.DerivationDescription = derivation
            ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, model_name
            ds.SoftwareVersions = derived_by[:64]
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            ref.ReferencedSOPInstanceUID = _uid(s, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
            purpose = Dataset()
            purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
            purpose.CodeMeaning = "Source image for image processing operation"
            ref.PurposeOfReferenceCodeSequence = [purpose]
            ds.SourceImageSequence = [ref]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = pixels.shape
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept = s.get("RescaleIntercept") or 0  # the values _stored used
            ds.RescaleSlope = s.get("RescaleSlope") or 1
            ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.save_as(os.path.join(folder, f"{k + 1:05d}.dcm"), enforce_file_format=True)

    atomic_folder(out, write, replace=is_own_series)
    return notes


def is_own_series(folder) -> bool:
    """Whether the folder holds a derived series fvae-ct wrote (DerivationDescription of its first DICOM file)."""
    import pydicom

    for f in sorted(Path(folder).glob("*.dcm"))[:1]:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable: not something we can call ours
            return False
        return str(ds.get("DerivationDescription", "")).startswith(OUTPUT_MARK)
    return False


def existing_series(out, shape, affine) -> tuple[np.ndarray | None, str]:
    """The voxels of the derived series already in ``out`` (int16) if it is ours, reads completely (the project's
    reader) and lies on the grid ``shape`` / ``affine``; else ``(None, why)``."""
    if not is_own_series(out):
        return None, "is not a derived series written by fvae-ct"
    try:
        img = load_ct(out, check_hu=False)
    except InputError as e:
        return None, f"is unreadable ({e.problem})"
    data = np.round(img[0].numpy()).astype(np.int16)
    if data.shape != tuple(shape):
        return None, f"has shape {data.shape}, the input {tuple(shape)}"
    if not np.allclose(np.asarray(img.affine, dtype=np.float64), affine, atol=1e-4):
        return None, "lies on another grid than the input (affines differ)"
    return data, ""
