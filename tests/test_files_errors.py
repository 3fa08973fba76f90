"""File-system conditions met as one line, not a traceback or silence: an output folder that cannot be written,
broken and looping symbolic links among the inputs, an FVAE_ASSETS folder that does not exist. Real conditions only:
/sys is read-only even for root, links are real links."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PY, run

from fvae_ct.errors import InputError, WeightsError
from fvae_ct.io import discover_cases, folder_lock, load_ct
from fvae_ct.recon import BatchFailure, ReconWorkflow
from fvae_ct.vae import load

READ_ONLY = Path("/sys")  # sysfs: creating a file in its root fails with EACCES, for root too


def _ct(path):
    img = np.full((24, 20, 4), -1000, np.int16)
    img[4:-4, 4:-4] = 40
    nib.save(nib.Nifti1Image(img, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))


def _can_write(folder: Path) -> bool:
    try:
        os.close(os.open(folder / ".fvae_probe", os.O_RDWR | os.O_CREAT))
        os.unlink(folder / ".fvae_probe")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or _can_write(READ_ONLY), reason="needs a read-only /sys")
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^/sys: cannot write here \(read-only\?\)"):
        with folder_lock(READ_ONLY, "test"):
            pass
    (tmp_path / "afile").write_text("x")  # a folder below a regular file
    with pytest.raises(InputError, match=rf"^{tmp_path}/afile/out: cannot write here \(read-only\?\)"):
        with folder_lock(tmp_path / "afile" / "out", "test"):
            pass
    src = tmp_path / "in"
    src.mkdir()
    _ct(src / "c.nii.gz")
    for out in (READ_ONLY, READ_ONLY / "fvae_out"):  # an existing one, and one that cannot be created
        with pytest.raises(InputError, match=rf"^{out}: cannot write here \(read-only\?\)"):
            ReconWorkflow(load("identity"), str(out), figures=False, progress=False).run(str(src))
    # the command line: one line, exit code 1, no traceback
    r = run([PY, "-m", "fvae_ct.cli", "recon", "--input", str(src), "--output_dir", str(READ_ONLY / "fvae_out"),
             "--vae", "identity", "--figures", "false"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"fvae recon: {READ_ONLY / 'fvae_out'}: cannot write here (read-only?): "), r.stderr  # + the OS's reason


def test_broken_and_looping_links_are_failed_cases_not_dropped(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _ct(src / "good.nii.gz")
    (src / "loop.nii.gz").symlink_to("loop.nii.gz")
    (src / "share_scan").symlink_to("/mnt/fvae-unmounted-share/scan01")
    names = [c.name for c in discover_cases(src)]
    assert names == ["good", "loop", "share_scan"], names
    with pytest.raises(InputError, match=r"loop.nii.gz: symbolic link loop$"):
        load_ct(src / "loop.nii.gz")
    with pytest.raises(InputError, match=r"share_scan: broken symbolic link to /mnt/fvae-unmounted-share/scan01 "):
        load_ct(src / "share_scan")
    with pytest.raises(InputError, match=r"share_scan: broken symbolic link"):  # given as the input itself
        discover_cases(src / "share_scan")
    out = tmp_path / "out"
    with pytest.raises(BatchFailure, match=r"2 of 3 case\(s\) failed") as e:
        ReconWorkflow(load("identity"), str(out), figures=False, progress=False).run(str(src))
    assert "symbolic link loop" in str(e.value) and "broken symbolic link to /mnt/fvae-unmounted-share" in str(e.value)
    assert (out / "good_recon.nii.gz").exists()  # the batch went on with the others


def test_an_fvae_assets_folder_that_does_not_exist_is_named(tmp_path, monkeypatch, caplog):
    from fvae_ct import assets

    missing = tmp_path / "no_such_assets"
    monkeypatch.setenv("FVAE_ASSETS", f"{missing}{os.pathsep}{tmp_path}")
    monkeypatch.setenv("FVAE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="fvae_ct"):
        assert assets.search_path() == [tmp_path]
    assert any(f"FVAE_ASSETS: {missing} does not exist" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(WeightsError, match=rf"not found in .*{tmp_path}.*; FVAE_ASSETS also names {missing}, which does "
                                           r"not exist"):
        assets.resolve("taef2_encoder")


def test_a_folder_mixing_dicom_and_nifti_is_refused_not_read_as_one_series(dicom_dir, tmp_path):
    import shutil

    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(next(iter(sorted(dicom_dir.glob("*.dcm")))), d / "one.dcm")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(d / "case.nii.gz"))
    with pytest.raises(InputError, match=r"folder mixes DICOM files with 1 NIfTI file\(s\) \(case.nii.gz\)"):
        discover_cases(d)


def test_entries_of_a_case_folder_that_are_not_cases_are_named_in_the_log(tmp_path, caplog):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(tmp_path / "case.nii.gz"))
    (tmp_path / "notes.txt").write_text("scan protocol")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="fvae_ct"):
        cases = discover_cases(tmp_path)
    assert [c.name for c in cases] == ["case"]
    assert "2 entries neither NIfTI files nor DICOM series folders, left out: empty/, notes.txt" in caplog.text
