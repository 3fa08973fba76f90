"""The fvae_recon bundle through `python -m monai.bundle run`, on the real DICOM series with real TAEF2."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import PY, ROOT, check_properties, run
from monai.bundle import ConfigParser
from monai.transforms import LoadImage

BUNDLES = ROOT / "bundles"
BUNDLE = BUNDLES / "fvae_recon"


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
             "--working_spacing", "2.0", "--hu_window", "[-1000,1000]", "--tile_size", "128", "--slice_batch", "8"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["working_spacing_mm"] == 2.0 and s["tiling"]["tile_size"] == 128 and s["tiling"]["slice_batch"] == 8
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


SCHEMA = "monai/meta_schema_20240725.json"


@pytest.mark.parametrize("bundle", ["fvae_recon", "fvae_aug_seg", "fvae_ldm"])
def test_metadata_verifies_against_monai_schema_and_lists_installable_packages(bundle, assets):
    """MONAI's verify_metadata with the schema named in metadata.json (a local copy: its URL is unreachable here);
    every required package is an exact pin of a PyPI package (fvae-ct itself ships inside the archive)."""
    from monai.bundle import verify_metadata

    meta = BUNDLES / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(assets / SCHEMA))
    m = json.loads(meta.read_text())
    assert m["version"] in m["changelog"] and "optional_packages_version" not in m  # MONAI renames that key
    assert "fvae-ct" not in m["required_packages_version"]
    assert all(v.count(".") >= 1 for v in m["required_packages_version"].values())
    broken = {**m, "network_data_format": {"inputs": {}}}  # the check can fail: outputs missing
    bad = meta.parent.parent / "broken_metadata.json"
    try:
        bad.write_text(json.dumps(broken))
        with pytest.raises(Exception, match="outputs"):
            verify_metadata(meta_file=str(bad), filepath=str(assets / SCHEMA))
    finally:
        bad.unlink()


def test_recon_configs_have_the_inference_workflow_properties(assets):
    """check_properties as the zoo's CI and MONAI Label run it: every required property instantiates."""
    assert check_properties(BUNDLE / "configs", ["inference.yaml"], "inference") == []
    assert check_properties(BUNDLE / "configs", ["inference.yaml", "analysis.yaml"], "inference") == []
    with pytest.raises(KeyError, match="train::trainer"):  # the check can fail: not a training config
        check_properties(BUNDLE / "configs", ["inference.yaml"], "train")


@pytest.mark.parametrize("bundle", ["fvae_recon", "fvae_aug_seg"])
def test_network_in_out_as_the_zoo_verifies_it(bundle, assets):
    """monai.bundle.verify_net_in_out on network_def with the shapes of metadata.json (the zoo runs it for these two;
    fvae_ldm is a generative bundle on the zoo's exclusion list)."""
    from monai.bundle import verify_net_in_out

    b = BUNDLES / bundle
    verify_net_in_out(net_id="network_def", meta_file=str(b / "configs" / "metadata.json"),
                      config_file=str(b / "configs" / "inference.yaml"), bundle_root=str(b), device="cpu", n=2)
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_def", meta_file=str(b / "configs" / "metadata.json"),
                          config_file=str(b / "configs" / "inference.yaml"), bundle_root=str(b), device="cpu",
                          **{"_meta_#network_data_format#outputs#pred#num_channels": 7})


def test_multi_gpu_configs_define_the_training_properties():
    """The layered multi-GPU training configs hold every required training property ID (they run under torchrun
    on CPU in tests/test_distributed.py)."""
    from monai.bundle.properties import TrainProperties

    for bundle in ("fvae_aug_seg", "fvae_ldm"):
        conf = BUNDLES / bundle / "configs"
        p = ConfigParser()
        p.read_config([str(conf / "train.yaml"), str(conf / "multi_gpu_train.yaml")])
        for name, prop in TrainProperties.items():
            if prop.get("required"):
                assert prop["id"] in p, (bundle, name)


