"""The reconstruction written as a derived DICOM series (``output_format: dicom | both``), on the real 512x512 DICOM
series: read back with the project's own reader it is exactly the NIfTI output (voxels and affine); new UIDs, the
patient / study attributes and the per-slice geometry of the source, the source slices referenced one to one, files
pydicom reads strictly (and dciodvfy, where installed, finds no error in); the input untouched; geometry matched by
position (a flipped or transposed grid gives the same files), mismatches and unrepresentable values refused in one
line; written all or nothing; reused by skip_existing only when complete."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import PY, ROOT, run
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from fvae_ct.bundle import bundle_version
from fvae_ct.errors import BatchFailure, InputError, OptionError
from fvae_ct.io import clean_temporaries, dicom_series, load_ct
from fvae_ct.recon import ReconWorkflow
from fvae_ct.recon.dicom_output import (
    DICOM_SUFFIX,
    SERIES_NUMBER_OFFSET,
    existing_series,
    is_own_series,
    write_derived_series,
)
from fvae_ct.recon.inputs import list_cases
from fvae_ct.vae import IdentityVAE

VERSION = json.loads((ROOT / "bundles" / "fvae_recon" / "configs" / "metadata.json").read_text())["version"]
#: what the source series of the complete copy records (the sample itself is anonymised: these are empty there)
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P-123", "PatientBirthDate": "19700101", "PatientSex": "F"}
STUDY = {"StudyID": "S7", "AccessionNumber": "A-42", "StudyDescription": "CT chest"}
STUDY_UID, SOURCE_SERIES_UID = "1.2.826.0.1.3680043.8.498.1111", "1.2.826.0.1.3680043.8.498.2222"


def _hashes(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _workflow(out, fmt="both", **kw):
    return ReconWorkflow(IdentityVAE(), str(out), figures=False, progress=False, output_format=fmt, **kw)


def _files(folder):
    return sorted(folder.glob("*.dcm"))


def _source_uid(ds):
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


@pytest.fixture(scope="module")
def both_run(dicom_dir, tmp_path_factory):
    """The sample series through the identity VAE, ``output_format both``; the input's hashes before and after."""
    out = tmp_path_factory.mktemp("both")
    before = _hashes(dicom_dir)
    summary = _workflow(out).run(str(dicom_dir))
    return out, summary, before, _hashes(dicom_dir)


@pytest.fixture(scope="module")
def complete_series(dicom_dir, tmp_path_factory):
    """A copy of the sample series as a PACS would hold it: the UIDs and patient / study attributes the anonymised
    sample lacks filled in, InstanceNumbers scrambled against the positions, files named in no geometric order."""
    folder = tmp_path_factory.mktemp("complete") / "series"
    folder.mkdir()
    rng = np.random.default_rng(3)
    files = sorted(dicom_dir.iterdir())
    numbers = rng.permutation(len(files)) + 1
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = STUDY_UID, SOURCE_SERIES_UID, 3
        for k, v in {**PATIENT, **STUDY}.items():
            setattr(ds, k, v)
        ds.InstanceNumber = int(numbers[i])
        ds.save_as(folder / f"x{int(numbers[i]) * 7 % 23:02d}_{i}.dcm")
    return folder


def _check_series(out, source, hu, affine, derived_by=f"fvae_recon {VERSION}"):
    """The derived series in ``out`` against the source series folder and the array / affine it was written from."""
    back = load_ct(out, check_hu=False)
    assert np.array_equal(back[0].numpy(), hu.astype(np.float32)), "voxels differ from the NIfTI output's"
    assert np.array_equal(np.asarray(back.affine), np.asarray(affine)), "affine differs from the NIfTI output's"
    src = {_source_uid(ds): ds for _, ds in dicom_series(source)}
    files = _files(out)
    assert len(files) == len(src)
    written = [pydicom.dcmread(f) for f in files]  # no force: a proper preamble and file meta header
    uids = {d.SOPInstanceUID for d in written}
    assert len(uids) == len(files) and not uids & set(src)
    assert len({d.SeriesInstanceUID for d in written}) == 1
    assert written[0].SeriesInstanceUID not in {str(s.get("SeriesInstanceUID", "")) for s in src.values()}
    refs = [d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in written]
    assert sorted(refs) == sorted(src), "Source Image Sequence must reference each source slice once"
    for d in written:
        ref = d.SourceImageSequence[0]
        s = src[ref.ReferencedSOPInstanceUID]
        assert ref.ReferencedSOPClassUID == CTImageStorage and ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation"):
            assert d[kw].value == s[kw].value, kw
        for kw in ("RescaleSlope", "RescaleIntercept", "FrameOfReferenceUID", "Modality", "KVP"):
            assert d[kw].value == s[kw].value, kw
        # General Equipment: the software that made the series, not the scanner
        assert (d.Manufacturer, d.ManufacturerModelName, d.SoftwareVersions) == (
            "fvae-ct",
            derived_by.split(" ")[0],
            derived_by,
        )
        assert s.Manufacturer != "fvae-ct" and not {"StationName", "DeviceSerialNumber"} & set(d.dir())
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
            assert str(d[kw].value) == str(s[kw].value), kw
        assert (d.Rows, d.Columns) == (s.Rows, s.Columns)
        assert list(d.ImageType[:2]) == ["DERIVED", "SECONDARY"] and d.SOPClassUID == CTImageStorage
        assert (d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation) == (16, 16, 15, 1)
        assert d.pixel_array.dtype == np.int16 and d.DerivationDescription.startswith("fvae-ct reconstruction")
        assert derived_by in d.SeriesDescription and derived_by in d.DerivationDescription
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.file_meta.MediaStorageSOPClassUID == d.SOPClassUID
        pydicom.dataset.validate_file_meta(d.file_meta, enforce_standard=True)
        assert d.ContentDate == d.InstanceCreationDate and len(d.ContentDate) == 8
    return written, src


