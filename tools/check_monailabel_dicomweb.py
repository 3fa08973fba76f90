"""Real-server check: MONAI Label's DICOMweb datastore (``--studies <PACS>/dicom-web``) serves the fvae_aug_seg bundle.

Run by ``make pacs-check`` (tools/check_pacs.py) with the MONAI Label venv's python, against the Orthanc that check
started on 127.0.0.1 and the series it uploaded; on its own:

    .venv-monailabel/bin/python tools/check_monailabel_dicomweb.py --bundle <unpacked fvae_aug_seg with a model> \\
        --dicomweb http://127.0.0.1:<port>/dicom-web --study <uid> --series <uid> --work <folder> --port 8127

1. the `monaibundle` app (out of the installed wheel) with the bundle in its model folder, as tools/check_monailabel.py;
2. ``monailabel start_server --studies <dicomweb>``: MONAI Label's DICOMweb datastore (its cache in ``<work>/cache``,
   dcmqi's itkimage2segimage from the venv, nothing downloaded), started in its own process group;
3. GET /datastore/: as many images as CT series on the server (QIDO-RS);
4. POST /infer/<model>?image=<series uid>: MONAI Label fetches the series over WADO-RS, the bundle segments it; the
   returned label map must sit on the series' voxel grid (every pixel centre of every slice on a voxel centre);
5. an annotator's correction (two boxes, one per class, painted on the returned map) saved with
   PUT /datastore/label?image=<series uid>&tag=final: MONAI Label writes a DICOM SEG (dcmqi) and stores it with STOW-RS;
6. the new SEG series found over QIDO-RS, read over WADO-RS and decoded onto the source series by geometry (each
   frame's position = a source slice's, same orientation and pixel spacing): equal, voxel for voxel, to the saved map;
   its segment names are the bundle's classes;
7. the server stopped (SIGTERM to its process group, SIGKILL after a grace period) in a ``finally``.

Prints one PASSED/FAILED line per step and exits non-zero on any failure. Needs the MONAI Label venv (pydicom 2,
dicomweb-client, numpy, nibabel); nothing of this project.
"""

import argparse
import json
import signal
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from check_monailabel import (
    RESULTS,
    CheckError,
    find_monailabel,
    install_app,
    require,
    server_env,
    split_multipart,
    start_server,
    step,
    stop_and_report,
)
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset


def source_geometry(client: DICOMwebClient, study: str, series: str) -> dict:
    """{IPP tuple: (SOPInstanceUID, IOP, PixelSpacing, rows, cols)} of the series, from its WADO-RS metadata."""
    slices = {}
    for meta in client.retrieve_series_metadata(study, series):
        ds = Dataset.from_json(meta)
        ipp = tuple(round(float(v), 3) for v in ds.ImagePositionPatient)
        slices[ipp] = (
            ds.SOPInstanceUID,
            np.asarray(ds.ImageOrientationPatient, float),
            np.asarray(ds.PixelSpacing, float),
            int(ds.Rows),
            int(ds.Columns),
        )
    return slices


def world_to_voxels(geometry: dict, affine: np.ndarray) -> tuple[dict, float]:
    """For each source slice (by IPP), the voxel indices (rows x cols x 3, int) of ``affine`` (RAS, NIfTI) at its
    pixel centres, and the largest distance of any of them from a voxel centre (0: the grids coincide)."""
    inv = np.linalg.inv(affine)
    out, worst = {}, 0.0
    for ipp, (_, iop, spacing, rows, cols) in geometry.items():
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = (
            np.asarray(ipp)
            + iop[None, None, :3] * (c[..., None] * spacing[1])
            + iop[None, None, 3:] * (r[..., None] * spacing[0])
        )
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        worst = max(worst, float(np.abs(ijk - np.round(ijk)).max()))
        out[ipp] = np.round(ijk).astype(int)
    return out, worst


