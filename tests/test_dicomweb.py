"""DICOMweb in and out (fvae_ct.dicomweb): address parsing, credential redaction and refusal, one-line HTTP errors
naming the server and the status (a tiny server on 127.0.0.1), credentials from the environment only; and, when
Orthanc with its DICOMweb and GDCM plugins is installed, a real round trip: the sample series uploaded, fetched by its
study and series address, reconstructed (identity VAE) with the derived series stored back and read back voxel for voxel, and a
DICOM SEG stored and found in the study (`make pacs-check` runs the bundle itself end to end)."""

from __future__ import annotations

import base64
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fvae_ct import dicomweb
from fvae_ct.cases import discover_cases
from fvae_ct.errors import InputError, OptionError

ROOT = Path(__file__).resolve().parents[1]
UID = "1.2.826.0.1.3680043.8.498.7"


@pytest.mark.parametrize(
    "url, base, study, series",
    [
        (f"http://127.0.0.1:8042/dicom-web/studies/{UID}", "http://127.0.0.1:8042/dicom-web", UID, None),
        (f"https://pacs.example/a/b/studies/{UID}/series/{UID}.1/", "https://pacs.example/a/b", UID, UID + ".1"),
        (f"HTTP://host/studies/{UID}", "http://host", UID, None),
    ],
)
def test_addresses_parse_into_root_study_and_series(url, base, study, series):
    assert dicomweb.is_address(url)
    assert dicomweb.parse_address(url) == dicomweb.Address(base, study, series)


@pytest.mark.parametrize(
    "url, says",
    [
        ("ftp://host/studies/1.2", "http:// or https://"),
        ("http://host:8042/dicom-web", "study or series address"),
        ("http://host/studies/1.2/series", "<base>/studies/<StudyUID>"),
        ("http://host/studies/1.2/instances/1.3", "<base>/studies/<StudyUID>"),
        ("http://host/studies/abc", "UIDs of digits and dots"),
        ("http://host/studies/1.2?x=1", "without ?query"),
        ("http://host:port/studies/1.2", "input"),
    ],
)
def test_malformed_addresses_are_one_option_error(url, says):
    with pytest.raises(OptionError, match="input") as e:
        dicomweb.parse_address(url)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_credentials_in_an_address_are_refused_and_never_shown():
    for url in (f"http://alice:s3cret@host/dicom-web/studies/{UID}", "http://alice:s3cret@host/dicom-web"):
        with pytest.raises(OptionError) as e:
            (dicomweb.parse_address if "studies" in url else dicomweb.store_target)(url)
        assert "s3cret" not in str(e.value) and "alice" not in str(e.value) and "FVAE_DICOMWEB_USER" in str(e.value)
    assert dicomweb.redact("https://u:p@h:1/x/studies/1") == "https://h:1/x/studies/1"
    assert dicomweb.redact("http://h/x") == "http://h/x"