def test_build_bundles_vendors_the_code_each_bundle_needs(tmp_path):
    import sys
    import zipfile

    sys.path.insert(0, str(ROOT / "tools"))
    from build_bundles import PACKAGE, _module_file, vendored_modules

    r = run([PY, str(ROOT / "tools" / "build_bundles.py"), "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    for bundle, own, absent in (("fvae_recon", "recon", ("aug_seg", "ldm")), ("fvae_aug_seg", "aug_seg", ("ldm",)),
                                ("fvae_ldm", "ldm", ("recon", "aug_seg"))):
        version = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())["version"]
        z = zipfile.ZipFile(tmp_path / f"{bundle}_v{version}.zip")
        names = set(z.namelist())
        assert {f"{bundle}/configs/metadata.json", f"{bundle}/LICENSE", f"{bundle}/large_files.yml",
                f"{bundle}/docs/README.md", f"{bundle}/docs/data_license.txt", f"{bundle}/fvae_ct/vae/base.py",
                f"{bundle}/fvae_ct/{own}/__init__.py"} <= names
        assert all(n.startswith(f"{bundle}/") and "__pycache__" not in n for n in names)
        assert not any(n.startswith(f"{bundle}/fvae_ct/{a}/") for a in absent for n in names)
        assert f"{bundle}/fvae_ct/cli.py" not in names  # the fvae command is not part of a bundle
        # exactly the import closure of what its configs name: no hand-kept list
        closure = {f"{bundle}/fvae_ct/{_module_file(m).relative_to(PACKAGE).as_posix()}" for m in vendored_modules(bundle)}
        assert {n for n in names if n.startswith(f"{bundle}/fvae_ct/")} == closure
        src = (ROOT / "common" / "fvae_ct" / "vae" / "base.py").read_bytes()
        assert z.read(f"{bundle}/fvae_ct/vae/base.py") == src  # vendored verbatim from the one source
    assert "fvae_recon/fvae_ct/recon/boundary.py" in closure_of(tmp_path, "fvae_recon")
    assert not any("/fvae_ct/ldm/" in n or n.endswith("/fvae_ct/metrics/fvd.py") for n in closure_of(tmp_path, "fvae_recon"))
    assert "fvae_ldm/fvae_ct/ldm/networks/consistency.py" in closure_of(tmp_path, "fvae_ldm")
    assert not any("/recon/" in n for n in closure_of(tmp_path, "fvae_ldm"))
    version = json.loads((ROOT / "bundles" / "fvae_recon" / "configs" / "metadata.json").read_text())["version"]
    archive = tmp_path / f"fvae_recon_v{version}.zip"
    first = archive.read_bytes()
    run([PY, str(ROOT / "tools" / "build_bundles.py"), "--out", str(tmp_path), "--bundles", "fvae_recon"])
    assert archive.read_bytes() == first  # reproducible


def closure_of(dist, bundle):
    import zipfile

    version = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())["version"]
    return set(zipfile.ZipFile(dist / f"{bundle}_v{version}.zip").namelist())


#: run in a fresh interpreter: hide the installed fvae_ct (editable finders, path entries holding it), check it is
#: gone, put the unpacked bundle folder first on sys.path as MONAI does, import the given modules, and list every
#: fvae_ct module that did not come from the bundle folder
_ISOLATED_IMPORT = """
import importlib, importlib.util, os, sys
bundle, modules = sys.argv[1], sys.argv[2].split(",")
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (type(f).__module__ + type(f).__name__).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path[:] = [p for p in sys.path if p and not os.path.exists(os.path.join(p, "fvae_ct"))]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("fvae_ct") is None, "the installed fvae_ct is still importable"
sys.path.insert(0, bundle)
for m in modules:
    importlib.import_module(m)
outside = [m for m, mod in sys.modules.items() if m.split(".")[0] == "fvae_ct"
           and not os.path.abspath(getattr(mod, "__file__", None) or bundle).startswith(bundle + os.sep)]
assert not outside, outside
print(len([m for m in sys.modules if m.split(".")[0] == "fvae_ct"]))
"""


@pytest.mark.parametrize("bundle", ["fvae_recon", "fvae_aug_seg", "fvae_ldm"])
def test_unpacked_archive_imports_what_its_configs_name_without_the_installed_package(bundle, tmp_path):
    """An archive unpacked where the installed fvae_ct cannot be imported runs its configs' imports, and every module
    it carries imports, from the vendored copy alone (imports inside functions and lazy submodules included)."""
    import sys
    import zipfile

    sys.path.insert(0, str(ROOT / "tools"))
    from build_bundles import build, config_references, vendored_modules

    archive = build(bundle, tmp_path / "dist")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "site")
    folder = str((tmp_path / "site" / bundle).resolve())
    modules = sorted(config_references(bundle)) + sorted(vendored_modules(bundle) - config_references(bundle))
    r = run([PY, "-c", _ISOLATED_IMPORT, folder, ",".join(modules)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) >= len(modules)


def test_ldm_data_and_evaluation_configs_hold_the_meta_properties(tmp_path):
    """prepare.yaml (latent cache) and evaluate.yaml (FVD / organ HU / mask adherence) are neither a MONAI training
    nor an inference workflow: they are checked for the metadata properties every bundle workflow has."""
    conf = BUNDLES / "fvae_ldm" / "configs"
    for cfg in ("prepare.yaml", "evaluate.yaml"):
        assert check_properties(conf, [cfg], None, bundle_root=str(tmp_path)) == [], cfg
