"""DICOM series geometry (issue 12, points 2-4 and gantry tilt): copies of 5 slices of the real 512x512 series,
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

    from fvae_ct.io import _reading_order, dicom_series

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