def test_store_takes_the_root_only():
    assert dicomweb.store_target(None) is None and dicomweb.store_target("") is None
    assert dicomweb.store_target("http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(OptionError, match="store .*DICOMweb root"):
        dicomweb.store_target(f"http://127.0.0.1:8042/dicom-web/studies/{UID}")
    with pytest.raises(OptionError, match="store: expected an http"):
        dicomweb.store_target("/some/folder")


def test_store_without_a_dicom_output_is_refused():
    pytest.importorskip("highdicom")
    from fvae_ct.aug_seg.dicom_seg import store_root
    from fvae_ct.recon import ReconWorkflow
    from fvae_ct.vae import load

    with pytest.raises(OptionError, match="store: .*output_format"):
        ReconWorkflow(load("identity"), "/tmp/unused", store="http://127.0.0.1:1/dicom-web")
    with pytest.raises(OptionError, match="store: .*output_format"):
        store_root("http://127.0.0.1:1/dicom-web", ("nifti",))
    assert store_root("http://127.0.0.1:1/dicom-web", ("nifti", "dicom_seg")) == "http://127.0.0.1:1/dicom-web"


class _Refusing(BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Refusing.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def test_an_http_error_is_one_line_naming_server_and_status(refusing_server, monkeypatch):
    monkeypatch.setenv("FVAE_DICOMWEB_USER", "alice")
    monkeypatch.setenv("FVAE_DICOMWEB_PASSWORD", "s3cret")
    monkeypatch.delenv("FVAE_DICOMWEB_TOKEN", raising=False)
    with pytest.raises(InputError) as e:
        discover_cases(f"{refusing_server}/studies/{UID}")
    msg = str(e.value)
    assert msg.startswith(refusing_server + ": QIDO-RS search") and "HTTP 401" in msg and "\n" not in msg
    assert "s3cret" not in msg
    # the credentials came from the environment, as basic authentication
    assert _Refusing.seen and _Refusing.seen[0] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


def test_a_server_that_does_not_answer_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(InputError) as e:
        discover_cases(f"http://127.0.0.1:{port}/dicom-web/studies/{UID}")
    assert str(e.value).startswith(f"http://127.0.0.1:{port}/dicom-web: QIDO-RS search")
    assert "no answer" in str(e.value) and "\n" not in str(e.value)


# ---- a real Orthanc (skipped where it is not installed) -------------------------------------------------------------
@pytest.fixture(scope="module")
def pacs(tmp_path_factory, dicom_dir):
    sys.path.insert(0, str(ROOT / "tools"))
    import check_pacs

    if check_pacs.missing():
        pytest.skip(f"Orthanc / its DICOMweb and GDCM plugins not installed ({check_pacs.missing()})")
    work = tmp_path_factory.mktemp("pacs")
    with check_pacs.orthanc(work / "orthanc") as http:
        root = http + "/dicom-web"
        check_pacs.upload_copy(dicom_dir, work / "upload", root)
        yield check_pacs, root, work


@pytest.mark.slow
def test_a_real_orthanc_round_trip(pacs, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    import torch
    from fvae_ct.aug_seg.dicom_seg import SaveDicomSegd
    from fvae_ct.io import load_ct
    from fvae_ct.recon import ReconWorkflow
    from fvae_ct.vae import load
    from monai.data import MetaTensor

    check_pacs, root, work = pacs
    study, series = check_pacs.STUDY_UID, check_pacs.SERIES_UID
    by_study = discover_cases(f"{root}/studies/{study}")
    by_series = discover_cases(f"{root}/studies/{study}/series/{series}")
    assert [c.name for c in by_study] == [c.name for c in by_series] == ["3_sample_CT"]
    address = f"{root}/studies/{study}/series/{series}"
    assert by_study[0].source == by_series[0].source == by_series[0].shown == address  # tables name the address
    with pytest.raises(InputError, match="no such series"):
        discover_cases(f"{root}/studies/{study}/series/{series}.9")

    out = tmp_path / "recon"
    wf = ReconWorkflow(load("identity"), str(out), output_format="both", store=root, figures=False, progress=False)
    row = wf.run_case(by_series[0])
    assert row["input"] == address
    derived = check_pacs.derived_series(root, study, series)
    assert len(derived) == 1
    hu, affine, datasets = check_pacs.read_back(root, study, derived[0], tmp_path / "back")
    nifti = load_ct(row["output"], check_hu=False)
    assert np.array_equal(hu, nifti[0].numpy()) and np.allclose(affine, nifti.affine, atol=1e-4)
    assert {tuple(d.ImageType[:2]) for d in datasets} == {("DERIVED", "SECONDARY")}

    case = by_series[0]
    image = load_ct(case.path, check_hu=False)
    labels = (image[0].numpy() > 0).astype(np.uint8)
    pred = MetaTensor(torch.as_tensor(labels[None]), affine=image.affine, meta={"filename_or_obj": case.path})
    SaveDicomSegd("pred", str(tmp_path / "seg"), ["background", "body"], store=root)({"pred": pred})
    new = [u for u in check_pacs.derived_series(root, study, series) if u != derived[0]]
    assert len(new) == 1
    from dicomweb_client.api import DICOMwebClient

    (seg,) = DICOMwebClient(url=root).retrieve_series(study, new[0], media_types=dicomweb.ANY_SYNTAX)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert int(np.asarray(seg.pixel_array).sum()) == int(labels.sum())
    assert isinstance(seg, pydicom.Dataset)


@pytest.mark.slow
def test_a_pacs_series_is_fetched_when_its_case_runs(pacs, tmp_path):
    """The recon batch lists a PACS series without fetching it; the case's run fetches it (a failed fetch fails that
    case only, in one line naming the server); metrics.csv names the series address."""
    import csv

    from fvae_ct.cases import Case, fetch_case
    from fvae_ct.recon import ReconWorkflow
    from fvae_ct.vae import load

    check_pacs, root, _ = pacs
    address = f"{root}/studies/{check_pacs.STUDY_UID}/series/{check_pacs.SERIES_UID}"
    (case,) = discover_cases(address, fetch=False)
    assert case.source == address and case.size == 20 * 512 * 512 and not Path(case.path).exists()

    out = tmp_path / "recon"
    ReconWorkflow(load("identity"), str(out), figures=False, progress=False).run(address)
    (row,) = csv.DictReader(open(out / "metrics.csv"))
    assert (row["case"], row["input"], row["status"]) == ("3_sample_CT", address, "ok")

    gone = Case("gone", str(tmp_path / "fetched" / "gone"), source=address + ".9")  # listed, then not there
    with pytest.raises(InputError, match=r"^http://127\.0\.0\.1:\d+/dicom-web: WADO-RS retrieval of .*\.9: HTTP 404"):
        fetch_case(gone)
    assert not (tmp_path / "fetched" / "gone").exists()

    # listed by another process (rank 0 under torchrun): its folder's parent is not here; fetched whole, once
    elsewhere = Case(case.name, str(tmp_path / "rank0_tmp" / case.name), source=address)
    fetch_case(elsewhere)
    files = sorted(p.name for p in Path(elsewhere.path).iterdir())
    assert files == [f"{i:05d}.dcm" for i in range(20)]
    assert [p.name for p in (tmp_path / "rank0_tmp").iterdir()] == [case.name]  # no partial folder beside it
    stamp = Path(elsewhere.path, files[0]).stat().st_mtime_ns
    fetch_case(elsewhere)  # already there: not fetched again
    assert Path(elsewhere.path, files[0]).stat().st_mtime_ns == stamp
