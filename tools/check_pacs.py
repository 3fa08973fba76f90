"""`make pacs-check`: the recon bundle from DICOMweb to DICOMweb against a real Orthanc on 127.0.0.1.

Steps: Orthanc + its DICOMweb plugin present (nothing installed here; the make target installs them with apt-get when
missing) -> a temporary config (HTTP on a free 127.0.0.1 port, DICOM server off, storage in a temporary folder, no
remote access, no authentication, the DICOMweb plugin) -> Orthanc started, /system answers -> the sample 512x512 series
uploaded (a copy with the Study / Series / SOP UIDs the anonymised sample lacks) -> the recon bundle run with
``--input <series address> --output_format both --store <dicomweb root>`` -> the derived series found over QIDO-RS,
read back over WADO-RS, equal voxel for voxel (and affine) to the NIfTI output -> the aug_seg bundle (a seeded tiny
SegResNet) from DICOMweb to a DICOM SEG, read back = its label map -> a real MONAI Label server on the PACKAGED aug_seg
archive with ``--studies <dicomweb root>`` (tools/check_monailabel_dicomweb.py, run with the MONAI Label venv's python:
datastore listed, inference on the uploaded series, a corrected label saved, the SEG MONAI Label stores decoded onto
the series) -> Orthanc stopped by its PID. Orthanc runs with its GDCM plugin, which transcodes the JPEG 2000 sample
for MONAI Label (it asks for uncompressed instances). Prints one line per step with pass/fail and seconds; exit status
1 when a step fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/share/orthanc/plugins/libOrthancGdcm.so"]
STUDY_UID, SERIES_UID = "1.2.826.0.1.3680043.8.498.4242", "1.2.826.0.1.3680043.8.498.4243"


def missing() -> list[str]:
    """What of Orthanc and its DICOMweb plugin is not installed."""
    return [p for p in (ORTHANC, *PLUGINS) if not os.path.exists(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def orthanc(work: Path, timeout: float = 60.0):
    """An Orthanc on 127.0.0.1 (a free HTTP port, no DICOM port, storage under ``work``); yields its HTTP root
    ``http://127.0.0.1:<port>``; stopped by its PID (terminate, wait, kill) on the way out."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "fvae-pacs-check",
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": PLUGINS,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    log = open(work / "orthanc.log", "wb")
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {proc.returncode} (log: {work / 'orthanc.log'})")
            try:
                with urllib.request.urlopen(url + "/system", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer {url}/system in {timeout:.0f} s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def upload_copy(source: Path, folder: Path, base: str) -> list[Path]:
    """A copy of the series in ``source`` with Study / Series / SOP UIDs filled in (the sample is anonymised without
    them; the SOP UIDs from its file meta), stored in ``base`` with STOW-RS."""
    import pydicom
    from fvae_ct.dicomweb import store_files
    from pydicom.uid import CTImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, f in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID", CTImageStorage)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
        ds.SeriesNumber, ds.SeriesDescription = 3, "sample CT"
        ds.PatientID, ds.PatientName = ds.get("PatientID") or "FVAE-TEST", ds.get("PatientName") or "Test^Pacs"
        files.append(folder / f"{i:03d}.dcm")
        ds.save_as(files[-1])
    store_files(base, files, "the sample series")
    return files


def derived_series(base: str, study: str, source_series: str) -> list[str]:
    """The series UIDs of ``study`` on the server other than ``source_series``."""
    from dicomweb_client.api import DICOMwebClient

    found = DICOMwebClient(url=base).search_for_series(study)
    uids = [s["0020000E"]["Value"][0] for s in found]
    return [u for u in uids if u != source_series]


def read_back(base: str, study: str, series: str, folder: Path):
    """The series fetched over WADO-RS into ``folder`` and read with the bundles' own reader: (voxels, affine)."""
    import numpy as np
    from dicomweb_client.api import DICOMwebClient
    from fvae_ct.dicomweb import ANY_SYNTAX
    from fvae_ct.io import load_ct

    folder.mkdir(parents=True)
    datasets = DICOMwebClient(url=base).retrieve_series(study, series, media_types=ANY_SYNTAX)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    img = load_ct(str(folder), check_hu=False)
    return img[0].numpy(), np.asarray(img.affine, dtype=np.float64), datasets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--vae", default="taef2", help="VAE of the recon run (identity: fastest)")
    ap.add_argument("--series", default=None, help="DICOM series folder to upload (default: the sample 512x512)")
    ap.add_argument(
        "--monailabel-venv",
        default=str(ROOT / ".venv-monailabel"),
        help="MONAI Label virtualenv for the MONAI Label step (make's .venv-monailabel); 'none' skips the step",
    )
    args = ap.parse_args(argv)

    steps: list[tuple[str, bool, float, str]] = []

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - reported as the failed step
            steps.append((name, False, time.perf_counter() - t0, f"{type(e).__name__}: {e}"))
            raise
        steps.append((name, True, time.perf_counter() - t0, out if isinstance(out, str) else ""))
        return out

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fvae_pacs_"))
    if args.work and work.exists():
        shutil.rmtree(work)
    ok = True
    try:
        step("orthanc + dicomweb plugin installed", lambda: _installed())
        sys.path.insert(0, str(ROOT / "common"))
        from fvae_ct.assets import sample_ct

        source = Path(args.series or sample_ct("dicom_series_512"))
        t0 = time.perf_counter()
        with orthanc(work / "orthanc") as http:
            started = time.perf_counter() - t0
            steps.append((f"orthanc started, /system answers ({http}, temporary storage)", True, started, ""))
            dicomweb = http + "/dicom-web"
            files = step("upload the sample series (STOW-RS)", lambda: upload_copy(source, work / "upload", dicomweb))
            address = f"{dicomweb}/studies/{STUDY_UID}/series/{SERIES_UID}"
            out = work / "recon"
            cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                   str(ROOT / "bundles/fvae_recon/configs/inference.yaml"), "--bundle_root",
                   str(ROOT / "bundles/fvae_recon"), "--input", address, "--output_dir", str(out),
                   "--output_format", "both", "--store", dicomweb, "--vae", args.vae, "--figures", "false"]  # fmt: skip
            step(f"recon bundle DICOMweb -> DICOMweb ({args.vae})", lambda: _run(cmd, work / "recon.log"))
            new = step(
                "derived series found over QIDO-RS", lambda: _one(derived_series(dicomweb, STUDY_UID, SERIES_UID))
            )
            step(
                "derived series read back over WADO-RS = NIfTI output",
                lambda: _compare(dicomweb, new, out, work, len(files)),
            )
            seg_out, bundle = work / "seg", _tiny_segmenter(work / "seg_bundle")
            cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                   str(ROOT / "bundles/fvae_aug_seg/configs/inference.yaml"), "--bundle_root", str(bundle),
                   "--input", address, "--output_dir", str(seg_out), "--output_format", "both", "--store", dicomweb]  # fmt: skip
            step("aug_seg bundle DICOMweb -> DICOM SEG (seeded tiny SegResNet)", lambda: _run(cmd, work / "seg.log"))
            step(
                "DICOM SEG found over QIDO-RS, read back = NIfTI label map", lambda: _check_seg(dicomweb, new, seg_out)
            )
            if args.monailabel_venv != "none":
                step(
                    "MONAI Label --studies <dicomweb>, packaged aug_seg: list, infer, save label -> SEG in Orthanc",
                    lambda: _monailabel(Path(args.monailabel_venv), dicomweb, bundle, work),
                )
    except Exception:  # noqa: BLE001 - the failed step is in the list
        ok = False
    finally:
        if not args.work and ok:
            shutil.rmtree(work, ignore_errors=True)
    steps.append(("orthanc stopped (terminate / wait by PID)", True, 0.0, ""))
    for name, passed, secs, note in steps:
        print(f"{'PASS' if passed else 'FAIL'}  {secs:7.1f} s  {name}" + (f": {note}" if note else ""))
    print("pacs-check:", "passed" if ok else f"FAILED (its logs and the Orthanc storage are kept in {work})")
    return 0 if ok else 1