def test_both_writes_a_derived_series_the_reader_gives_back_as_the_nifti(both_run, dicom_dir):
    out, summary, before, after = both_run
    assert before == after, "the input series folder changed"
    case = summary["cases"][0]
    nifti = out / "dicom_series_512_recon.nii.gz"
    folder = out / f"dicom_series_512{DICOM_SUFFIX}"
    assert (case["output"], case["output_dicom"]) == (str(nifti), str(folder))
    img = nib.load(str(nifti))
    hu = np.asarray(img.dataobj)
    clipped = np.clip(np.round(load_ct(dicom_dir)[0].numpy()), -1000, 1000)  # the HU window
    assert np.array_equal(hu, clipped), "the identity VAE changed voxels"
    written, src = _check_series(folder, dicom_dir, hu, img.affine)
    # the sample is anonymised (no StudyInstanceUID, no SeriesNumber): a new study UID, said in the warnings
    assert all(not str(s.get("StudyInstanceUID", "")) for s in src.values())
    assert len({d.StudyInstanceUID for d in written}) == 1 and written[0].StudyInstanceUID
    assert any("no StudyInstanceUID" in w for w in case["warnings"])
    assert {d.SeriesNumber for d in written} == {SERIES_NUMBER_OFFSET}
    assert [d.InstanceNumber for d in sorted(written, key=lambda d: float(d.ImagePositionPatient[2]))][:2] == [20, 19]
    assert is_own_series(folder) and not is_own_series(dicom_dir)


def test_every_file_passes_pydicoms_strict_reading_and_writing(both_run):
    folder = both_run[0] / f"dicom_series_512{DICOM_SUFFIX}"
    for f in _files(folder):
        with pydicom.config.strict_reading():
            ds = pydicom.dcmread(f)
            for elem in ds.iterall():  # values are validated as they are converted
                _ = elem.value
        again = f.parent.parent / "again.dcm"
        ds.save_as(again, enforce_file_format=True)
        assert again.read_bytes() == f.read_bytes(), f"{f.name} is not what pydicom writes for its own dataset"


def test_a_complete_source_keeps_its_study_and_patient(complete_series, tmp_path):
    img = load_ct(complete_series)
    hu = np.round(img[0].numpy()).astype(np.int16)
    rng = np.random.default_rng(0)  # a non-trivial array: every voxel changed, values over the whole window
    rec = np.clip(hu + rng.integers(-300, 300, hu.shape), -1024, 3000).astype(np.int16)
    out = tmp_path / f"c{DICOM_SUFFIX}"
    notes = write_derived_series(complete_series, rec, img.affine, out, "taef2", "fvae_recon 9.9")
    assert notes == []
    written, src = _check_series(out, complete_series, rec, img.affine, "fvae_recon 9.9")
    assert {d.StudyInstanceUID for d in written} == {STUDY_UID} and written[0].SeriesInstanceUID != SOURCE_SERIES_UID
    assert {d.SeriesNumber for d in written} == {3 + SERIES_NUMBER_OFFSET}
    for d in written:
        assert {k: str(d[k].value) for k in PATIENT} == PATIENT and {k: str(d[k].value) for k in STUDY} == STUDY
        assert d.SeriesDescription == "taef2 VAE reconstruction, fvae_recon 9.9"
        assert "frozen VAE taef2" in d.DerivationDescription