def on_series_grid(label: np.ndarray, voxels: dict) -> dict:
    """The label map sampled at each source slice's pixels: {IPP: rows x cols}; raises when a pixel is outside it."""
    shape = np.asarray(label.shape[:3])
    out = {}
    for ipp, ijk in voxels.items():
        if (ijk < 0).any() or (ijk >= shape).any():
            raise CheckError(f"slice at {ipp} falls outside the label map {tuple(shape)}")
        out[ipp] = label[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
    return out


def decode_seg(seg: Dataset, geometry: dict, names: dict) -> tuple[dict, str]:
    """The SEG's frames placed on the source slices by position: {IPP: rows x cols label ids} (ids by segment name
    through ``names``), plus a description. Raises on a frame off the source grid or overlapping segments."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    segment_id = {int(s.SegmentNumber): names.get(str(s.SegmentLabel)) for s in seg.SegmentSequence}
    if None in segment_id.values():
        raise CheckError(f"segment names {[str(s.SegmentLabel) for s in seg.SegmentSequence]} not in {sorted(names)}")
    frames = np.asarray(seg.pixel_array).reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = {ipp: np.zeros((rows, cols), np.int64) for ipp, (_, _, _, rows, cols) in geometry.items()}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ipp = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        if ipp not in geometry:
            raise CheckError(f"SEG frame at {ipp}: no source slice there")
        _, src_iop, src_spacing, rows, cols = geometry[ipp]
        if not (np.allclose(iop, src_iop, atol=1e-4) and np.allclose(spacing, src_spacing, atol=1e-4)):
            raise CheckError(f"SEG orientation {iop} / spacing {spacing} differ from the source's")
        k = segment_id[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        hit = frame.astype(bool)
        if (out[ipp][hit] != 0).any():
            raise CheckError(f"segments overlap at slice {ipp}")
        out[ipp][hit] = k
    return out, f"{len(seg.SegmentSequence)} segments {sorted(names)}, {len(frames)} frames"


def put_label(client, image: str, path: Path, params: dict):
    """PUT /datastore/label?image=<image>&tag=final with the label file and ``params`` (multipart form)."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'.encode()
        + f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{path.name}"\r\n'.encode()
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    q = urllib.parse.urlencode({"image": image, "tag": "final"})
    return client.request(
        "PUT", f"/datastore/label?{q}", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )


def seg_series(pacs: DICOMwebClient, study: str) -> set:
    return {
        Dataset.from_json(s).SeriesInstanceUID
        for s in pacs.search_for_series(study, search_filters={"Modality": "SEG"})
    }


def correct(label: np.ndarray, ids: list[int]) -> np.ndarray:
    """An annotator's correction of an inferred map: one box per class id, in the middle slices, so that every class
    is present whatever the (untrained) model returned."""
    out = label.copy()
    x, y, z = out.shape[:3]
    for n, k in enumerate(ids):
        x0 = x // 4 + n * x // 4
        out[x0 : x0 + x // 8, y // 3 : y // 3 + y // 8, z // 4 : max(z // 4 + 1, 3 * z // 4)] = k
    return out


def run(a, client, proc, model: str, pacs: DICOMwebClient, work: Path, info: dict) -> None:
    m = info.get("models", {}).get(model)
    require(f"/info/ lists model {model}", m is not None, f"models {list(info.get('models', {}))}")
    classes = {str(k): int(v) for k, v in (m.get("labels") or {}).items()}
    ct_series = {
        Dataset.from_json(s).SeriesInstanceUID for s in pacs.search_for_series(search_filters={"Modality": "CT"})
    }
    status, stats = client.get_json("/datastore/")
    step(
        "GET /datastore/: the CT series on the server (QIDO-RS)",
        status == 200 and (stats or {}).get("total") == len(ct_series) and a.series in ct_series,
        f"HTTP {status}, {json.dumps(stats)}; server: {len(ct_series)} CT series",
    )

    t0 = time.time()
    q = urllib.parse.urlencode({"image": a.series, "output": "all"})
    status, headers, body = client.post_form(f"/infer/{model}?{q}", {"params": json.dumps({"device": "cpu"})})
    ok = status == 200 and headers.get("Content-Type", "").startswith("multipart/")
    said = "" if ok else ": " + body[:300].decode("utf-8", "replace").replace("\n", " ")  # MONAI Label's error
    require(f"POST /infer/{model}?image=<series uid>", ok, f"HTTP {status} in {time.time() - t0:.1f} s{said}")
    fname, data = split_multipart(headers["Content-Type"], body).get("image", (None, b""))
    cached = sorted((work / "cache").rglob(f"{a.series}/*"))
    syntax = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name) for f in cached}
    step("MONAI Label fetched the series (WADO-RS) into its cache", bool(cached), f"{len(cached)} files, {syntax}")
    inferred = work / "inferred.nii.gz"
    inferred.write_bytes(data)
    img = nib.load(str(inferred))
    geometry = source_geometry(pacs, a.study, a.series)
    voxels, off = world_to_voxels(geometry, img.affine)
    labels = np.asarray(img.dataobj).astype(np.int64)
    labels = labels[..., 0] if labels.ndim == 4 else labels
    require(
        "the label map sits on the series' grid",
        off < 1e-3 and sum(r * c for *_, r, c in geometry.values()) == labels.size,
        f"{fname}: shape {labels.shape}, {len(geometry)} source slices, pixel centres off voxel centres by <= {off:.2g}",
    )
    found = sorted(np.unique(labels).tolist())
    step("label ids within the bundle's classes", set(found) <= {0, *classes.values()}, f"{found}, classes {classes}")

    saved = correct(labels, sorted(classes.values()))
    path = work / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(saved.astype(np.uint8), img.affine, img.header), str(path))
    before = seg_series(pacs, a.study)
    names = {v: k for k, v in classes.items()}
    label_info = [{"name": names[k]} for k in sorted(classes.values())]
    t0 = time.time()
    status, _, body = put_label(client, a.series, path, {"label_info": label_info})
    require(
        "PUT /datastore/label (tag final): MONAI Label writes a SEG and stores it",
        status == 200,
        f"HTTP {status} in {time.time() - t0:.1f} s: {body[:200].decode(errors='replace')}",
    )
    new = seg_series(pacs, a.study) - before
    require("one new SEG series in the study (QIDO-RS)", len(new) == 1, f"{len(new)} new")
    (seg,) = pacs.retrieve_series(a.study, new.pop())
    refs = seg.ReferencedSeriesSequence[0].SeriesInstanceUID if "ReferencedSeriesSequence" in seg else None
    step("the SEG references the source series", refs == a.series, str(refs))
    decoded, what = decode_seg(seg, geometry, classes)
    want = on_series_grid(saved, voxels)
    diff = sum(int((decoded[p] != want[p]).sum()) for p in geometry)
    unsaved = on_series_grid(labels, voxels)  # the check can fail: the map before the correction differs
    control = sum(int((decoded[p] != unsaved[p]).sum()) for p in geometry)
    counts = {k: sum(int((want[p] == k).sum()) for p in geometry) for k in sorted(classes.values())}
    step(
        "the SEG decodes onto the series = the saved label map",
        diff == 0 and control > 0,
        f"{what}; {diff} voxels differ ({control} from the uncorrected inference); voxels per class {counts}",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="unpacked fvae_aug_seg with models/model.pt")
    ap.add_argument(
        "--dicomweb", required=True, help="DICOMweb root on 127.0.0.1, e.g. http://127.0.0.1:8042/dicom-web"
    )
    ap.add_argument("--study", required=True)
    ap.add_argument("--series", required=True, help="the CT series to infer on and label")
    ap.add_argument("--work", required=True, type=Path, help="scratch folder (created; must not exist)")
    ap.add_argument("--port", type=int, default=8127)
    ap.add_argument("--venv", type=Path, default=Path(sys.prefix), help="MONAI Label virtualenv (default: this one)")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--infer-timeout", type=float, default=900)
    a = ap.parse_args()
    if urllib.parse.urlsplit(a.dicomweb).hostname not in ("127.0.0.1", "localhost"):
        ap.error("--dicomweb must be on 127.0.0.1: this check writes to the server")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work, bundle, venv = a.work.resolve(), a.bundle.resolve(), a.venv.resolve()
    proc = None
    try:
        work.mkdir(parents=True)
        exe, env = find_monailabel(venv), server_env(venv)
        env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(work / "cache")
        app, _ = install_app(exe, env, work, bundle, [])
        pacs = DICOMwebClient(url=a.dicomweb)
        proc, client, info, _ = start_server(a, exe, app, a.dicomweb, env, bundle.name, work / "server.log")
        run(a, client, proc, bundle.name, pacs, work, info)
    except CheckError as e:
        if str(e) not in [n for n, ok, _ in RESULTS if not ok]:
            step(str(e), False)
    except Exception as e:  # noqa: BLE001 - an unexpected error of the check itself, reported as a failed step
        step(f"unexpected {type(e).__name__}", False, str(e))
    finally:
        stop_and_report(proc, work / "server.log", 60)
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(
        f"MONAI Label DICOMweb check: {'PASSED' if not failed else 'FAILED'} ({len(RESULTS) - len(failed)}/{len(RESULTS)})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