def _installed() -> str:
    gone = missing()
    if gone:
        raise RuntimeError(f"missing {', '.join(gone)}: apt-get install orthanc orthanc-dicomweb")
    version = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return version.strip()


def _run(cmd, logfile: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "common") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(logfile, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = logfile.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"exit status {rc}: " + " | ".join(tail))
    return ""


def _monailabel(venv: Path, dicomweb: str, trained: Path, work: Path) -> str:
    """The packaged aug_seg archive (unpacked, with the seeded model of ``trained``) served by MONAI Label with the
    PACS as its datastore: tools/check_monailabel_dicomweb.py in the MONAI Label venv; its step lines are printed."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise RuntimeError(
            f"no MONAI Label venv at {venv}: make .venv-monailabel/.installed (or --monailabel-venv none)"
        )
    dist, unpacked = work / "dist", work / "archive"
    _run([sys.executable, str(ROOT / "tools/build_bundles.py"), "--out", str(dist), "--bundles", "fvae_aug_seg",
          "--unpack", str(unpacked)], work / "build.log")  # fmt: skip
    bundle = unpacked / "fvae_aug_seg"
    for name in ("model.pt", "model.json"):
        shutil.copy(trained / "models" / name, bundle / "models" / name)
    log = work / "monailabel.log"
    cmd = [str(python), str(ROOT / "tools/check_monailabel_dicomweb.py"), "--bundle", str(bundle), "--dicomweb",
           dicomweb, "--study", STUDY_UID, "--series", SERIES_UID, "--work", str(work / "monailabel"), "--port",
           str(free_port())]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FVAE_ASSETS")}
    with open(log, "w") as fp:
        rc = subprocess.run(cmd, stdout=fp, stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_text().splitlines()
    lines = [ln for ln in text if ln.startswith(("PASSED", "FAILED", "MONAI Label"))]
    print("\n".join("    " + ln for ln in lines), flush=True)
    if rc:
        print("\n".join("    | " + ln for ln in text[-40:]), file=sys.stderr, flush=True)
        raise RuntimeError(f"exit status {rc} (log: {log})")
    return lines[-1] if lines else ""


def _tiny_segmenter(root: Path) -> Path:
    """A bundle_root with a seeded (untrained) small SegResNet and its models/model.json: the SEG writing and storing
    is under test, not the model."""
    import torch
    from fvae_ct.aug_seg import DEFAULT_NETWORK
    from monai.networks.nets import SegResNet

    (root / "models").mkdir(parents=True)
    sizes = dict(init_filters=8, blocks_down=[1, 1, 1], blocks_up=[1, 1])
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, **sizes)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    names = ["background", "organ", "lesion"]
    meta = {**DEFAULT_NETWORK, **sizes, "patch_size": [256, 256, 32], "class_names": names}
    (root / "models" / "model.json").write_text(json.dumps(meta))
    return root


def _check_seg(base: str, derived: str, out: Path) -> str:
    import nibabel as nib
    import numpy as np
    from dicomweb_client.api import DICOMwebClient
    from fvae_ct.dicomweb import ANY_SYNTAX

    uids = [u for u in derived_series(base, STUDY_UID, SERIES_UID) if u != derived]
    (seg,) = DICOMwebClient(url=base).retrieve_series(STUDY_UID, _one(uids), media_types=ANY_SYNTAX)
    labels = np.asarray(nib.load(str(next(out.glob("*_seg.nii.gz")))).dataobj)
    if seg.Modality != "SEG" or seg.ReferencedSeriesSequence[0].SeriesInstanceUID != SERIES_UID:
        raise RuntimeError(f"not a SEG of the source series: {seg.Modality}")
    frames = np.asarray(seg.pixel_array).reshape(-1, *labels.shape[:2])
    by_segment: dict = {}
    for f, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        k = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        by_segment[k] = by_segment.get(k, 0) + int(f.sum())
    want = {k: int((labels == k).sum()) for k in range(1, int(labels.max()) + 1) if (labels == k).any()}
    if by_segment != want:
        raise RuntimeError(f"voxels per segment: SEG {by_segment}, NIfTI {want}")
    return f"{len(seg.SegmentSequence)} segments, {len(frames)} frames, voxels per segment {want} (= NIfTI)"


def _one(uids: list[str]) -> str:
    if len(uids) != 1:
        raise RuntimeError(f"expected one derived series in the study, found {len(uids)}")
    return uids[0]


def _compare(base: str, series: str, out: Path, work: Path, n_source: int) -> str:
    import nibabel as nib
    import numpy as np

    hu, affine, datasets = read_back(base, STUDY_UID, series, work / "readback")
    nifti = next(out.glob("*_recon.nii.gz"))
    img = nib.load(str(nifti))
    ref = np.asarray(img.dataobj)
    if len(datasets) != n_source:
        raise RuntimeError(f"{len(datasets)} instances read back, the source has {n_source}")
    if hu.shape != ref.shape or not np.array_equal(hu, ref):
        raise RuntimeError(f"voxels differ: shapes {hu.shape} / {ref.shape}")
    if not np.allclose(affine, img.affine, atol=1e-4):
        raise RuntimeError("affines differ")
    kinds = sorted({"\\".join(d.ImageType[:2]) for d in datasets})
    return (
        f"{len(datasets)} instances, shape {hu.shape}, max |diff| 0, ImageType {kinds}, {datasets[0].SeriesDescription}"
    )


if __name__ == "__main__":
    sys.exit(main())