def test_slices_are_matched_by_geometry_not_by_order(complete_series, tmp_path):
    img = load_ct(complete_series)
    hu = np.round(img[0].numpy()).astype(np.int16)
    aff = np.asarray(img.affine)
    write_derived_series(complete_series, hu, aff, tmp_path / "plain", "identity", "t")
    # the same volume stored with x flipped and x / y swapped: another voxel order, the same world
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = hu.shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    for name, vol, a in (("flipped", hu[::-1], aff @ flip), ("swapped", hu.transpose(1, 0, 2), aff @ swap)):
        write_derived_series(complete_series, np.ascontiguousarray(vol), a, tmp_path / name, "identity", "t")
        pix = {_source_uid_ref(d): d.pixel_array for d in map(pydicom.dcmread, _files(tmp_path / name))}
        for d in map(pydicom.dcmread, _files(tmp_path / "plain")):
            assert np.array_equal(pix[_source_uid_ref(d)], d.pixel_array), name
    # off the grid by half a slice, or one slice too many: refused in one line
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, 2] * 0.5
    with pytest.raises(InputError, match=r"does not lie on the reconstruction's voxel grid") as e:
        write_derived_series(complete_series, hu, shifted, tmp_path / "x", "identity", "t")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"its 20 slices do not match the reconstruction's 21 slices one to one"):
        write_derived_series(complete_series, np.concatenate([hu, hu[..., :1]], 2), aff, tmp_path / "x", "id", "t")
    with pytest.raises(InputError, match=r"do not lie along the reconstruction's \(512, 256, 20\) voxel grid"):
        write_derived_series(complete_series, hu[:, :256], aff, tmp_path / "x", "identity", "t")
    assert not (tmp_path / "x").exists()


def _source_uid_ref(ds):
    return ds.SourceImageSequence[0].ReferencedSOPInstanceUID


def test_values_the_source_rescale_cannot_hold_are_refused(complete_series, tmp_path):
    img = load_ct(complete_series)
    hu = np.round(img[0].numpy()).astype(np.int16)
    with pytest.raises(InputError, match=r"RescaleIntercept -1024 cannot store the reconstruction's value 32000 HU"):
        write_derived_series(complete_series, np.full_like(hu, 32000), img.affine, tmp_path / "x", "id", "t")
    halves = tmp_path / "halves"
    shutil.copytree(complete_series, halves)
    for f in _files(halves):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = 2
        ds.save_as(f)
    odd = np.full_like(hu, 1)
    with pytest.raises(InputError, match=r"RescaleSlope 2 / RescaleIntercept -1024 cannot store .* value 1 HU exactly"):
        write_derived_series(halves, odd, img.affine, tmp_path / "x", "identity", "t")
    assert not (tmp_path / "x").exists()
    write_derived_series(halves, odd + 1, img.affine, tmp_path / "even", "identity", "t")  # even values fit
    assert np.array_equal(load_ct(tmp_path / "even", check_hu=False)[0].numpy(), odd + 1)


def test_a_nifti_input_fails_its_case_with_dicom_and_the_batch_goes_on(dicom_dir, assets, tmp_path):
    nifti = assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"
    with pytest.raises(BatchFailure):
        _workflow(tmp_path / "dicom", "dicom").run([str(nifti), str(dicom_dir)])
    summary = json.loads((tmp_path / "dicom" / "summary.json").read_text())
    assert [f["error"] for f in summary["failures"]] == [
        f"InputError: {nifti}: output_format dicom needs a DICOM series input"]
    assert [c["case"] for c in summary["cases"]] == ["dicom_series_512"]
    assert summary["cases"][0]["output"] == ""  # dicom only: no NIfTI
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir() if not p.name.startswith(".")) == [
        f"dicom_series_512{DICOM_SUFFIX}", "metrics.csv", "summary.json"]
    # both: the NIfTI case gets its NIfTI and a warning, no series
    summary = _workflow(tmp_path / "both", "both").run(str(nifti))
    case = summary["cases"][0]
    assert case["output_dicom"] == "" and case["output"].endswith("_recon.nii.gz")
    assert "no DICOM series written: the input is not a DICOM series folder" in case["warnings"]
    assert not list((tmp_path / "both").glob(f"*{DICOM_SUFFIX}"))


@pytest.mark.parametrize("value", ["dcm", "", None, 1])
def test_a_bad_output_format_is_one_option_error(value, tmp_path):
    with pytest.raises(OptionError, match=r"^output_format .*: give one of nifti, dicom, both$"):
        _workflow(tmp_path, value)
    assert _workflow(tmp_path, " DICOM ").output_format == "dicom"


