"""The split of ``fvae_ct.io`` (reading) from ``cases`` (finding cases), ``dicom_folder`` (checking a DICOM series)
and ``outputs`` (writing), and the one datalist rule set behind ``discover_cases`` and ``checked_io.image_datalist``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fvae_ct import cases, dicom_folder, io, outputs
from fvae_ct.checked_io import image_datalist
from fvae_ct.errors import InputError


def test_io_reexports_the_names_of_the_split_modules():
    owners = {"cases": cases, "dicom_folder": dicom_folder, "outputs": outputs}
    for name in io.__all__:
        obj = getattr(io, name)
        owner = next((m for m in owners.values() if name in m.__all__), io)
        assert obj is getattr(owner, name), name
    assert set(cases.__all__) - {"is_nifti", "broken_link", "NIFTI_SUFFIXES"} <= set(io.__all__)
    assert set(outputs.__all__) <= set(io.__all__) and set(dicom_folder.__all__) <= set(io.__all__)
    assert io.OUTPUT_MARK == "fvae-ct reconstruction" and io.SLICE_GAP_TOLERANCE == 0.05


def _nifti(path):
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.int16), np.eye(4)), str(path))
    return str(path)


def test_image_datalist_reads_a_datalist_as_discover_cases_does(tmp_path):
    a, b = _nifti(tmp_path / "a.nii.gz"), _nifti(tmp_path / "b.nii")
    listing = tmp_path / "list.json"
    # "testing" comes before "training" (CASE_SECTIONS); a list-valued image is its first file; relative paths resolve
    listing.write_text(
        json.dumps({"training": [{"image": "b.nii"}], "testing": [{"image": ["a.nii.gz", "b.nii"]}, "b.nii"]})
    )
    assert image_datalist(listing) == [{"image": a}, {"image": b}]
    assert [(c.name, c.path) for c in cases.discover_cases(listing)] == [("a", a), ("b", b)]
    assert image_datalist(tmp_path / "a.nii.gz") == [{"image": a}]


@pytest.mark.parametrize("reader", [image_datalist, cases.discover_cases])
def test_a_missing_or_malformed_datalist_is_one_line_naming_it(tmp_path, reader):
    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match=r"missing.json: datalist JSON does not exist$"):
        reader(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(InputError, match=r"bad.json: not valid JSON") as e:
        reader(bad)
    assert "\n" not in str(e.value)
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"labels": []}))
    with pytest.raises(InputError, match=r"nokey.json: datalist JSON needs a list of .* under 'testing'"):
        reader(nokey)


def test_a_folder_named_json_is_a_folder_and_a_broken_link_says_so(tmp_path):
    d = tmp_path / "cases.json"
    d.mkdir()
    a = _nifti(d / "a.nii.gz")
    assert [(c.name, c.path) for c in cases.discover_cases(d)] == [("a", a)]
    link = tmp_path / "gone.json"
    link.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(InputError, match=r"gone.json: broken symbolic link to .*nowhere.json"):
        cases.discover_cases(link)
