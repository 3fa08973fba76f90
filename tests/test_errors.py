"""Bad input gets a clear error naming the file and the problem; a batch goes on past a failed case."""

from __future__ import annotations

import gzip
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import PY, run, write_nifti

from fvae_ct.errors import InputError
from fvae_ct.io import discover_cases, load_ct, save_nifti_atomic
from fvae_ct.recon import BatchFailure, ReconWorkflow
from fvae_ct.vae import IdentityVAE

AFF = np.diag([0.8, 0.8, 2.0, 1.0])


def ct_like(shape=(20, 18, 6), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(40, 20, shape).astype(np.int16)
    v[:3] = -1000  # air
    return v


def test_missing_path(tmp_path):
    p = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError, match=f"{p}: file or folder does not exist"):
        load_ct(p)
    with pytest.raises(InputError, match="input path does not exist"):
        discover_cases(p)


def test_truncated_nifti(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", ct_like((64, 64, 16)), AFF)
    raw = good.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.nii.gz: cannot read the image, truncated or corrupt"):
        load_ct(bad)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(InputError, match="garbage.nii.gz: cannot read"):
        load_ct(garbage)


def test_2d_and_4d_images(tmp_path):
    p2 = write_nifti(tmp_path / "slice.nii.gz", ct_like((32, 32, 1))[..., 0], np.eye(4))
    with pytest.raises(InputError, match="slice.nii.gz: a 2D image of shape"):
        load_ct(p2)
    p4 = write_nifti(tmp_path / "dyn.nii.gz", np.stack([ct_like()] * 3, -1), np.eye(4))
    with pytest.raises(InputError, match=r"dyn.nii.gz: a 4D image of shape \(20, 18, 6, 3\)"):
        load_ct(p4)
    p41 = write_nifti(tmp_path / "one.nii.gz", ct_like()[..., None], AFF)  # trailing singleton: fine
    assert load_ct(p41).shape == (1, 20, 18, 6)


def test_nan_and_inf(tmp_path):
    v = ct_like().astype(np.float32)
    v[5, 5, 2] = np.nan
    v[6, 5, 2] = np.inf
    p = write_nifti(tmp_path / "nan.nii.gz", v, AFF)
    with pytest.raises(InputError, match="nan.nii.gz: 2 NaN/Inf voxels"):
        load_ct(p)


@pytest.mark.parametrize("kind", ["unit", "mr"])
def test_not_hu_warns_loudly_but_goes_on(tmp_path, kind):
    rng = np.random.default_rng(0)
    v = rng.random((16, 16, 4)).astype(np.float32) if kind == "unit" else rng.uniform(0, 1800, (16, 16, 4))
    p = write_nifti(tmp_path / f"{kind}.nii.gz", v.astype(np.float32), AFF)
    with pytest.warns(UserWarning, match=f"{kind}.nii.gz: intensities .* do not look like CT in HU"):
        img = load_ct(p)
    assert img.shape == (1, 16, 16, 4)  # processed, not refused


def test_real_ct_raises_no_hu_warning(assets, recwarn):
    load_ct(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz")
    assert not [w for w in recwarn if "do not look like CT" in str(w.message)]


def test_tiny_odd_volume_is_padded_and_cropped(taef2, tmp_path):
    p = write_nifti(tmp_path / "tiny.nii.gz", ct_like((5, 7, 3)), AFF)
    ReconWorkflow(taef2, str(tmp_path / "out"), progress=False, figures=False).run(str(p))
    out = nib.load(str(tmp_path / "out" / "tiny_recon.nii.gz"))
    assert out.shape == (5, 7, 3) and np.array_equal(out.affine, nib.load(str(p)).affine)


def test_unsupported_inputs(tmp_path):
    (tmp_path / "x.mha").write_bytes(b"0")
    with pytest.raises(InputError, match="x.mha: unsupported format"):
        load_ct(tmp_path / "x.mha")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no NIfTI files"):
        discover_cases(tmp_path / "empty")
    with pytest.raises(InputError, match="not a DICOM series"):
        load_ct(tmp_path / "empty")


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_batch_goes_on_reports_failures_never_overwrites_inputs(tmp_path):
    inp = tmp_path / "cases"
    inp.mkdir()
    write_nifti(inp / "a.nii.gz", ct_like(seed=1), AFF)
    write_nifti(inp / "c.nii.gz", ct_like(seed=2), AFF)
    (inp / "b.nii.gz").write_bytes((inp / "a.nii.gz").read_bytes()[:100])  # truncated
    before = {p.name: _sha(p) for p in inp.iterdir()}
    # output folder = input folder: inputs untouched, outputs not taken as inputs on a second run
    wf = ReconWorkflow(IdentityVAE(), str(inp), progress=False, figures=False)
    with pytest.raises(BatchFailure, match=r"1 of 3 case\(s\) failed:\n  b \(.*b.nii.gz\): InputError"):
        wf.run(str(inp))
    assert {p.name: _sha(p) for p in inp.iterdir() if p.name in before} == before
    assert (inp / "a_recon.nii.gz").is_file() and (inp / "c_recon.nii.gz").is_file()
    summary = json.loads((inp / "summary.json").read_text())
    assert summary["n_ok"] == 2 and summary["n_failed"] == 1 and summary["failures"][0]["case"] == "b"
    assert [c.name for c in wf.cases(str(inp))] == ["a", "b", "c"]
    assert not list(inp.glob(".*tmp*"))  # atomic writes leave no temporaries
    with pytest.raises(InputError, match="refusing to overwrite an input"):
        save_nifti_atomic(np.zeros((2, 2, 2), np.int16), AFF, inp / "a.nii.gz", forbid=(str(inp / "a.nii.gz"),))


def test_cli_exit_code_and_message_on_failures(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_nifti(inp / "good.nii.gz", ct_like(), AFF)
    write_nifti(inp / "nan.nii.gz", np.full((8, 8, 4), np.nan, np.float32), AFF)
    r = run([PY, "-m", "fvae_ct.cli", "recon", str(inp), "-o", str(tmp_path / "out"), "--vae", "identity",
             "--figures", "False"])
    assert r.returncode != 0
    assert "1 of 2 case(s) failed" in r.stderr and "nan.nii.gz: 256 NaN/Inf voxels" in r.stderr
    assert (tmp_path / "out" / "good_recon.nii.gz").is_file()
    r = run([PY, "-m", "fvae_ct.cli", "recon", str(inp), "-o", str(tmp_path / "o2"), "--vae", "sd-vae"])
    assert r.returncode != 0 and "unknown VAE 'sd-vae'; valid names:" in r.stderr


def test_datalist_json_input(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", ct_like(seed=3), AFF)
    write_nifti(tmp_path / "b.nii.gz", ct_like(seed=4), AFF)
    (tmp_path / "list.json").write_text(json.dumps({"testing": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]}))
    cases = discover_cases(tmp_path / "list.json")
    assert [c.name for c in cases] == ["a", "b"] and all(c.path.startswith(str(tmp_path)) for c in cases)
    (tmp_path / "plain.json").write_text(json.dumps(["a.nii.gz"]))
    assert [c.name for c in discover_cases(tmp_path / "plain.json")] == ["a"]


def test_skip_existing_reuses_outputs(tmp_path):
    p = write_nifti(tmp_path / "a.nii.gz", ct_like(), AFF)
    out = tmp_path / "out"
    ReconWorkflow(IdentityVAE(), str(out), progress=False, figures=False).run(str(p))
    mtime = (out / "a_recon.nii.gz").stat().st_mtime_ns
    s = ReconWorkflow(IdentityVAE(), str(out), progress=False, figures=False, skip_existing=True).run(str(p))
    assert (out / "a_recon.nii.gz").stat().st_mtime_ns == mtime
    assert s["metrics"]["ssim2d"]["n"] == 1 and "skipped" in (out / "metrics.csv").read_text()


def test_input_error_survives_a_dataloader_worker():
    """torch re-raises a worker's exception as ``type(e)(message)``: an InputError stays one (not a RuntimeError)."""
    import torch

    from fvae_ct.errors import InputError

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise InputError("/data/case.nii.gz", "not 3D")

    with pytest.raises(InputError) as e:
        next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1)))
    assert str(e.value).rstrip().endswith("/data/case.nii.gz: not 3D")


def test_cli_passes_every_config_option_through_and_refuses_unknown_ones(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", ct_like(), AFF)
    out = tmp_path / "out"
    r = run([PY, "-m", "fvae_ct.cli", "recon", str(tmp_path / "a.nii.gz"), "-o", str(out), "--vae", "identity",
             "--figures", "False", "--slice_orientation", "file", "--hu_rounding", "truncate"])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slice_orientation"] == "file" and summary["hu_rounding"] == "truncate"
    r = run([PY, "-m", "fvae_ct.cli", "recon", str(tmp_path / "a.nii.gz"), "-o", str(out), "--slice_orientaton", "x"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("fvae recon: unknown option(s) --slice_orientaton")
