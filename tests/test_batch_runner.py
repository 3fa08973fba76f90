"""The one batch runner: analysis and latent caching resume with skip_existing (a second run
re-does nothing), refuse a second concurrent run into their folder, and report failures in one BatchFailure."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
from conftest import PY

from fvae_ct.batch import BatchRunner, failure_message
from fvae_ct.datalist import read_datalist
from fvae_ct.errors import BatchFailure, InputError
from fvae_ct.io import Case, folder_lock
from fvae_ct.recon import ReconWorkflow
from fvae_ct.recon.analysis import AnalysisWorkflow
from fvae_ct.vae import IdentityVAE, load

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _ct(path, seed=0, shape=(40, 36, 6)):
    g = np.random.default_rng(seed)
    img = np.full(shape, -1000, np.int16)
    img[4:-4, 4:-4] = 40 + g.integers(-20, 20, size=(shape[0] - 8, shape[1] - 8, shape[2]))
    img[10:16, 12:20] = 300 + 50 * seed
    nib.save(nib.Nifti1Image(img, AFFINE), str(path))


def _inputs(tmp_path, n=2):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        _ct(src / f"c{i}.nii.gz", i)
    return src


def _analysis(out, skip_existing=False):
    recon = ReconWorkflow(IdentityVAE(), str(out), figures=False, progress=False, skip_existing=skip_existing)
    return AnalysisWorkflow(recon, methods=["vae", "gaussian_1vox"], figures=False, progress=False, insert_noise=())


def test_analysis_resumes_with_skip_existing(tmp_path, monkeypatch):
    src, out = _inputs(tmp_path), tmp_path / "out"
    first = _analysis(out).run(str(src))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*_analysis.json")}
    assert sorted(mtimes) == ["c0_analysis.json", "c1_analysis.json"]
    wf, calls = _analysis(out, skip_existing=True), []
    monkeypatch.setattr(wf, "run_case", lambda case: calls.append(case) or [])
    again = wf.run(str(src))
    assert calls == []  # nothing analysed again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_analysis.json")} == mtimes
    assert json.dumps(again, default=float) == json.dumps(first, default=float)
    other = _analysis(out, skip_existing=True)  # other settings: analysed again
    other.methods = ["vae"]
    assert [r["method"] for r in other.run(str(src))] == ["vae:identity", "vae:identity"]


def test_latent_cache_resumes_with_skip_existing(tmp_path, monkeypatch):
    import fvae_ct.ldm.latent_cache as lw

    src = _inputs(tmp_path)
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps([{"image": f"in/c{i}.nii.gz"} for i in range(2)]))
    cache = tmp_path / "cache"
    stats = lw.prepare_latents(str(dl), load("identity"), str(cache), [1])
    mtimes = [(cache / f"c{i}.pt").stat().st_mtime_ns for i in range(2)]
    calls = []
    real = lw._encode_case
    monkeypatch.setattr(lw, "_encode_case", lambda *a: calls.append(a) or real(*a))
    again = lw.prepare_latents(str(dl), load("identity"), str(cache), [1], skip_existing=True)
    assert calls == [] and [(cache / f"c{i}.pt").stat().st_mtime_ns for i in range(2)] == mtimes
    assert again["scale_factor"] == pytest.approx(stats["scale_factor"], rel=1e-12)
    assert not (cache / ".fvae.lock").exists() and src.is_dir()


def test_a_held_lock_refuses_analysis_and_latent_caching(tmp_path):
    import fvae_ct.ldm.latent_cache as lw

    src, out = _inputs(tmp_path, 1), tmp_path / "out"
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps([{"image": "in/c0.nii.gz"}]))
    with folder_lock(out, "a held lock (test)"):
        with pytest.raises(InputError, match=r"another run is writing into this output folder \(a held lock \(test\)"):
            _analysis(out).run(str(src))
        with pytest.raises(InputError, match="another run is writing") as e:
            lw.prepare_latents(str(dl), load("identity"), str(out), [1])
        assert "\n" not in str(e.value)
    assert not (out / "analysis.csv").exists() and not list(out.glob("*.pt"))
    _analysis(out).run(str(src))  # released: runs


def test_a_lock_held_by_another_process_refuses_latent_caching(tmp_path):
    import fvae_ct.ldm.latent_cache as lw

    _inputs(tmp_path, 1)
    dl, cache = tmp_path / "dl.json", tmp_path / "cache"
    dl.write_text(json.dumps([{"image": "in/c0.nii.gz"}]))
    cache.mkdir()
    holder = subprocess.Popen(
        [PY, "-c", "import time; from fvae_ct.io import folder_lock\n"
                   f"with folder_lock({str(cache)!r}, 'other (test)'):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"{cache}: another run .*\(other \(test\), pid {holder.pid}\)"):
            lw.prepare_latents(str(dl), load("identity"), str(cache), [1])
    finally:
        holder.kill()
        holder.wait()


def test_runner_records_failures_and_writes_rows(tmp_path):
    cases = [Case(f"c{i}", f"/in/c{i}") for i in range(3)]
    cases.append(Case("web", "/tmp/fetched/web", source="http://pacs/dicom-web/studies/1/series/2"))
    with BatchRunner(tmp_path, "test", {"t.csv": ["case", "v"]}, progress=False) as run:
        assert run.plan(lambda: cases) == cases
        for case in run.mine():
            with run.case(case) as c:
                c.add({"case": case.name, "v": 1.5})
                if case.name in ("c1", "web"):
                    raise RuntimeError("boom")
        rows, failures = run.gather()
    assert [r["case"] for r in rows["t.csv"]] == ["c0", "c2"]
    assert (tmp_path / "t.csv").read_text().splitlines() == ["case,v", "c0,1.5", "c2,1.5"]
    web = "http://pacs/dicom-web/studies/1/series/2"  # a fetched case is named by its address, not the temporary copy
    assert failures == [
        {"case": "c1", "input": "/in/c1", "error": "RuntimeError: boom"},
        {"case": "web", "input": web, "error": "RuntimeError: boom"},
    ]
    with pytest.raises(BatchFailure) as e:
        run.raise_failures()
    assert str(e.value) == failure_message(failures, 4) == (
        f"2 of 4 case(s) failed:\n  c1 (/in/c1): RuntimeError: boom\n  web ({web}): RuntimeError: boom"
    )
    assert not (tmp_path / ".fvae.lock").exists()


def test_read_datalist_one_line_errors(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"training": [{"image": "a.nii.gz", "report": "r"}]}))
    assert read_datalist(good) == [{"image": str(tmp_path / "a.nii.gz"), "report": "r"}]
    cases = [
        ("missing.json", None, "datalist JSON does not exist"),
        ("bad.json", "{", "not valid JSON"),
        ("nokey.json", json.dumps([{"label": "a.nii.gz"}]), "item 0 needs 'image'"),
        ("nofile.json", json.dumps([{"image": "b.nii.gz"}]), "does not exist"),
    ]
    for name, text, msg in cases:
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=msg) as e:
            read_datalist(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"b.nii.gz: does not exist \(item 0 'image' of"):
        read_datalist(tmp_path / "nofile.json")
