"""Batch bookkeeping of the reconstruction workflow : inputs are never written over,
metrics.csv survives interruptions (SIGINT, SIGKILL) and a resume leaves one row per case, one run per folder,
corrupt outputs recomputed, inf PSNR and n/a SSIM recorded, warnings per case."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import PY, barrier_env, wait_blocked

from fvae_ct.errors import InputError
from fvae_ct.io import OUTPUT_MARK, folder_lock, is_own_output
from fvae_ct.recon import BatchFailure, ReconWorkflow
from fvae_ct.vae import load

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _ct(path, seed=0, shape=(40, 36, 6), scale=1.0):
    """A small CT-like volume: air around a body of soft tissue with a bright structure (integer HU)."""
    g = np.random.default_rng(seed)
    img = np.full(shape, -1000, np.int16)
    img[4:-4, 4:-4] = 40 + g.integers(-20, 20, size=(shape[0] - 8, shape[1] - 8, shape[2]))
    img[10:16, 12:20] = 300 + 50 * seed
    data = (img * scale).astype(np.float32) if scale != 1.0 else img
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return img


def _identity(out, **kw):
    return ReconWorkflow(load("identity"), str(out), figures=kw.pop("figures", False), progress=False, **kw)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_an_input_named_like_an_output_is_never_written_over(tmp_path):
    """Output folder = input folder holding ``a.nii.gz`` and the user's own ``a_recon.nii.gz``: that file is an input
    (it has not our header mark), is reconstructed as case ``a_recon``, and case ``a`` refuses to overwrite it."""
    _ct(tmp_path / "a.nii.gz", 1)
    _ct(tmp_path / "a_recon.nii.gz", 2)
    before = _sha(tmp_path / "a_recon.nii.gz")
    wf = _identity(tmp_path)
    assert [c.name for c in wf.cases(str(tmp_path))] == ["a", "a_recon"]
    with pytest.raises(BatchFailure, match=r"1 of 2 case\(s\) failed:\n  a .*refusing to overwrite an input file"):
        wf.run(str(tmp_path))
    assert _sha(tmp_path / "a_recon.nii.gz") == before
    assert is_own_output(tmp_path / "a_recon_recon.nii.gz") and not is_own_output(tmp_path / "a_recon.nii.gz")
    # our own reconstructions in the folder (marked) are not inputs of the next run
    b = tmp_path / "b"
    b.mkdir()
    _ct(b / "x.nii.gz", 3)
    _identity(b).run(str(b))
    assert OUTPUT_MARK in bytes(nib.load(str(b / "x_recon.nii.gz")).header["descrip"].item()).decode()
    assert [c.name for c in _identity(b).cases(str(b))] == ["x"]


def test_output_mark_keeps_the_data_type_without_a_like_header(tmp_path):
    """DICOM inputs have no NIfTI header to reuse: the marked output is still int16 with the affine given."""
    from fvae_ct.io import save_nifti_atomic

    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3) - 30
    p = save_nifti_atomic(data, AFFINE, tmp_path / "x_recon.nii.gz", description=f"{OUTPUT_MARK} taef2")
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.int16 and np.array_equal(np.asarray(img.dataobj), data)
    assert np.allclose(img.affine, AFFINE, atol=1e-6) and is_own_output(p)


def test_identical_reconstruction_and_thin_volumes_are_reported_not_dropped(tmp_path):
    """PSNR = inf (identity VAE, HU inside the window) is counted in summary.json; SSIM of a 2-slice volume is
    'n/a' with the reason; an image that is not HU is flagged per case in metrics.csv and summary.json."""
    src = tmp_path / "in"
    src.mkdir()
    _ct(src / "same.nii.gz", 0)
    _ct(src / "thin.nii.gz", 1, shape=(40, 36, 2))
    _ct(src / "unit.nii.gz", 2, scale=1 / 2000)  # values in [-0.5, 0.2]: not HU
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="do not look like CT in HU"):
        summary = _identity(out).run(str(src))
    m = summary["metrics"]
    assert m["psnr"]["n_inf"] == 2 and m["psnr"]["n"] == 1  # same and thin are exact; unit differs after rounding
    assert m["ssim3d"]["n_na"] == 1 and m["ssim3d"]["n"] == 2
    cases = {c["case"]: c for c in summary["cases"]}
    assert cases["same"]["psnr"] == "inf" and cases["same"]["warnings"] == []
    assert cases["thin"]["ssim3d"] == "n/a" and isinstance(cases["thin"]["ssim2d"], float)
    assert any("ssim3d n/a: the volume is 40x36x2 voxels" in w or "ssim3d n/a: the volume is 2x40x36 voxels" in w
               for w in cases["thin"]["warnings"]), cases["thin"]["warnings"]
    assert any("do not look like CT in HU" in w for w in cases["unit"]["warnings"])
    assert summary["n_with_warnings"] == 2 and summary["modalities"] == {"n/a (NIfTI)": 3}
    rows = {r["case"]: r for r in _rows(out / "metrics.csv")}
    assert rows["same"]["psnr"] == "inf" and rows["thin"]["ssim3d"] == "n/a"
    assert "do not look like CT in HU" in rows["unit"]["warnings"] and rows["same"]["warnings"] == ""
    json.loads((out / "summary.json").read_text())  # strict JSON (no Infinity / NaN tokens)
    assert "Infinity" not in (out / "summary.json").read_text() and "NaN" not in (out / "summary.json").read_text()


def test_skip_existing_recomputes_a_corrupt_or_stale_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _ct(src / f"c{i}.nii.gz", i)
    out = tmp_path / "out"
    _identity(out).run(str(src))
    good = {i: np.asarray(nib.load(str(out / f"c{i}_recon.nii.gz")).dataobj) for i in range(3)}
    raw = (out / "c0_recon.nii.gz").read_bytes()
    (out / "c0_recon.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated by a crash of another tool
    _ct(out / "c1_recon.nii.gz", 1, shape=(40, 36, 5))  # stale: another shape
    summary = _identity(out, skip_existing=True).run(str(src))
    status = {c["case"]: c["status"] for c in summary["cases"]}
    assert status == {"c0": "ok", "c1": "ok", "c2": "skipped"}
    warn = {c["case"]: " ".join(c["warnings"]) for c in summary["cases"]}
    assert "existing output is unreadable" in warn["c0"] and "has shape (40, 36, 5)" in warn["c1"]
    for i in range(3):
        assert np.array_equal(np.asarray(nib.load(str(out / f"c{i}_recon.nii.gz")).dataobj), good[i])
    assert all(c["psnr"] == "inf" for c in summary["cases"])


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    """One run per output folder; a holder killed with SIGKILL does not leave the folder locked."""
    src = tmp_path / "in"
    src.mkdir()
    _ct(src / "c.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [PY, "-c", "import sys, time; from fvae_ct.io import folder_lock\n"
                   f"with folder_lock({str(out)!r}, 'fvae recon (test)'):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"{out}: another run is writing into this output folder "
                                             rf"\(fvae recon \(test\), pid {holder.pid}\)"):
            _identity(out).run(str(src))
        assert not (out / "metrics.csv").exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    _identity(out).run(str(src))  # the lock died with its holder
    assert len(_rows(out / "metrics.csv")) == 1 and not (out / ".fvae.lock").exists()
    with folder_lock(out, "me"):  # and the workflow released it
        pass


N_CASES = 6


def _batch(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    imgs = {f"c{i}": _ct(src / f"c{i}.nii.gz", i, shape=(96, 96, 24)) for i in range(N_CASES)}
    return src, imgs


def _default_sigint():
    """A test runner started in the background (``cmd &``) has SIGINT ignored, and a child would inherit that; a user's
    Ctrl-C reaches a foreground process with the default handler, which is what this restores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(src, out, *extra, env=None):
    cmd = [PY, "-m", "fvae_ct.cli", "recon", str(src), "-o", str(out), "--vae", "identity", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
                            env=env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_batch_keeps_its_rows_and_resumes(sig, tmp_path):
    """Interrupt the real ``fvae recon`` after its second case (a barrier holds the third until the signal): the
    finished rows are on disk; the resumed run with ``--skip_existing true`` reuses them, finishes the rest, and ends
    with one row per case, outputs equal to the inputs (identity VAE), no temporaries, no lock file."""
    src, imgs = _batch(tmp_path)
    out = tmp_path / "out"
    proc = _launch(src, out, "--figures", "false", env=barrier_env(tmp_path / "barrier", after=2))
    held = wait_blocked(tmp_path / "barrier", 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    done = _rows(out / "metrics.csv")
    assert [r["case"] for r in done] == ["c0", "c1"] and held == ["c2"], (done, held)
    assert len({r["case"] for r in done}) == len(done) and all(r["status"] == "ok" for r in done)
    if sig == signal.SIGINT:  # a Ctrl-C also leaves a summary saying so, and one line instead of a traceback
        assert proc.returncode in (130, -signal.SIGINT) and "fvae recon: interrupted" in err and "Traceback" not in err, err[-3000:]
        s = json.loads((out / "summary.json").read_text())
        assert s["interrupted"] is True and s["n_ok"] == len(done) and s["n_cases"] == N_CASES
    r = subprocess.run([PY, "-m", "fvae_ct.cli", "recon", str(src), "-o", str(out), "--vae", "identity",
                        "--skip_existing", "true", "--figures", "false"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out / "metrics.csv")
    assert sorted(r["case"] for r in rows) == sorted(imgs)  # one row per case: none lost, none twice
    status = {r["case"]: r["status"] for r in rows}
    assert {c for c, s in status.items() if s == "skipped"} >= {r["case"] for r in done}
    for r in done:  # the time a reused case took is kept from the interrupted run
        assert float({x["case"]: x for x in rows}[r["case"]]["seconds"]) == pytest.approx(float(r["seconds"]))
    for name, img in imgs.items():
        assert np.array_equal(np.asarray(nib.load(str(out / f"{name}_recon.nii.gz")).dataobj), img)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is False and s["n_ok"] == N_CASES and s["metrics"]["psnr"]["n_inf"] == N_CASES


def test_rows_are_on_disk_as_each_case_ends(tmp_path, monkeypatch):
    """metrics.csv grows case by case (appended and fsynced), not written once at the end."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _ct(src / f"c{i}.nii.gz", i)
    out = tmp_path / "out"
    wf = _identity(out)
    seen, synced = [], []
    real_run_case, real_fsync = wf.run_case, os.fsync

    def spy(case, forbid=()):
        seen.append(len(_rows(out / "metrics.csv")))
        return real_run_case(case, forbid)

    monkeypatch.setattr(wf, "run_case", spy)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    wf.run(str(src))
    assert seen == [0, 1, 2] and len(synced) >= 3
    assert [r["case"] for r in _rows(out / "metrics.csv")] == ["c0", "c1", "c2"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
