"""The external-adapter path: a VAE class from the user's own code (a small local package written here)."""

from __future__ import annotations

import json
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch

from fvae_ct.errors import WeightsError
from fvae_ct.vae import load

PKG = '''
import torch
from torch import nn


class Posterior:
    def __init__(self, mean):
        self.mean = mean

    def mode(self):
        return self.mean

    def sample(self):
        return self.mean + torch.randn_like(self.mean)


class TinyVideoVAE(nn.Module):
    """4x temporal (causal: 1 + 4k frames), 8x spatial, 4 latent channels; posterior object like the official repos."""

    def __init__(self, z=4, scale=0.5):
        super().__init__()
        self.enc = nn.Conv3d(3, z, (1, 8, 8), stride=(1, 8, 8))
        self.dec = nn.ConvTranspose3d(z, 3, (1, 8, 8), stride=(1, 8, 8))
        self.scale = scale

    def encode(self, x):
        first, rest = x[:, :, :1], x[:, :, 1:]
        t = rest.shape[2] // 4
        pooled = rest.reshape(*rest.shape[:2], t, 4, *rest.shape[3:]).mean(3) if t else rest
        return Posterior(self.enc(torch.cat([first, pooled], 2)) * self.scale)

    def decode(self, z):
        y = self.dec(z / self.scale)
        return (torch.cat([y[:, :, :1], y[:, :, 1:].repeat_interleave(4, 2)], 2).tanh(),)
'''


@pytest.fixture()
def repo(tmp_path):
    (tmp_path / "tinyvae").mkdir()
    (tmp_path / "tinyvae" / "__init__.py").write_text(textwrap.dedent(PKG))
    return tmp_path


def test_external_vae_from_a_local_clone(repo):
    vae = load("external", weights=str(repo), target="tinyvae.TinyVideoVAE", kwargs={"z": 4, "scale": 0.5},
               latent_channels=4, spatial_factor=8, depth_factor=4, input_range=(-1, 1))
    assert not vae.training and all(not p.requires_grad for p in vae.parameters())
    x = torch.rand(1, 1, 6, 20, 28) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (1, 4, 3, 3, 4)  # 6 slices -> 9 = 1 + 4 * 2 frames; 20 x 28 -> 24 x 32 -> 3 x 4
    assert torch.equal(z, vae.encode(x))  # the posterior's mode, never a sample
    y = vae.reconstruct(x)
    assert y.shape == x.shape and -1 <= float(y.min()) and float(y.max()) <= 1


def test_external_and_ivvae_through_the_recon_bundle(repo, assets, tmp_path):
    """`--vae videovae_plus` (a dummy local clone) and a tiny IV-VAE checkpoint through `fvae recon`: the
    constructor arguments go in --vae_kwargs; outputs keep the input's shape and affine."""
    from conftest import PY, run

    from fvae_ct.testing import keyed_weights
    from fvae_ct.vae.ivvae import IVVAENet

    net = IVVAENet(z_dim=4, dim=8)
    torch.save(keyed_weights(net), tmp_path / "ivvae_tiny.pth")
    ct = assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"
    ref = nib.load(str(ct))
    runs = {
        "videovae_plus": (str(repo), {"target": "tinyvae.TinyVideoVAE", "kwargs": {"z": 4}, "latent_channels": 4,
                                      "spatial_factor": 8, "depth_factor": 4, "input_range": [-1, 1]}),
        "ivvae": (str(tmp_path / "ivvae_tiny.pth"), {"latent_scale": 1.0, "latent_shift": 0.0}),
    }
    for name, (weights, kwargs) in runs.items():
        out = tmp_path / name
        r = run([PY, "-m", "fvae_ct.cli", "recon", str(ct), "-o", str(out), "--vae", name, "--vae_weights", weights,
                 "--vae_kwargs", json.dumps(kwargs), "--figures", "False"])
        assert r.returncode == 0, r.stderr[-3000:]
        img = nib.load(str(out / "totalseg_ct_sm_3mm_recon.nii.gz"))
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["vae"] == name and summary["vae_properties"]["latent_channels"] == 4
        assert np.isfinite(summary["metrics"]["psnr"]["mean"])


def test_videovae_plus_needs_its_repository(tmp_path, repo):
    with pytest.raises(WeightsError, match="give target="):
        load("videovae_plus")
    with pytest.raises(WeightsError, match="local clone .* does not exist"):
        load("videovae_plus", weights=str(tmp_path / "missing"), target="videovae.models.Model")
    with pytest.raises(WeightsError, match="cannot import videovae.models.Model"):
        load("videovae_plus", weights=str(repo), target="videovae.models.Model")
    with pytest.raises(WeightsError, match="dotted path"):
        load("external", weights=str(repo), target="TinyVideoVAE")


def test_compare_vaes_table(assets, tmp_path):
    """taef2, the identity control and a (tiny, random) LeanVAE checkpoint in one table; an IV-VAE whose weights
    are missing is reported at the end with a non-zero exit while the others are still compared."""
    import csv

    from conftest import PY, run

    from fvae_ct.vae.leanvae import LeanVAENet

    torch.manual_seed(0)
    cfg = dict(embedding_dim=48, latent_dim=4, ista_iter_num=1, ista_layer_num=1, l_dim=16, h_dim=32,
               sep_num_layer=1, fusion_num_layer=1)
    torch.save({"args": cfg, "state_dict": LeanVAENet(**cfg).state_dict()}, tmp_path / "lean.ckpt")
    weights = json.dumps({"leanvae": str(tmp_path / "lean.ckpt"), "ivvae": str(tmp_path / "nowhere.pth")})
    out = tmp_path / "cmp"
    r = run([PY, "-m", "fvae_ct.cli", "compare-vaes", str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"), "--vaes",
             "taef2,identity,ivvae,leanvae", "--output_dir", str(out), "--weights", weights, "--labels",
             str(assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz")])
    assert r.returncode == 1
    assert "1 of 4 VAEs failed" in r.stderr and "nowhere.pth" in r.stderr, r.stderr[-3000:]
    rows = {x["vae"]: x for x in csv.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"taef2", "identity", "leanvae"}
    assert float(rows["identity"]["boundary_shift_mean_mm"]) == 0.0 and float(rows["identity"]["noise_ratio"]) == 1.0
    assert 25 < float(rows["taef2"]["psnr"]) < 40 and float(rows["taef2"]["peak_rss_mib"]) > 100
    # each VAE ran in a process of its own: the identity control, run after TAEF2, needs less than TAEF2 did
    # (measured 685 vs 746 MiB), which one process sampling its whole RSS could not show
    assert float(rows["identity"]["peak_rss_mib"]) < float(rows["taef2"]["peak_rss_mib"])
    assert float(rows["identity"]["edge_width_ratio"]) == pytest.approx(1.0) and "edge_sharpness" not in rows["taef2"]
    assert np.isfinite(float(rows["leanvae"]["psnr"]))  # random weights: a number, not a good one
    assert "| taef2 |" in (out / "compare.md").read_text()
    img = nib.load(str(out / "leanvae" / "totalseg_ct_sm_3mm_recon.nii.gz"))
    ref = nib.load(str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"))
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
