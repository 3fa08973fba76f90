"""``fvae compare-vaes`` on the batch runner: one comparison per output folder, a row per VAE as it ends, failures
listed at the end, resume with skip_existing. The child recon runs are replaced by a stand-in that writes what
``fvae recon`` writes (summary.json, the reconstruction), so these tests need no VAE and no subprocess; the real
children run in tests/test_external_vae.py."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

import fvae_ct.recon.compare as cmp
from fvae_ct.errors import BatchFailure, InputError, OptionError
from fvae_ct.io import folder_lock

AFF = np.diag([1.5, 1.5, 3.0, 1.0])


def _ct(path):
    rng = np.random.default_rng(0)
    v = rng.normal(40, 15, (32, 28, 10))
    v[:4], v[:, :3] = -1000, -1000
    v[12:22, 10:20, 3:8] += 120  # an organ with a boundary
    nib.save(nib.Nifti1Image(v.astype(np.int16), AFF), str(path))
    return str(path)


@pytest.fixture
def children(monkeypatch):
    """The stand-in child: every VAE reconstructs exactly (the input written back) in 2.5 s with 100 MiB, except those
    in ``fail`` (a one-line error on stderr, exit 1). ``calls`` records (vae, skip_existing) per launch."""
    state = {"calls": [], "fail": set()}

    def fake(cmd):
        opts = json.loads(cmd[-1])
        state["calls"].append((opts["vae"], opts["skip_existing"]))
        if opts["vae"] in state["fail"]:
            return 1, "noise\ncompare-vaes child: /w/nowhere.pth: weights file does not exist\n", 0.5, 80.0
        sub = cmp.Path(opts["output_dir"])
        sub.mkdir(parents=True, exist_ok=True)
        img = nib.load(opts["input"])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(sub / "ct_recon.nii.gz"))
        metrics = {"psnr": 41.5, "ssim3d": 0.97, "ssim2d": 0.96, "mse_hu": 12.25}
        (sub / "summary.json").write_text(json.dumps({"metrics": {k: {"mean": v} for k, v in metrics.items()}}))
        return 0, "", 2.5, 100.0

    monkeypatch.setattr(cmp, "run_measured", fake)
    return state


def _csv(path):
    return list(csv.DictReader(open(path)))


def test_failures_are_listed_after_the_others_and_a_rerun_resumes(children, tmp_path):
    ct, out = _ct(tmp_path / "ct.nii.gz"), tmp_path / "cmp"
    children["fail"] = {"ivvae"}
    with pytest.raises(BatchFailure) as e:
        cmp.compare_vaes(ct, "identity,ivvae", str(out), progress=False)
    assert str(e.value) == (
        "1 of 2 VAEs failed (the table has the others):\n  ivvae: /w/nowhere.pth: weights file does not exist"
    )
    assert [r["vae"] for r in e.value.rows] == ["identity"]
    assert children["calls"] == [("identity", False), ("ivvae", False)]
    rows = _csv(out / "compare.csv")
    assert [r["vae"] for r in rows] == ["identity"] and list(rows[0]) == list(cmp.COLUMNS)
    r = rows[0]
    assert (float(r["psnr"]), float(r["seconds"]), float(r["peak_rss_mib"])) == (41.5, 2.5, 100.0)
    assert float(r["noise_ratio"]) == 1.0 and float(r["boundary_shift_mean_mm"]) == 0.0  # exact reconstruction
    assert "| identity |" in (out / "compare.md").read_text() and not (out / ".fvae.lock").exists()

    # the rerun with skip_existing: identity's row is reused (no child), ivvae runs (resuming its own recon run)
    children["fail"] = set()
    rows = cmp.compare_vaes(ct, ["identity", "ivvae"], str(out), skip_existing="true", progress=False)
    assert children["calls"][2:] == [("ivvae", True)]
    assert [r["vae"] for r in rows] == ["identity", "ivvae"] and rows[0]["seconds"] == 2.5
    assert [r["vae"] for r in _csv(out / "compare.csv")] == ["identity", "ivvae"]
    md = (out / "compare.md").read_text()
    assert md.startswith("| vae | psnr |") and "| identity |" in md and "| ivvae |" in md

    # other settings (another window): the earlier rows do not count, both VAEs run again
    cmp.compare_vaes(ct, "identity,ivvae", str(out), hu_window=[-500, 500], skip_existing=True, progress=False)
    assert children["calls"][3:] == [("identity", True), ("ivvae", True)]
    # without skip_existing everything runs again
    cmp.compare_vaes(ct, "identity", str(out), progress=False)
    assert children["calls"][5:] == [("identity", False)]
    assert [r["vae"] for r in _csv(out / "compare.csv")] == ["identity"]


def test_a_second_comparison_in_the_same_folder_is_refused(children, tmp_path):
    ct, out = _ct(tmp_path / "ct.nii.gz"), tmp_path / "cmp"
    with folder_lock(out, "fvae compare-vaes (test)"):
        with pytest.raises(InputError, match=r"cmp: another run is writing into this output folder \(fvae compare-vaes "
                                             r"\(test\), pid \d+\); wait for it or use another folder$"):
            cmp.compare_vaes(ct, "identity", str(out), progress=False)
    assert children["calls"] == [] and not (out / "compare.csv").exists()
    cmp.compare_vaes(ct, "identity", str(out), progress=False)  # released: runs
    assert children["calls"] == [("identity", False)]


def test_bad_options_are_one_line_option_errors(children, tmp_path):
    ct = _ct(tmp_path / "ct.nii.gz")
    with pytest.raises(OptionError, match=r"^skip_existing: expected true or false \(1/0, yes/no\), got 'perhaps'$"):
        cmp.compare_vaes(ct, "identity", str(tmp_path / "a"), skip_existing="perhaps")
    with pytest.raises(OptionError, match=r"^hu_window \[500, -500\]: give \[low, high\] in HU with low < high"):
        cmp.compare_vaes(ct, "identity", str(tmp_path / "a"), hu_window=[500, -500])
    with pytest.raises(OptionError, match=r"^vaes \['taef2', 'wan9'\]: unknown \['wan9'\]; give VAE names of `fvae "
                                          r"list-vaes`: .*taef2"):
        cmp.compare_vaes(ct, "taef2, wan9", str(tmp_path / "a"))
    with pytest.raises(OptionError, match=r"^vaes \[\]: unknown \[\]"):
        cmp.compare_vaes(ct, " ,", str(tmp_path / "a"))
    with pytest.raises(OptionError, match=r"^weights 'a.pth': give a JSON object of weights per VAE"):
        cmp.compare_vaes(ct, "identity", str(tmp_path / "a"), weights="a.pth")
    with pytest.raises(InputError, match=rf"^{tmp_path}/seg.nii.gz: does not exist \(give the label map of the input\)$"):
        cmp.compare_vaes(ct, "identity", str(tmp_path / "a"), labels=str(tmp_path / "seg.nii.gz"))
    assert children["calls"] == [] and not (tmp_path / "a").exists()
