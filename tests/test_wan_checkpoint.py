"""Wan's original single-file VAE checkpoints (Wan2.1_VAE.pth / Wan2.2_VAE.pth layout), loaded offline.

Tiny original-layout checkpoints are made from tiny random diffusers models with our inverse map; the key layout
the map produces is checked against the official code's (tests/fixtures/wan_keys.json, recorded by
tools/check_wan_parity.py, which also measured exact output parity with the official modules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from fvae_ct.errors import WeightsError
from fvae_ct.vae import load
from fvae_ct.vae.wan_checkpoint import WAN_CONFIGS, diffusers_to_original, original_to_diffusers

FIXTURES = Path(__file__).parent / "fixtures"
TINY = {
    "wan2.1": dict(base_dim=8, z_dim=4),
    "wan2.2": dict(base_dim=8, decoder_base_dim=16, z_dim=4, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16),
}


def _tiny_config(name: str) -> dict:
    return dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
                latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.5, 2.0, 0.8], **TINY[name])


def _tiny_model(name: str, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    m = AutoencoderKLWan(**_tiny_config(name)).eval()
    with torch.no_grad():  # the gammas start at 1 and the biases at 0: make every tensor distinct
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _official_layout(name: str, cfg: dict) -> dict:
    with torch.device("meta"):
        empty = AutoencoderKLWan(**cfg)
    return {k: list(v.shape) for k, v in diffusers_to_original(empty.state_dict(), cfg).items()}


@pytest.mark.parametrize("name", ["wan2.1", "wan2.2"])
def test_inverse_map_gives_the_official_layout_of_the_released_files(name):
    """Full-size official configs on the meta device: our original-layout names and shapes are exactly those of the
    official code (194 tensors for 2.1, 196 for 2.2), and the map is a bijection."""
    official = json.loads((FIXTURES / "wan_keys.json").read_text())[name]
    assert _official_layout(name, WAN_CONFIGS[name]) == official
    with torch.device("meta"):
        sd = AutoencoderKLWan(**WAN_CONFIGS[name]).state_dict()
    back = original_to_diffusers(diffusers_to_original(sd, WAN_CONFIGS[name]), WAN_CONFIGS[name])
    assert list(back) == list(sd)
    assert len(set(diffusers_to_original(sd, WAN_CONFIGS[name]))) == len(sd)


@pytest.mark.parametrize("name", ["wan2.1", "wan2.2"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_single_file_loads_offline_and_matches_the_folder_route(name, fmt, tmp_path):
    model = _tiny_model(name)
    folder = tmp_path / "diffusers"
    model.save_pretrained(folder)  # the folder route: config.json + diffusion_pytorch_model.safetensors
    original = {k: v.clone().contiguous() for k, v in diffusers_to_original(model.state_dict(), _tiny_config(name)).items()}
    f = tmp_path / f"{name}_VAE.{fmt}"
    torch.save(original, f) if fmt == "pth" else save_file(original, str(f))
    a = load(name, weights=str(folder))
    b = load(name, weights=str(f), config=_tiny_config(name))
    for k, v in a.model.state_dict().items():  # 2.1 through diffusers' own converter, 2.2 through ours
        assert torch.equal(v, b.model.state_dict()[k]), k
    x = torch.rand(1, 1, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ya, yb = a.reconstruct(x), b.reconstruct(x)
    assert torch.equal(ya, yb) and float((ya - x).abs().mean()) > 1e-3  # same network, not an identity
    # the config may also come as a config.json (or its folder)
    c = load(name, weights=str(f), config=str(folder))
    assert torch.equal(c.reconstruct(x), ya)


def test_a_file_that_does_not_fit_is_refused_clearly(tmp_path):
    cfg21 = _tiny_config("wan2.1")
    good = {k: v.contiguous() for k, v in diffusers_to_original(_tiny_model("wan2.1").state_dict(), cfg21).items()}
    f = tmp_path / "Wan2.1_VAE.pth"
    torch.save(good, f)
    # a 2.1 file given as wan2.2: the keys and shapes of the 2.2 layout are missing, its own are unexpected
    with pytest.raises(WeightsError, match=r"not an original wan2.2 VAE checkpoint \(expected Wan2.2_VAE.pth.*"
                                           r"missing decoder\.upsamples\.0\.upsamples\.0\..*unexpected decoder\.upsamples\.0\.residual"):
        load("wan2.2", weights=str(f), config=_tiny_config("wan2.2"))
    # the full-size default config against a tiny file: shapes listed
    with pytest.raises(WeightsError, match=r"shapes differ: conv1.bias \(8,\) \(expected \(32,\)\)"):
        load("wan2.1", weights=str(f))
    # truncated download
    t = tmp_path / "Wan2.1_VAE_trunc.pth"
    t.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"Wan2.1_VAE_trunc.pth: cannot read the checkpoint .*truncated download"):
        load("wan2.1", weights=str(t), config=cfg21)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="x.safetensors: cannot read the checkpoint"):
        load("wan2.1", weights=str(bad), config=cfg21)


def test_the_other_release_given_by_mistake_is_named(tmp_path):
    """A full-size Wan 2.1 layout (zeros, on disk as safetensors) given as wan2.2 is recognised as the 2.1 file."""
    with torch.device("meta"):
        sd = AutoencoderKLWan(**WAN_CONFIGS["wan2.1"]).state_dict()
    f = tmp_path / "Wan2.1_VAE.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in diffusers_to_original(sd, WAN_CONFIGS["wan2.1"]).items()}, str(f))
    with pytest.raises(WeightsError, match="it is the wan2.1 VAE file: use --vae wan2.1"):
        load("wan2.2", weights=str(f))
    vae = load("wan2.1", weights=str(f))  # the full-size official config, offline
    assert (vae.latent_channels, vae.spatial_factor) == (16, 8)