def test_skip_existing_reuses_a_complete_series_and_rewrites_a_broken_one(dicom_dir, tmp_path):
    out = tmp_path / "out"
    _workflow(out, "dicom").run(str(dicom_dir))
    folder = out / f"dicom_series_512{DICOM_SUFFIX}"
    first = _hashes(folder)
    row = _workflow(out, "dicom", skip_existing=True).run(str(dicom_dir))["cases"][0]
    assert row["status"] == "skipped" and _hashes(folder) == first  # reused, not written again
    assert not (out / "dicom_series_512_recon.nii.gz").exists()
    _files(folder)[4].unlink()  # a series missing a slice is not reused
    row = _workflow(out, "dicom", skip_existing=True).run(str(dicom_dir))["cases"][0]
    assert row["status"] == "ok" and any("dicom_series_512_recon_dicom): written again" in w for w in row["warnings"])
    assert len(_files(folder)) == 20 and existing_series(folder, (512, 512, 20), load_ct(dicom_dir).affine)[0] is not None
    # both, from a dicom-only run: the NIfTI comes from the series' voxels, nothing is reconstructed
    row = _workflow(out, "both", skip_existing=True).run(str(dicom_dir))["cases"][0]
    assert row["status"] == "skipped" and row["output"].endswith("_recon.nii.gz")
    voxels = np.asarray(nib.load(row["output"]).dataobj)
    assert np.array_equal(voxels, load_ct(folder, check_hu=False)[0].numpy())


def test_our_series_in_the_input_folder_is_no_case_and_a_foreign_folder_is_not_replaced(dicom_dir, tmp_path):
    shutil.copytree(dicom_dir, tmp_path / "a")
    _workflow(tmp_path, "dicom").run(str(tmp_path))  # output folder = input folder
    assert [c.name for c in list_cases(str(tmp_path), tmp_path)] == ["a"]
    foreign = tmp_path / "out" / f"a{DICOM_SUFFIX}"
    shutil.copytree(dicom_dir, foreign)  # someone's series under the output name: never replaced
    before = _hashes(foreign)
    with pytest.raises(BatchFailure):
        _workflow(tmp_path / "out", "dicom").run(str(tmp_path / "a"))
    failure = json.loads((tmp_path / "out" / "summary.json").read_text())["failures"][0]["error"]
    assert failure == f"InputError: {foreign}: exists and is not an earlier output of fvae-ct: not replaced; move it " \
        "away or use another output folder"
    assert _hashes(foreign) == before


def test_an_interrupted_write_leaves_no_series(complete_series, tmp_path, monkeypatch):
    img = load_ct(complete_series)
    hu = np.round(img[0].numpy()).astype(np.int16)
    out = tmp_path / f"c{DICOM_SUFFIX}"
    write_derived_series(complete_series, hu, img.affine, out, "identity", "t")
    old = _hashes(out)
    save, calls = pydicom.dataset.Dataset.save_as, []

    def ctrl_c_at_the_third_file(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return save(self, *a, **kw)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", ctrl_c_at_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        write_derived_series(complete_series, hu + 1, img.affine, out, "identity", "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name] and _hashes(out) == old  # the old series, whole


@pytest.mark.slow
def test_a_killed_write_leaves_only_a_hidden_temporary(complete_series, tmp_path):
    out = tmp_path / f"c{DICOM_SUFFIX}"
    code = f"""
import os, signal, numpy as np, pydicom
from fvae_ct.io import load_ct
from fvae_ct.recon.dicom_output import write_derived_series
img = load_ct({str(complete_series)!r})  # (reading the scrambled series saves a renumbered copy: before the patch)
save, n = pydicom.dataset.Dataset.save_as, []
def killed_at_the_fourth_file(self, *a, **kw):
    n.append(1)
    if len(n) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, *a, **kw)
pydicom.dataset.Dataset.save_as = killed_at_the_fourth_file
write_derived_series({str(complete_series)!r}, np.round(img[0].numpy()), img.affine, {str(out)!r}, "identity", "t")
"""
    r = run([PY, "-c", code])
    assert r.returncode == -9, r.stderr[-2000:]
    left = list(tmp_path.iterdir())
    assert not out.exists() and len(left) == 1 and left[0].name.startswith(f".{out.name}.")
    assert len(list(left[0].iterdir())) == 3  # three slices were written when it was killed
    assert clean_temporaries(tmp_path) == left and not list(tmp_path.iterdir())  # the next run's clean-up


def test_dciodvfy_finds_no_error(both_run):
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    f = _files(both_run[0] / f"dicom_series_512{DICOM_SUFFIX}")[0]
    r = subprocess.run([exe, str(f)], capture_output=True, text=True)
    lines = (r.stdout + r.stderr).splitlines()
    assert "CTImage" in lines and not [x for x in lines if x.startswith("Error")], "\n".join(lines)


def test_the_bundle_version_names_the_software(tmp_path):
    assert bundle_version("fvae_recon") == f"fvae_recon {VERSION}"
    assert bundle_version("fvae_recon", tmp_path) == f"fvae_recon {VERSION}"  # not a bundle: the repository's
    assert _workflow(tmp_path).derived_by == f"fvae_recon {VERSION}"
