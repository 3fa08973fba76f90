"""The segmentation as a DICOM Segmentation object (``inference.yaml --output_format dicom_seg | both``).

A label map on the grid of a DICOM series input becomes ``<case>_seg.dcm`` (the NIfTI output's name, ``.dcm``): a
BINARY Segmentation (highdicom) with one segment per non-background class, named by the class and coded
(:func:`segment_codes`), that references every source image, shares the source's study, patient and frame of
reference, and takes its geometry from the source images (highdicom derives the plane positions from them). The
voxels reach the source frames through world coordinates (:func:`frames_on_source`), whatever the label map's
voxel order. highdicom is an optional package, imported only here and only when a SEG is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from ..dicom_folder import dicom_series, is_dicom_dir
from ..dicomweb import store_files, store_target
from ..errors import BatchFailure, InputError, OptionError
from ..outputs import atomic_write

__all__ = [
    "OUTPUT_FORMATS",
    "output_formats",
    "seg_path",
    "source_datasets",
    "check_inputs",
    "segment_codes",
    "frames_on_source",
    "write_dicom_seg",
    "SaveDicomSegd",
    "store_root",
]

log = logging.getLogger("fvae_ct")

NEEDS_SERIES = "output_format dicom_seg needs a DICOM series folder as input (a SEG references the source images)"
#: ``output_format`` values and the outputs each writes
OUTPUT_FORMATS = {"nifti": ("nifti",), "dicom_seg": ("dicom_seg",), "both": ("nifti", "dicom_seg")}


def _highdicom():
    try:
        import highdicom
    except ImportError as e:
        missing = e.name or "highdicom"
        raise OptionError(
            f"output_format dicom_seg needs the package {missing}, which is not installed: pip install highdicom"
        ) from None
    return highdicom


def output_formats(value) -> tuple[str, ...]:
    """The outputs ``output_format`` asks for (``nifti``, ``dicom_seg``); anything else is an :class:`OptionError`, as
    is ``dicom_seg`` without highdicom installed (checked here, before anything runs)."""
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in OUTPUT_FORMATS:
        raise OptionError(f"output_format: expected one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
    if "dicom_seg" in OUTPUT_FORMATS[key]:
        _highdicom()
    return OUTPUT_FORMATS[key]


def store_root(store, outputs: Sequence[str]) -> str | None:
    """``--store``: the DICOMweb root each SEG is sent to (STOW-RS), checked before the run; needs dicom_seg."""
    root = store_target(store)
    if root and "dicom_seg" not in outputs:
        raise OptionError("store: sends the DICOM SEG; set output_format to dicom_seg or both")
    return root


def seg_path(source, output_dir) -> Path:
    """``<output_dir>/<case>_seg.dcm``: the name MONAI's ``SaveImaged`` gives the NIfTI label map (postfix ``seg``,
    no separate folder), with ``.dcm``."""
    from monai.data.utils import create_file_basename

    return Path(create_file_basename("seg", str(source), str(output_dir), "", False, makedirs=False) + ".dcm")


def source_datasets(folder) -> list:
    """The headers (no pixel data) of the DICOM series in ``folder``, ordered along the slice normal
    (:func:`fvae_ct.dicom_folder.dicom_series`, with its checks). An image whose SOPInstanceUID / SOPClassUID is
    empty takes the File Meta's MediaStorageSOPInstanceUID / MediaStorageSOPClassUID, which the standard makes equal
    (in memory; the files are not touched). A series without study, series or frame-of-reference UID is an
    :class:`InputError` naming the folder."""
    datasets = [ds for _, ds in dicom_series(folder)]
    lacking = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID") if not datasets[0].get(k)]
    if lacking:
        raise InputError(
            folder,
            f"the series has no {', '.join(lacking)} (anonymised without new UIDs?): a DICOM SEG must reference its "
            "study, series and frame of reference; give the series with its UIDs or use output_format nifti",
        )
    for ds in datasets:
        meta = getattr(ds, "file_meta", {})
        for own in ("SOPInstanceUID", "SOPClassUID"):
            if not ds.get(own) and meta.get(f"MediaStorage{own}"):
                setattr(ds, own, meta.get(f"MediaStorage{own}"))
        if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID"):
            raise InputError(folder, "images without SOPInstanceUID / SOPClassUID: a DICOM SEG cannot reference them")
    return datasets


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def check_inputs(items: Sequence, outputs: Sequence[str], output_dir) -> list:
    """Before the run, when ``outputs`` holds ``dicom_seg``: every case is a DICOM series folder with its UIDs, and
    its SEG would not land inside it. One bad case is its :class:`InputError`, several a :class:`BatchFailure`
    listing one line each (as :func:`fvae_ct.checked_io.check_items`); returns ``items``."""
    items = list(items)
    if "dicom_seg" not in outputs:
        return items
    errors: list[InputError] = []
    for it in items:
        path = Path(str(it["image"] if isinstance(it, dict) else it))
        try:
            if not is_dicom_dir(path):
                raise InputError(path, NEEDS_SERIES)
            source_datasets(path)
            if _inside(seg_path(path, output_dir), path):
                raise InputError(
                    path,
                    f"output_dir {output_dir} lies in the input series folder: the SEG would "
                    "join the series; choose another output_dir",
                )
        except InputError as e:
            log.error("%s", e)
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        lines = "\n".join(f"  {e}" for e in errors)
        raise BatchFailure(f"{len(errors)} of {len(items)} case(s) cannot have a DICOM SEG (nothing was run):\n{lines}")
    return items


#: words of a class name that make it a morphologically abnormal structure, and its SNOMED CT type
_ABNORMAL = dict(tumour="Neoplasm", tumor="Neoplasm", neoplasm="Neoplasm", cancer="Neoplasm", carcinoma="Neoplasm",
                 lesion="Lesion", mass="Mass", nodule="Nodule", cyst="Cyst")  # fmt: skip
_SIDES = ("left", "right")


def segment_codes(name: str) -> dict[str, Any]:
    """The codes of a class name (``category``, ``type``, ``modifiers``, ``regions``), from DICOM's context groups.

    The name (``liver``, ``urinary_bladder``; ``kidney_left``: Kidney with the laterality modifier Left) as a SNOMED
    CT concept of the anatomic structure (CID 7192), tissue (CID 7166: ``organ``, ``adipose_tissue``) or
    morphologically abnormal structure (CID 7159: ``lesion``, ``cyst``) segmentation types gets that concept under its
    category; a name holding a tumour or lesion word (``pancreas_tumour``) a Neoplasm / Lesion / ... with the organs it
    names as anatomic regions; anything else the generic Tissue / Tissue (the segment label still names the class).
    """
    from pydicom.sr.codedict import codes

    words = re.findall(r"[a-z0-9]+", name.lower())
    rest = [w for w in words if w not in _SIDES]
    sides = [getattr(codes.SCT, w.capitalize()) for w in _SIDES if w in words]
    groups = ((codes.cid7192, codes.SCT.AnatomicalStructure), (codes.cid7166, codes.SCT.Tissue),
              (codes.cid7159, codes.SCT.MorphologicallyAbnormalStructure))  # fmt: skip

    def camel(ws) -> str:
        return "".join(w.capitalize() for w in ws)

    for ws, modifiers in ((words, []), (rest, sides)):
        for group, category in groups:
            if ws and camel(ws) in group:
                return dict(category=category, type=getattr(group, camel(ws)), modifiers=modifiers, regions=[])
    abnormal = [w for w in words if w in _ABNORMAL]
    if abnormal:
        regions = [getattr(codes.cid7192, camel([w])) for w in rest if camel([w]) in codes.cid7192]
        return dict(category=codes.SCT.MorphologicallyAbnormalStructure, type=getattr(codes.SCT, _ABNORMAL[abnormal[0]]),
                    modifiers=[], regions=regions)  # fmt: skip
    return dict(category=codes.SCT.Tissue, type=codes.SCT.Tissue, modifiers=[], regions=[])


def frames_on_source(labels: np.ndarray, affine, datasets: Sequence, where="label map") -> np.ndarray:
    """The label map ``[X, Y, Z]`` (RAS ``affine``, as MONAI reads DICOM) as frames ``[n, Rows, Columns]`` of the
    source images ``datasets``, in their order: each pixel centre (ImagePositionPatient, ImageOrientationPatient,
    PixelSpacing; LPS) taken to a voxel through the affine. A pixel that is no voxel centre of the label map, or lies
    outside it, is an :class:`InputError` naming ``where``: the label map must lie on the series' grid."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    out = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=labels.dtype)
    for k, ds in enumerate(datasets):
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        d_row, d_col = (float(s) for s in ds.PixelSpacing)  # between rows, between columns
        origin = inv[:3, :3] @ (lps_to_ras @ np.asarray(ds.ImagePositionPatient, dtype=np.float64)) + inv[:3, 3]
        step_col = inv[:3, :3] @ (lps_to_ras @ iop[:3]) * d_col  # one column to the right (row direction cosines)
        step_row = inv[:3, :3] @ (lps_to_ras @ iop[3:]) * d_row  # one row down (column direction cosines)
        corners = [origin + i * step_row + j * step_col for i in (0, out.shape[1] - 1) for j in (0, out.shape[2] - 1)]
        if any(
            np.abs(np.asarray(c) - np.round(c)).max() > 1e-2 for c in [origin, origin + step_row, origin + step_col]
        ):
            raise InputError(
                where, f"does not lie on the grid of the DICOM series (slice {k}: voxel {origin.round(3)})"
            )
        if any(np.any(np.round(c) < 0) or np.any(np.round(c) > np.asarray(labels.shape) - 1) for c in corners):
            raise InputError(where, f"shape {labels.shape} does not cover slice {k} of the DICOM series")
        i, j = np.meshgrid(np.arange(out.shape[1]), np.arange(out.shape[2]), indexing="ij")
        idx = np.rint(origin[:, None, None] + step_row[:, None, None] * i + step_col[:, None, None] * j).astype(
            np.int64
        )
        out[k] = labels[idx[0], idx[1], idx[2]]
    return out


