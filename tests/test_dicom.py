"""DICOM series geometry (gaps, mixed geometry, gantry tilt): copies of 5 slices of the real 512x512 series,
edited with pydicom."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from fvae_ct.errors import InputError
from fvae_ct.io import load_ct


def _series(src_dir, dest, edit=None, n=5, skip=()):
    """The first ``n`` slices of the sample series into ``dest``; ``edit(i, ds)`` may change each dataset."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(src_dir.glob("*.dcm"), key=lambda f: int(pydicom.dcmread(str(f), stop_before_pixels=True)
                                                               .InstanceNumber))[:n]
    for i, f in enumerate(files):
        if i in skip:
            continue
        ds = pydicom.dcmread(str(f))
        if edit is not None:
            edit(i, ds)
        ds.save_as(str(dest / f"slice_{i:02d}.dcm"))
    return dest


@pytest.fixture(scope="module")
def reference(dicom_dir, tmp_path_factory):
    return load_ct(_series(dicom_dir, tmp_path_factory.mktemp("ref") / "s"))


def test_slices_are_ordered_by_position_not_instance_number(dicom_dir, reference, tmp_path):
    perm = [3, 0, 4, 1, 2]

    def scramble(i, ds):
        ds.InstanceNumber = 100 + perm[i]

    from fvae_ct.dicom_folder import _reading_order, dicom_series

    assert _reading_order(dicom_series(_series(dicom_dir, tmp_path / "plain"))) is None  # read as it was
    img = load_ct(_series(dicom_dir, tmp_path / "s", scramble))
    assert img.shape == reference.shape == (1, 512, 512, 5)
    # the same voxels at the same world positions (the reading direction may differ: compare in RAS)
    from monai.transforms import Orientation

    a, b = Orientation("RAS")(img), Orientation("RAS")(reference)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-4)


def test_two_series_in_one_folder_are_listed_not_merged(dicom_dir, tmp_path):
    d = _series(dicom_dir, tmp_path / "s")

    def other(i, ds):
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.SeriesDescription = "second"
        ds.SOPInstanceUID = f"1.2.3.4.5.{i}"

    _series(dicom_dir, tmp_path / "x", other, n=3)
    for f in (tmp_path / "x").iterdir():
        f.rename(d / f"other_{f.name}")
    with pytest.raises(InputError, match=r"2 DICOM series in one folder .*1\.2\.3\.4\.5 'second' 3 slices"):
        load_ct(d)


def test_a_missing_slice_is_refused(dicom_dir, tmp_path):
    with pytest.raises(InputError, match=r"non-uniform slice spacing: 4 mm between slice_0[13].dcm and slice_0[13].dcm, median 2 mm"):
        load_ct(_series(dicom_dir, tmp_path / "s", skip=(2,)))


def test_gantry_tilt_and_duplicate_positions_are_refused(dicom_dir, tmp_path):
    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * i, z]  # 0.5 mm per 2 mm slice: about 14 degrees

    with pytest.raises(InputError, match=r"gantry tilt of 14\.0 degrees"):
        load_ct(_series(dicom_dir, tmp_path / "t", tilt))

    def dup(i, ds):
        if i == 4:
            ds.ImagePositionPatient = list(pydicom.dcmread(str(tmp_path / "d" / "slice_03.dcm")).ImagePositionPatient)

    with pytest.raises(InputError, match="two slices at one position"):
        load_ct(_series(dicom_dir, tmp_path / "d", dup))


def test_non_ct_modality_is_flagged_and_recorded(dicom_dir, tmp_path, caplog):
    """Point 5: a Modality other than CT is processed but warned about loudly and recorded (info -> summary.json)."""

    def mr(i, ds):
        ds.Modality = "MR"

    info = {}
    with pytest.warns(UserWarning, match="DICOM Modality is MR, not CT"):
        load_ct(_series(dicom_dir, tmp_path / "mr", mr), info=info)
    assert info["modality"] == "MR" and any("Modality is MR" in w for w in info["warnings"])
    ct = {}
    load_ct(_series(dicom_dir, tmp_path / "ct"), info=ct)
    assert ct == {"modality": "CT", "warnings": []}


@pytest.mark.parametrize("edit,message", [
    (lambda i, ds: setattr(ds, "PixelSpacing", [0.9, 0.9]) if i == 3 else None, "different pixel spacing"),
    (lambda i, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.96, 0.28]) if i == 2 else None,
     "different orientations"),
])
def test_mixed_slice_geometry_is_refused(dicom_dir, tmp_path, edit, message):
    """MONAI's reader stacks slices of different pixel spacing with only a warning (the volume gets the first
    slice's spacing): refused, naming the slice."""
    with pytest.raises(InputError, match=message + r" \(slice_00\.dcm.*slice_0[23]\.dcm"):
        load_ct(_series(dicom_dir, tmp_path / "s", edit))


