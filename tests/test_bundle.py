"""The fvae_recon bundle through `python -m monai.bundle run`, on the real DICOM series with real TAEF2."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import yaml
from conftest import PY, ROOT, run
from monai.bundle import ConfigParser
from monai.transforms import LoadImage

BUNDLE = ROOT / "bundles" / "fvae_recon"


def test_bundle_run_on_real_dicom_meets_reference_numbers(dicom_dir, tmp_path):
    out = tmp_path / "out"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.yaml"),
             "--input", str(dicom_dir), "--output_dir", str(out), "--vae", "taef2"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and rows[0]["case"] == "dicom_series_512"
    assert {"case", "psnr", "ssim3d", "ssim2d", "mse_hu", "seconds"} <= set(rows[0])
    psnr, ssim2d = float(rows[0]["psnr"]), float(rows[0]["ssim2d"])
    assert psnr >= 39.3, psnr  # independent implementation: 39.6 dB
    assert ssim2d >= 0.97, ssim2d  # and 0.978
    assert 0.95 < float(rows[0]["ssim3d"]) <= 1.0
    assert abs(float(rows[0]["mse_hu"]) - 2000**2 * 10 ** (-psnr / 10)) < 1.0  # MSE HU^2 consistent with PSNR
    # output geometry = the DICOM series' geometry
    src = LoadImage(reader="PydicomReader", image_only=True)(str(dicom_dir))
    img = nib.load(str(out / "dicom_series_512_recon.nii.gz"))
    assert img.shape == tuple(src.shape) == (512, 512, 20)
    assert np.allclose(img.affine, np.asarray(src.affine), atol=1e-5)
    assert img.get_data_dtype() == np.int16
    rec = np.asarray(img.dataobj).astype(np.float32)
    orig = np.clip(np.asarray(src), -1000, 1000)
    assert 5.0 < np.abs(rec - orig).mean() < 20.0  # a real reconstruction: close, not identical
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vae"] == "taef2" and summary["hu_window"] == [-1000.0, 1000.0]
    assert "data range 1" in summary["protocol"]
    assert abs(summary["metrics"]["psnr"]["mean"] - psnr) < 1e-3
    png = (out / "dicom_series_512_views.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def test_cli_is_the_same_workflow_with_overrides(assets, tmp_path):
    src = assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"
    r = run([PY, "-m", "fvae_ct.cli", "recon", str(src), "-o", str(tmp_path), "--vae", "taef2",
             "--working_spacing", "1.5", "--hu_window", "[-1000,1000]", "--tile_size", "128", "--slice_batch", "8"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["working_spacing_mm"] == 1.5 and s["tiling"]["tile_size"] == 128 and s["tiling"]["slice_batch"] == 8
    assert 25.0 < s["metrics"]["psnr"]["mean"] < 40.0
    img, ref = nib.load(str(tmp_path / "totalseg_ct_sm_3mm_recon.nii.gz")), nib.load(str(src))
    assert img.shape == ref.shape and np.array_equal(img.affine, ref.affine)


def test_bundle_files_and_properties():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for k in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
              "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert k in meta, k
    assert meta["version"] in meta["changelog"]
    for f in ("configs/inference.yaml", "configs/logging.conf", "docs/README.md", "LICENSE", "large_files.yml"):
        assert (BUNDLE / f).is_file(), f
    lf = yaml.safe_load((BUNDLE / "large_files.yml").read_text())
    hashes = {x["path"].split("/")[-1]: x["hash_val"] for x in lf["large_files"]}
    from fvae_ct.assets import ASSETS

    assert hashes["taef2_encoder.pth"] == ASSETS["taef2_encoder"].sha256
    assert hashes["taef2_decoder.pth"] == ASSETS["taef2_decoder"].sha256
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    for pid in ("bundle_root", "device", "network_def", "inferer", "preprocessing", "run"):
        assert pid in parser.config, pid
    parser["vae"] = "identity"
    parser["output_dir"] = "/tmp/unused"
    assert parser.get_parsed_content("network_def").name == "identity"
    assert type(parser.get_parsed_content("preprocessing")).__name__ == "Compose"
