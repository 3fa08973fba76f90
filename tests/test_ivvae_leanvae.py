"""IV-VAE and LeanVAE, our own implementations: tiny configs with random weights, saved and reloaded strictly
in the official checkpoint formats; shapes, determinism, ranges, causality, streaming; and the full-size key
layouts against fixtures taken from the official code (tools/check_official_parity.py --write-fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fvae_ct.errors import WeightsError
from fvae_ct.testing import keyed_weights, probe, probe_input
from fvae_ct.vae import IVVAE, IVVAE_VARIANTS, LEANVAE_CONFIGS, LeanVAE, list_vaes, load
from fvae_ct.vae.ivvae import IVVAENet
from fvae_ct.vae.leanvae import LeanVAENet, haar, inverse_haar

FIXTURES = Path(__file__).parent / "fixtures"
LEAN_TINY = dict(embedding_dim=48, latent_dim=4, ista_iter_num=2, ista_layer_num=1, l_dim=16, h_dim=32,
                 sep_num_layer=1, fusion_num_layer=2)


def clip(d=9, h=32, w=40, lo=-1.0, hi=1.0, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(1, 1, d, h, w, generator=g)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norm gains included (their default of 1 would hide layout mistakes)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma") or (name.endswith("weight") and p.ndim == 1):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") and p.ndim == 1:
                p.uniform_(-0.1, 0.1)
    return net


def layout(net: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}


# ---- IV-VAE ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ivvae_ckpt(tmp_path_factory) -> Path:
    net = randomize(IVVAENet(z_dim=4, dim=8))
    path = tmp_path_factory.mktemp("ivvae") / "ivvae_tiny.pth"
    torch.save(net.state_dict(), path)  # the official format: a bare state dict
    return path


@pytest.fixture(scope="module")
def ivvae(ivvae_ckpt) -> IVVAE:
    return load("ivvae", weights=str(ivvae_ckpt), latent_scale=1.0, latent_shift=0.0)


def test_ivvae_reload_is_strict_and_exact(ivvae, ivvae_ckpt):
    saved = torch.load(ivvae_ckpt, weights_only=True)
    got = ivvae.model.state_dict()
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert (ivvae.name, ivvae.latent_channels, ivvae.spatial_factor, ivvae.depth_factor) == ("ivvae", 4, 8, 4)
    assert not ivvae.training and not any(p.requires_grad for p in ivvae.parameters())
    broken = dict(saved)
    broken.pop("decoder.head.2.conv_3d.weight")
    bad = ivvae_ckpt.with_name("broken.pth")
    torch.save(broken, bad)
    with pytest.raises(WeightsError, match="(?s)broken.pth.*decoder.head.2.conv_3d.weight"):
        load("ivvae", weights=str(bad), latent_scale=1.0, latent_shift=0.0)
    with pytest.raises(WeightsError, match="z4 dim8, not z16 dim64"):
        load("ivvae_z16_dim64", weights=str(ivvae_ckpt))
    with pytest.raises(WeightsError, match="no published latent scale/shift"):
        load("ivvae", weights=str(ivvae_ckpt))
    with pytest.raises(WeightsError, match="missing.pth.*modelscope"):
        load("ivvae", weights=str(ivvae_ckpt.with_name("missing.pth")))


def test_ivvae_variant_is_taken_from_the_folder(ivvae_ckpt, tmp_path):
    """A folder holding one IV-VAE checkpoint (e.g. only ivvae_z16_dim96.pth, the paper's) loads it, whatever its
    variant; several that fit need the variant named."""
    import shutil

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(ivvae_ckpt, one / "ivvae_z4_dim8.pth")
    vae = load("ivvae", weights=str(one), latent_scale=1.0, latent_shift=0.0)
    assert (vae.latent_channels, vae.model.dim) == (4, 8)
    shutil.copy(ivvae_ckpt, one / "ivvae_z8_dim8.pth")
    with pytest.raises(WeightsError, match="several IV-VAE checkpoints \\(ivvae_z4_dim8.pth, ivvae_z8_dim8.pth\\)"):
        load("ivvae", weights=str(one), latent_scale=1.0, latent_shift=0.0)
    with pytest.raises(WeightsError, match="ivvae_z16_dim64.pth: checkpoint not found"):  # a named variant: its file
        load("ivvae_z16_dim64", weights=str(one))


@pytest.mark.parametrize("d,latent_d", [(1, 1), (5, 2), (7, 3), (9, 3)])
def test_ivvae_shapes_determinism_ranges(ivvae, d, latent_d):
    x = clip(d)
    z = ivvae.encode(x)
    assert z.shape == (1, 4, latent_d, 4, 5) and torch.isfinite(z).all() and z.std() > 1e-3
    assert torch.equal(z, ivvae.encode(x))  # posterior mean: no sampling
    y = ivvae.decode(z)
    assert y.shape == (1, 1, 1 + 4 * (latent_d - 1), 32, 40) and torch.isfinite(y).all()
    r = ivvae.reconstruct(x)
    assert r.shape == x.shape and r.min() >= -1 and r.max() <= 1 and r.std() > 1e-3


def test_ivvae_latent_scale_shift(ivvae_ckpt, ivvae):
    x = clip(5)
    other = load("ivvae", weights=str(ivvae_ckpt), latent_scale=2.0, latent_shift=0.5)
    z1, z2 = ivvae.encode(x), other.encode(x)
    torch.testing.assert_close(z2, 2.0 * (z1 - 0.5))
    torch.testing.assert_close(other.decode(z2), ivvae.decode(z1), rtol=1e-4, atol=1e-5)
    assert IVVAE_VARIANTS[(16, 64)] == (0.9697, -0.1553)  # the published constants


def test_ivvae_is_group_causal(ivvae):
    """Latent frame j sees frames <= 4j only; decoded group j depends on latents <= j only."""
    x = clip(9)
    z = ivvae.encode(x)
    torch.testing.assert_close(ivvae.encode(x[:, :, :5]), z[:, :, :2], rtol=0, atol=1e-6)
    x2 = x.clone()
    x2[:, :, 8] = -x2[:, :, 8]  # change the last frame: only the last latent frame moves
    z2 = ivvae.encode(x2)
    assert torch.equal(z2[:, :, :2], z[:, :, :2]) and (z2[:, :, 2] - z[:, :, 2]).abs().max() > 1e-4
    y = ivvae.decode(z)
    torch.testing.assert_close(ivvae.decode(z[:, :, :2]), y[:, :, :5], rtol=0, atol=1e-6)


def test_ivvae_bf16_close_to_fp32(ivvae_ckpt, ivvae):
    half = load("ivvae", weights=str(ivvae_ckpt), latent_scale=1.0, latent_shift=0.0, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    x = clip(5)
    z32, z16 = ivvae.encode(x), half.encode(x)
    assert z16.dtype == torch.float32
    assert (z16 - z32).abs().max() < 0.1 * z32.abs().max()
    r32, r16 = ivvae.reconstruct(x), half.reconstruct(x)
    assert (r16 - r32).abs().mean() < 0.05 * r32.abs().mean()


@pytest.mark.parametrize("variant", ["z4_dim64", "z8_dim64", "z16_dim64", "z16_dim96"])
def test_ivvae_full_size_layout_matches_official(variant):
    expected = json.loads((FIXTURES / "ivvae_keys.json").read_text())[variant]
    z, d = (int(v) for v in variant[1:].split("_dim"))
    with torch.device("meta"):
        net = IVVAENet(z_dim=z, dim=d)
    assert layout(net) == expected


def _assert_matches_official(got: torch.Tensor, expected: dict) -> None:
    p = probe(got)
    assert p["shape"] == expected["shape"]
    tol = 1e-4 * expected["std"]
    torch.testing.assert_close(torch.tensor(p["values"]), torch.tensor(expected["values"]), rtol=1e-4, atol=tol)
    assert abs(p["mean"] - expected["mean"]) < tol and abs(p["std"] - expected["std"]) < tol


def test_ivvae_outputs_match_official_code():
    """Name-keyed weights, the probe clip: our encode / decode reproduce the official code's outputs
    (recorded by tools/check_official_parity.py from a clone of ali-vilab/iv-vae)."""
    ref = json.loads((FIXTURES / "official_outputs.json").read_text())["ivvae"]
    net = IVVAENet(z_dim=ref["probe"]["z_dim"], dim=ref["probe"]["dim"]).eval()
    net.load_state_dict(keyed_weights(net), strict=True)
    with torch.no_grad():
        z = net.posterior_mean(probe_input(tuple(ref["probe"]["clip"]), -1.0, 1.0))
        y = net.decode(z)
    _assert_matches_official(z, ref["latent"])
    _assert_matches_official(y, ref["decoded"])


# ---- LeanVAE --------------------------------------------------------------------------------------------
def test_haar_values_and_round_trip():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # rows = H, columns = W
    w = haar(x, (-1, -2)).flatten()
    # bands (W, H): ll = sum; lh = W-low, H-high = (1+2)-(3+4); hl = W-high, H-low = (1-2)+(3-4); hh = (1-2)-(3-4)
    assert w.tolist() == [10.0, -4.0, -2.0, 0.0]
    v = torch.randn(2, 3, 4, 6, 8)
    assert haar(v, (2, 3, 4)).shape == (2, 24, 2, 3, 4)
    torch.testing.assert_close(inverse_haar(haar(v, (2, 3, 4)), (2, 3, 4)), v)
    torch.testing.assert_close(inverse_haar(haar(v[:, :, 0], (-1, -2)), (-1, -2)), v[:, :, 0])


@pytest.fixture(scope="module")
def leanvae_ckpt(tmp_path_factory) -> Path:
    net = randomize(LeanVAENet(**LEAN_TINY))
    path = tmp_path_factory.mktemp("leanvae") / "LeanVAE-tiny.ckpt"
    torch.save({"args": dict(LEAN_TINY, use_tile_inference=False), "state_dict": net.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def leanvae(leanvae_ckpt) -> LeanVAE:
    return load("leanvae", weights=str(leanvae_ckpt))


def test_leanvae_reload_is_strict_and_exact(leanvae, leanvae_ckpt, tmp_path):
    saved = torch.load(leanvae_ckpt, weights_only=True)["state_dict"]
    got = leanvae.model.state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    assert (leanvae.latent_channels, leanvae.input_range, leanvae.depth_factor) == (4, (-0.5, 0.5), 4)
    # the official latent normalisation of the width (norm_param of the official Latte configs) is the default
    x = clip(d=5, lo=-0.5, hi=0.5)
    assert leanvae.scale_factor == 0.7744
    assert torch.allclose(leanvae.encode_stage_2_inputs(x), 0.7744 * leanvae.encode(x))
    assert load("leanvae", weights=str(leanvae_ckpt), scale_factor=1.52).scale_factor == 1.52
    # a Lightning training checkpoint: weights under "autoencoder.", losses beside them
    lightning = {"args": dict(LEAN_TINY), "state_dict": {**{f"autoencoder.{k}": v for k, v in saved.items()},
                                                          "perceptual_model.w": torch.ones(1)}}
    torch.save(lightning, tmp_path / "pl.ckpt")
    other = load("leanvae", weights=str(tmp_path / "pl.ckpt"))
    assert all(torch.equal(other.model.state_dict()[k], saved[k]) for k in saved)
    torch.save({"args": dict(LEAN_TINY, h_dim=24, embedding_dim=40), "state_dict": saved}, tmp_path / "wrong.ckpt")
    with pytest.raises(WeightsError, match="(?s)wrong.ckpt.*does not fit"):
        load("leanvae", weights=str(tmp_path / "wrong.ckpt"))
    torch.save(saved, tmp_path / "bare.ckpt")
    with pytest.raises(WeightsError, match="bare.ckpt.*'args'"):
        load("leanvae", weights=str(tmp_path / "bare.ckpt"))


@pytest.mark.parametrize("d,latent_d", [(1, 1), (5, 2), (8, 3), (13, 4)])
def test_leanvae_shapes_determinism_ranges(leanvae, d, latent_d):
    x = clip(d, lo=-0.5, hi=0.5)
    z = leanvae.encode(x)
    assert z.shape == (1, 4, latent_d, 4, 5) and torch.isfinite(z).all() and z.std() > 1e-3
    assert torch.equal(z, leanvae.encode(x))
    y = leanvae.decode(z)
    assert y.shape == (1, 1, 1 + 4 * (latent_d - 1), 32, 40) and torch.isfinite(y).all()
    r = leanvae.reconstruct(x)
    assert r.shape == x.shape and r.min() >= -0.5 and r.max() <= 0.5 and r.std() > 1e-3


def test_leanvae_streaming_is_exact_and_causal(leanvae):
    net = leanvae.model
    x = clip(13, lo=-0.5, hi=0.5).expand(-1, 3, -1, -1, -1)
    whole = net.encode(x, chunk=None)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(net.encode(x, chunk=chunk), whole, rtol=0, atol=1e-5)
    y = net.decode(whole, chunk=None)
    torch.testing.assert_close(net.decode(whole, chunk=1), y, rtol=0, atol=1e-5)
    torch.testing.assert_close(net.encode(x[:, :, :5]), whole[:, :, :2], rtol=0, atol=1e-5)
    torch.testing.assert_close(net.decode(whole[:, :, :2]), y[:, :, :5], rtol=0, atol=1e-5)


def test_leanvae_bf16_close_to_fp32(leanvae_ckpt, leanvae):
    half = load("leanvae", weights=str(leanvae_ckpt), dtype=torch.bfloat16)
    x = clip(5, lo=-0.5, hi=0.5)
    z32, z16 = leanvae.encode(x), half.encode(x)
    assert (z16 - z32).abs().max() < 0.1 * z32.abs().max()


@pytest.mark.parametrize("chunk", [None, 1])
def test_leanvae_outputs_match_official_code(chunk):
    ref = json.loads((FIXTURES / "official_outputs.json").read_text())["leanvae"]
    net = LeanVAENet(**ref["probe"]["config"]).eval()
    net.load_state_dict(keyed_weights(net), strict=True)
    with torch.no_grad():
        z = net.encode(probe_input(tuple(ref["probe"]["clip"]), -0.5, 0.5), chunk=chunk)
        y = net.decode(z, chunk=chunk)
    _assert_matches_official(z, ref["latent"])
    _assert_matches_official(y, ref["decoded"])


@pytest.mark.parametrize("variant", list(LEANVAE_CONFIGS))
def test_leanvae_full_size_layout_matches_official(variant):
    expected = json.loads((FIXTURES / "leanvae_keys.json").read_text())[variant]
    with torch.device("meta"):
        net = LeanVAENet(**LEANVAE_CONFIGS[variant])
    assert layout(net) == expected
    assert round(sum(torch.Size(s).numel() for s in expected.values()) / 1e6, 1) == 39.8  # the published 39.8M


def test_registry_lists_both_with_licences():
    rows = {r["name"]: r for r in list_vaes()}
    for name in ("ivvae", "ivvae_z4_dim64", "ivvae_z8_dim64", "ivvae_z16_dim64", "ivvae_z16_dim96",
                 "leanvae", "leanvae_dim4", "leanvae_dim16"):
        assert name in rows and rows[name]["licence"].startswith("MIT"), name
    assert "modelscope" in rows["ivvae"]["source"].lower() and "Yumic/LeanVAE" in rows["leanvae"]["source"]