def test_reader_warnings_go_to_the_log_not_away(dicom_dir, tmp_path, caplog, recwarn):
    """Point 5: the image reader's own warnings are no longer switched off: they reach the fvae_ct log with the
    file. A pixel spacing 2e-5 apart (within our tolerance, outside MONAI's) makes MONAI warn."""
    import logging

    def tiny(i, ds):
        if i == 4:
            ds.PixelSpacing = [float(v) * (1 + 2e-5) for v in ds.PixelSpacing]

    d = _series(dicom_dir, tmp_path / "s", tiny)
    with caplog.at_level(logging.WARNING, logger="fvae_ct"):
        load_ct(d)
    msgs = [r.getMessage() for r in caplog.records if r.name == "fvae_ct"]
    assert any(m.startswith(f"{d}: reader UserWarning: the list contains slices that have different spacings")
               for m in msgs), msgs
    assert not [w for w in recwarn if "different spacings" in str(w.message)]  # logged, not re-raised


# ---- non-image objects, DICOMDIR exports, Enhanced CT, one slice, decoders ----------------------
def _uids(i, ds):
    """What a DICOMDIR record needs (the sample series is anonymised to empty UIDs)."""
    ds.PatientID, ds.StudyID, ds.SeriesNumber = "P1", "1", 4
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.1.4"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", f"1.2.826.0.1.3680043.99.1.4.{i + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _dicomdir_export(dicom_dir, root, extra=()):
    """A CD-style export written by pydicom's FileSet: DICOMDIR + PT*/ST*/SE*/IM* (5 CT slices; ``extra``: more
    datasets, e.g. a localizer)."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in sorted(_series(dicom_dir, root.parent / "src", _uids).iterdir()):
        fs.add(pydicom.dcmread(str(f)))
    for ds in extra:
        fs.add(ds)
    fs.write(str(root))
    return root


def test_dicomdir_and_non_image_objects_in_a_series_folder_are_left_out(dicom_dir, reference, tmp_path, caplog):
    """Item 7: a DICOMDIR index and a non-image object (a presentation state: no pixel data) beside the slices."""
    import logging

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    d = _series(dicom_dir, tmp_path / "s")
    cd = _dicomdir_export(dicom_dir, tmp_path / "cd")
    (d / "DICOMDIR").write_bytes((cd / "DICOMDIR").read_bytes())
    pr = Dataset()
    pr.SOPClassUID, pr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", "1.2.3.9"  # Grayscale Softcopy Pres. State
    pr.SeriesInstanceUID, pr.Modality = "1.2.3.9.1", "PR"
    pr.file_meta = FileMetaDataset()
    pr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pr.save_as(str(d / "ps.dcm"), enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="fvae_ct"):
        img = load_ct(d)
    assert np.array_equal(np.asarray(img), np.asarray(reference))
    msgs = [r.getMessage() for r in caplog.records if "non-image" in r.getMessage()]
    assert len(msgs) == 1 and "DICOMDIR (Media Storage Directory Storage)" in msgs[0] and "ps.dcm" in msgs[0], msgs


def test_dicomdir_export_is_followed_to_its_ct_series(dicom_dir, reference, tmp_path, caplog):
    """Item 8: the root of a CD export is one case per CT series (a localizer left out, logged); load_ct of the root
    itself says it is an export and lists the series folders."""
    import logging

    from fvae_ct.io import discover_cases

    scout = pydicom.dcmread(str(sorted(dicom_dir.glob("*.dcm"))[0]))
    _uids(9, scout)
    scout.SeriesInstanceUID, scout.SeriesNumber, scout.ImageType = "1.2.826.0.1.3680043.99.1.1", 1, ["ORIGINAL",
                                                                                                    "PRIMARY",
                                                                                                    "LOCALIZER"]
    root = _dicomdir_export(dicom_dir, tmp_path / "cd1", [scout])
    with caplog.at_level(logging.WARNING, logger="fvae_ct"):
        cases = discover_cases(root)
    assert [c.name for c in cases] == ["cd1_S4_CT_Body_3.0"], cases
    assert np.array_equal(np.asarray(load_ct(cases[0].path)), np.asarray(reference))
    assert any("left out" in r.getMessage() and "'CT Body 3.0', 1 images" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match=r"cd1: folder is a DICOMDIR export \(CD/DVD\), not one series: pass one of "
                                         r"its CT series folders \(PT000000/ST000000/SE000000\)"):
        load_ct(root)
    # a folder of exports: each export's series
    assert [c.name for c in discover_cases(tmp_path)] == ["cd1_S4_CT_Body_3.0", "src"]  # "src": the FileSet's source


def _enhanced(dicom_dir, path, n=5, edit=None):
    """One Enhanced CT multi-frame file made of the first ``n`` sample slices (geometry in functional groups)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    src = sorted(_series(dicom_dir, path.parent / "classic", n=n).iterdir())
    slices = [pydicom.dcmread(str(f)) for f in src]
    first = slices[0]
    ds = Dataset()
    for k in ("Modality", "StudyDate", "SeriesDescription", "PatientPosition"):
        setattr(ds, k, first.get(k))
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.7", "1.2.3.7.1"
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(slices), first.Rows, first.Columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack([s.pixel_array.astype(np.uint16) for s in slices]).tobytes()

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return Sequence([d])

    shared = Dataset()
    shared.PlaneOrientationSequence = item(ImageOrientationPatient=list(first.ImageOrientationPatient))
    shared.PixelMeasuresSequence = item(PixelSpacing=list(first.PixelSpacing), SliceThickness=first.SliceThickness)
    shared.PixelValueTransformationSequence = item(RescaleSlope=first.RescaleSlope,
                                                   RescaleIntercept=first.RescaleIntercept, RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i, s in enumerate(slices):
        f = Dataset()
        f.PlanePositionSequence = item(ImagePositionPatient=list(s.ImagePositionPatient))
        if edit is not None:
            edit(i, f)
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_enhanced_ct_multiframe_is_read_like_a_classic_series(dicom_dir, reference, tmp_path):
    """Item 9: one Enhanced CT file (alone, or alone in its folder) gives the classic series' voxels and grid; its
    frames are checked like slices (a missing frame: non-uniform spacing)."""
    f = _enhanced(dicom_dir, tmp_path / "mf" / "enhanced.dcm")
    for p in (f, f.parent):
        img = load_ct(p)
        assert img.shape == reference.shape and np.array_equal(np.asarray(img), np.asarray(reference))
        assert np.allclose(np.asarray(img.affine), np.asarray(reference.affine), atol=1e-4)

    def gap(i, fr):
        if i == 4:
            x, y, z = fr.PlanePositionSequence[0].ImagePositionPatient
            fr.PlanePositionSequence[0].ImagePositionPatient = [x, y, float(z) - 2]

    with pytest.raises(InputError, match=r"bad.dcm: non-uniform slice spacing: 4 mm between frame_000[45].dcm"):
        load_ct(_enhanced(dicom_dir, tmp_path / "g" / "bad.dcm", edit=gap))


def test_one_slice_series_is_a_volume_like_a_one_slice_nifti(dicom_dir, reference, tmp_path):
    """Item 10: load_ct takes a 3D NIfTI of depth 1 (only a 2D array is refused): a one-slice series is read the
    same way, [1, 512, 512, 1], its slice thickness (3 mm) as third spacing."""
    img = load_ct(_series(dicom_dir, tmp_path / "one", n=1))
    assert img.shape == (1, 512, 512, 1)
    assert np.array_equal(np.asarray(img)[..., 0], np.asarray(reference)[..., 0])
    assert np.allclose(np.abs(np.asarray(img.affine)[:3, :3]), np.diag([0.9765625, 0.9765625, 3.0]))


def test_a_slice_without_position_is_named(dicom_dir, tmp_path):
    def drop(i, ds):
        if i == 2:
            del ds.ImagePositionPatient

    with pytest.raises(InputError, match=r"1 of 5 slice\(s\) without ImagePositionPatient .*\(slice_02\.dcm\)"):
        load_ct(_series(dicom_dir, tmp_path / "s", drop))


def test_a_missing_pixel_decoder_is_named(dicom_dir, tmp_path):
    """Item 10: a transfer syntax no installed decoder reads names the packages to install, not 'corrupt file'."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    ts = next((t for t in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203")
               if not get_decoder(t).is_available), None)
    if ts is None:
        pytest.skip("every compressed transfer syntax has a decoder here")

    def compressed(i, ds):
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([b"\x00" * 64])

    with pytest.raises(InputError, match=r"s: .*pixel data \(transfer syntax .*\) needs a decoder that is not "
                                         r"installed: .*requires .*\(pip install pylibjpeg"):
        load_ct(_series(dicom_dir, tmp_path / "s", compressed))


@pytest.mark.parametrize("where", [0, 4])  # the first and the last slice: no gap would show either
def test_a_slice_behind_a_broken_link_is_refused_not_skipped(dicom_dir, tmp_path, where):
    s = _series(dicom_dir, tmp_path / "s")
    (s / f"slice_{where:02d}.dcm").rename(tmp_path / "elsewhere.dcm")
    (s / f"slice_{where:02d}.dcm").symlink_to(tmp_path / "share" / "slice.dcm")  # the share is not mounted
    with pytest.raises(InputError, match=rf"1 broken or looping symbolic link\(s\) among the files \(slice_0{where}"):
        load_ct(s)
