"""The analysis bundle config on real CT with real labels: the VAE and every baseline in one table."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from conftest import PY, ROOT, run

from fvae_ct.recon.analysis import COLUMNS, DEFAULT_METHODS, AnalysisWorkflow
from fvae_ct.recon.denoisers import DENOISERS
from fvae_ct.io import load_ct, load_labels
from fvae_ct.recon import ReconWorkflow
from fvae_ct.vae import IdentityVAE

CONF = ROOT / "bundles" / "fvae_recon" / "configs"


@pytest.fixture(scope="module")
def dicom_crop(dicom_dir, assets, tmp_path_factory):
    """6 slices x 192 x 224 of the real DICOM series (liver, spleen, ...) and its label map, as NIfTI."""
    d = tmp_path_factory.mktemp("crop")
    img = load_ct(dicom_dir)
    aff = np.asarray(img.affine)
    lab = load_labels(assets / "ct" / "dicom_series_512_seg.nii.gz", aff, img.shape[1:])
    box = (slice(140, 332), slice(100, 324), slice(7, 13))
    shift = aff @ np.array([box[0].start, box[1].start, box[2].start, 1.0])
    a2 = aff.copy()
    a2[:3, 3] = shift[:3]
    nib.save(nib.Nifti1Image(img[0].numpy()[box].astype(np.int16), a2), str(d / "crop.nii.gz"))
    nib.save(nib.Nifti1Image(lab[box].astype(np.int16), a2), str(d / "crop_seg.nii.gz"))
    assert {1, 5} <= set(np.unique(lab[box]))  # spleen and liver in the crop
    return d


def test_analysis_bundle_on_real_ct_with_labels(dicom_crop, tmp_path):
    out = tmp_path / "out"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file",
             f"['{CONF / 'inference.yaml'}','{CONF / 'analysis.yaml'}']",
             "--input", str(dicom_crop / "crop.nii.gz"), "--labels", str(dicom_crop), "--output_dir", str(out),
             "--vae", "taef2"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["method"]: x for x in csv.DictReader(open(out / "analysis.csv"))}
    assert set(rows) == {"vae:taef2", *[m for m in DEFAULT_METHODS if m != "vae"]}
    assert set(COLUMNS) <= set(next(iter(rows.values())))
    assert rows["vae:taef2"]["labels"].endswith("crop_seg.nii.gz")
    f = {m: {k: float(v) for k, v in r_.items() if k in COLUMNS[2:-2]} for m, r_ in rows.items()}
    assert f["vae:taef2"]["psnr"] > 33.0
    for m in ("gaussian_1vox", "median3", "bilateral", "nlm"):  # classical filters suppress noise ...
        assert f[m]["noise_ratio"] < 0.9, (m, f[m])
    for m in ("gaussian_1vox", "median3"):  # ... and the linear / 3D ones soften edges
        assert f[m]["edge_sharpness"] < 0.95 and f[m]["edge_width_ratio"] > 1.05, (m, f[m])
    assert f["gaussian_1vox"]["hf_error_fraction"] < f["vae:taef2"]["hf_error_fraction"]
    assert abs(f["gaussian_psnr_matched"]["psnr"] - f["vae:taef2"]["psnr"]) < 0.3
    for m in f:
        if not np.isnan(f[m]["psnr"]):
            assert 0.0 <= f[m]["boundary_shift_mean_mm"] < 3.0 and 0 <= f[m]["hf_error_fraction"] <= 1
    # the displacement / blur / texture measures and their noise floors
    for m in ("vae:taef2", "gaussian_1vox", "median3_inplane"):
        assert int(rows[m]["edge_profiles"]) > 100 and f[m]["floor_white_shift_mean_mm"] > 0, (m, f[m])
        assert np.isfinite(f[m]["edge_width_ratio"]) and np.isfinite(f[m]["floor_spectrum_abs_offset_mm"])
    assert f["gaussian_1vox"]["edge_width_ratio"] > f["gaussian_inplane_0.5"]["edge_width_ratio"] > 1.0
    noise = list(csv.DictReader(open(out / "denoising.csv")))
    assert {r["noise"] for r in noise} == {"white10", "white20", "ct20"}
    removed = {(r["noise"], r["method"]): float(r["noise_removed"]) for r in noise}
    assert removed[("white20", "noisy input")] == 0.0
    assert removed[("white20", "gaussian_1vox")] > 0.6 > removed[("white20", "gaussian_inplane_0.5")] > 0.1
    assert {"noisy input", "vae:taef2", "nlm", "median3_inplane"} <= {m for _, m in removed}
    png = (out / "crop_analysis.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 30_000


def test_label_free_mode_and_registry_growth(assets, tmp_path):
    """Without labels the edges come from the image; a new denoiser is one registration away."""
    from fvae_ct.recon.denoisers import register_denoiser

    @register_denoiser("identity_test", "returns the input")
    def _ident(x, spacing, window):
        return x

    try:
        recon = ReconWorkflow(IdentityVAE(), str(tmp_path), figures=False, progress=False)
        rows = AnalysisWorkflow(recon, labels=None, methods=["vae", "identity_test", "median3"], figures=True,
                                progress=False).run(str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"))
    finally:
        DENOISERS.pop("identity_test")
    by = {r["method"]: r for r in rows}
    assert set(by) == {"vae:identity", "identity_test", "median3"}
    assert by["identity_test"]["boundary_shift_mean_mm"] == 0.0 and by["identity_test"]["noise_ratio"] == 1.0
    assert by["median3"]["noise_ratio"] < 0.9 and by["median3"]["edge_sharpness"] < 1.0
    assert (tmp_path / "totalseg_ct_sm_3mm_analysis.png").is_file()


def test_bad_analysis_options_are_one_line_option_errors(tmp_path):
    """A bad --methods / --insert_noise / --hf_cutoff is an OptionError naming the option, the value and what is allowed,
    raised when the analysis is built (before any case); text from the command line is split at commas."""
    from fvae_ct.errors import InputError, OptionError

    recon = ReconWorkflow(IdentityVAE(), str(tmp_path), figures=False, progress=False)
    cases = [
        ({"methods": ["vae", "wiener"]}, r"^methods \['vae', 'wiener'\]: unknown \['wiener'\]; give any of vae, "
                                         r"gaussian_matched, gaussian_psnr_matched, gaussian_1vox, median3"),
        ({"methods": "foo"}, r"^methods \['foo'\]: unknown \['foo'\]; give any of vae"),
        ({"methods": "[]"}, r"^methods \[\]: unknown \[\]; give any of vae"),
        ({"methods": ["gaussian_matched"]}, r"^methods \['gaussian_matched'\]: gaussian_matched need the 'vae' method"),
        ({"insert_noise": "white10,pink5"}, r"^insert_noise 'pink5': give white<HU> or ct<HU>, e.g. white10, ct20$"),
        ({"insert_noise": ["ct-3"]}, r"^insert_noise 'ct-3': give white<HU> or ct<HU>"),
        ({"cutoff": "high"}, r"^hf_cutoff 'high': give a frequency in cycles/voxel, above 0 and at most 0.707$"),
        ({"cutoff": 0.0}, r"^hf_cutoff 0.0: give a frequency"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OptionError, match=message):
            AnalysisWorkflow(recon, **kwargs)
    a = AnalysisWorkflow(recon, methods="median3, vae", insert_noise="[white10, ct20]", cutoff="0.3", progress=False)
    assert a.methods == ["vae", "median3"] and a.insert_noise == ["white10", "ct20"] and a.cutoff == 0.3
    assert AnalysisWorkflow(recon, insert_noise="[]").insert_noise == []
    with pytest.raises(InputError, match=rf"^{tmp_path}/segs: does not exist \(give a label map, or a folder of "):
        AnalysisWorkflow(recon, labels=str(tmp_path / "segs"))