def write_dicom_seg(
    labels, affine, series_folder, path, class_names: Sequence[str], algorithm: dict | None = None
) -> Path:
    """Write the label map ``labels`` ``[X, Y, Z]`` (integers 0 .. len(class_names) - 1, on the grid of the DICOM
    series in ``series_folder``, RAS ``affine``) as a DICOM Segmentation at ``path`` (all or nothing).

    Segment ``i`` is class ``i`` (class 0, background, has none), labelled ``class_names[i]`` and coded by
    :func:`segment_codes`, algorithm type AUTOMATIC. ``algorithm``: ``name``, ``version`` and ``parameters`` (a dict of
    strings) of the Algorithm Identification (family: artificial intelligence). The output lands next to no source
    image (refused inside ``series_folder``)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    folder, path = Path(series_folder), Path(path)
    if _inside(path, folder):
        raise InputError(path, f"lies in the input series folder {folder}: the SEG would join the series")
    datasets = source_datasets(folder)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise InputError(path, "label map holds non-integer values")
        labels = labels.astype(np.int64)
    found = np.unique(labels)
    if found.size and (found[0] < 0 or found[-1] >= len(class_names)):
        raise InputError(path, f"label ids {found.tolist()} outside 0..{len(class_names) - 1} (class_names)")
    dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    frames = frames_on_source(labels.astype(dtype), affine, datasets, where=path)
    alg = algorithm or {}
    name, version = str(alg.get("name") or "fvae_aug_seg")[:64], str(alg.get("version") or "unknown")[:64]
    ident = hd.AlgorithmIdentificationSequence(
        name=name,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        source="fvae-ct",
        parameters={str(k): str(v) for k, v in (alg.get("parameters") or {}).items()} or None,
    )
    segments = []
    for number, label in enumerate(class_names[1:], start=1):
        c = segment_codes(str(label))
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(label)[:64],
            segmented_property_category=c["category"],
            segmented_property_type=c["type"],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ident,
            anatomic_regions=c["regions"] or None,
        )
        if c["modifiers"]:  # laterality (CID 244); highdicom takes no modifiers, the attribute is the standard's
            desc.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(m) for m in c["modifiers"]]
        segments.append(desc)
    first = datasets[0]
    series_number = first.get("SeriesNumber")
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=(int(series_number) + 1000) if series_number not in (None, "") else 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fvae-ct",
        manufacturer_model_name="fvae_aug_seg",
        software_versions=f"fvae_aug_seg {version}",
        device_serial_number="none",
        content_label="FVAE_SEG",
        content_description=f"{name} segmentation"[:64],
        series_description=f"SEG {name} {version}"[:64],
    )
    atomic_write(path, lambda tmp: seg.save_as(tmp))
    log.info("%s: DICOM SEG of %d segment(s) on %d source image(s)", path, len(segments), len(datasets))
    return path


def _sha256(path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SaveDicomSegd(MapTransform):
    """Postprocessing step of ``inference.yaml``: the label map under ``keys`` (``[1, X, Y, Z]`` on the input's grid,
    its ``filename_or_obj`` a DICOM series folder) written by :func:`write_dicom_seg` to
    ``<output_dir>/<case>_seg.dcm``. The Algorithm Identification names the bundle (``fvae_aug_seg``) with
    ``bundle_version``, the ``network`` type and the SHA-256 of ``model_file``; the data pass through unchanged.
    ``store``: a DICOMweb root each SEG is then sent to (STOW-RS, :mod:`fvae_ct.dicomweb`)."""

    def __init__(
        self,
        keys,
        output_dir,
        class_names,
        network: str = "segresnet",
        bundle_version: str = "",
        model_file=None,
        allow_missing_keys: bool = False,
        store: str | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.store = store_target(store)
        self.output_dir = str(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.network, self.bundle_version, self.model_file = str(network), str(bundle_version or ""), model_file
        self._algorithm: dict | None = None

    def algorithm(self) -> dict:
        if self._algorithm is None:  # the checkpoint hashed once, on the first case
            params = {"network": self.network, "classes": ",".join(self.class_names)}
            if self.model_file is not None and _sha256(self.model_file):
                params["model"] = f"{Path(self.model_file).name} sha256:{_sha256(self.model_file)}"
            self._algorithm = {
                "name": f"fvae_aug_seg {self.network}",
                "version": self.bundle_version,
                "parameters": params,
            }
        return self._algorithm

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = getattr(img, "meta", {}) or {}
            source = meta.get("filename_or_obj")
            if not source or not is_dicom_dir(Path(str(source))):
                raise InputError(source or key, NEEDS_SERIES)
            arr = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
            if arr.ndim == 4:
                arr = arr[0]
            affine = np.asarray(getattr(img, "affine", meta.get("affine")), dtype=np.float64)
            path = seg_path(source, self.output_dir)
            write_dicom_seg(arr, affine, str(source), path, self.class_names, self.algorithm())
            if self.store:
                store_files(self.store, [path], path.name)
        return d
