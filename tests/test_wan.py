"""Wan 2.1 / 2.2 wrappers on tiny random configs of the real diffusers class (no weights exist here)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from torch import nn

from fvae_ct.errors import WeightsError
from fvae_ct.metrics import psnr
from fvae_ct.tiling import TilingConfig
from fvae_ct.vae import WanVAE, load

MEAN = [0.3, -0.2, 0.1, 0.5]
STD = [1.5, 0.5, 2.0, 0.8]


def tiny_wan21(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD)


def tiny_wan22(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=MEAN,
                            latents_std=STD)


def clip(d=6, h=20, w=28, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, d, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def wan():
    return WanVAE(model=tiny_wan21())


def test_properties(wan):
    assert (wan.latent_channels, wan.spatial_factor, wan.depth_factor, wan.input_range) == (4, 8, 4, (-1.0, 1.0))
    assert not wan.training and all(not p.requires_grad for p in wan.parameters())
    w22 = WanVAE(model=tiny_wan22(), name="wan2.2")
    assert (w22.spatial_factor, w22.depth_factor) == (16, 4)


@pytest.mark.parametrize("d,latent_d,decoded_d", [(1, 1, 1), (5, 2, 5), (6, 3, 9), (9, 3, 9)])
def test_causal_depth_padding_and_crop(wan, d, latent_d, decoded_d):
    x = clip(d)
    z = wan.encode(x)
    assert z.shape == (1, 4, latent_d, 3, 4) == (1, 4, *wan.latent_shape((d, 20, 28)))
    assert wan.decode(z).shape == (1, 1, decoded_d, 24, 32)  # aligned (padded) size
    assert wan.reconstruct(x).shape == x.shape  # cropped back


def test_padding_replicates_last_slice_and_edges(wan):
    x = clip(6)
    manual = torch.cat([x, x[:, :, -1:].expand(-1, -1, 3, -1, -1)], 2)  # 6 -> 9 = 1 + 4*2 frames
    manual = torch.cat([manual, manual[..., -1:, :].expand(-1, -1, -1, 4, -1)], 3)  # 20 -> 24 rows
    manual = torch.cat([manual, manual[..., -1:].expand(-1, -1, -1, -1, 4)], 4)  # 28 -> 32 cols
    assert torch.equal(wan.encode(x), wan.encode(manual))


def test_deterministic_posterior_mode_and_normalisation(wan):
    x = clip(5, 16, 16)
    z1, z2 = wan.encode(x), wan.encode(x)
    assert torch.equal(z1, z2)
    with torch.no_grad():
        dist = wan.model.encode(x.expand(-1, 3, -1, -1, -1)).latent_dist
    mean = torch.tensor(MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1, 1)
    assert torch.allclose(z1, (dist.mean - mean) / std, atol=1e-6)  # mode = mean, never a sample
    assert torch.allclose(wan.denormalize(wan.normalize(dist.mean)), dist.mean, atol=1e-6)
    with torch.no_grad():
        ref = wan.model.decode(dist.mean).sample.mean(1, keepdim=True)
    assert torch.allclose(wan.decode(z1), ref, atol=1e-5)


def test_bf16_decode_option_runs_and_stays_close(wan):
    x = clip(5, 16, 16)
    z = wan.encode(x)
    wb = WanVAE(model=wan.model, decode_dtype=torch.bfloat16)
    a, b = wan.decode(z), wb.decode(z)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert float((a - b).abs().max()) < 0.05


def test_wan22_patchify_shapes(wan):
    w22 = WanVAE(model=tiny_wan22(), name="wan2.2")
    x = clip(6, 20, 36)
    z = w22.encode(x)
    assert z.shape == (1, 4, 3, 2, 3)
    assert w22.reconstruct(x).shape == x.shape
    assert torch.equal(z, w22.encode(x))


def _localize(model: AutoencoderKLWan) -> AutoencoderKLWan:
    """Keep only the tap of every conv that sees the voxel's own 8x8 block and mute attention.

    The result is still the real diffusers class, but each output 8x8 pixel block depends only on the same
    input block: the receptive field in which tiling must be exact.
    """
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv3d) and m.weight.shape[2:] != (1, 1, 1):
                kt, kh, kw = m.weight.shape[2:]
                keep = m.weight[:, :, kt - 1, kh // 2, kw // 2].clone()
                m.weight.zero_()
                m.weight[:, :, kt - 1, kh // 2, kw // 2] = keep
            elif isinstance(m, nn.Conv2d) and m.weight.shape[2:] == (3, 3):
                i = 0 if m.stride == (2, 2) else 1  # stride-2 downsample pads right/bottom: tap 0 = own block
                keep = m.weight[:, :, i, i].clone()
                m.weight.zero_()
                m.weight[:, :, i, i] = keep
            elif name.endswith(".proj") and isinstance(m, nn.Conv2d):  # spatial attention output
                m.weight.zero_()
                m.bias.zero_()
    return model


def test_xy_tiling_matches_direct_call_within_receptive_field():
    vae = WanVAE(model=_localize(tiny_wan21(3)))
    x = clip(5, 48, 40, seed=4)
    direct = vae.reconstruct(x)
    for blend in ("cosine", "gaussian", "constant"):
        tiled = vae.reconstruct(x, tiling=TilingConfig(tile_size=24, tile_overlap=8, blend=blend))
        assert torch.allclose(direct, tiled, atol=1e-5), blend
    # the unmodified random model is not local: tiling is then only approximate, but still close
    full = WanVAE(model=tiny_wan21(3))
    a = full.reconstruct(x)
    b = full.reconstruct(x, tiling=TilingConfig(tile_size=32, tile_overlap=16))
    assert not torch.allclose(a, b, atol=1e-5)


def test_depth_windows_cover_long_volumes(wan):
    x = clip(21, 16, 16)
    direct = wan.reconstruct(x)
    windowed = wan.reconstruct(x, tiling=TilingConfig(depth_window=9, depth_overlap=4))
    assert windowed.shape == direct.shape
    # a causal VAE restarts its temporal cache in each window, so windows are close, not identical
    assert psnr(direct, windowed, data_range=2.0) > 20.0


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="not a diffusers AutoencoderKLWan folder"):
        WanVAE(weights=tmp_path)
    m = tiny_wan21()
    m.save_pretrained(tmp_path / "vae")
    v = load("wan2.1", weights=str(tmp_path))  # local diffusers folder with a vae/ subfolder
    x = clip(5, 16, 16)
    assert torch.equal(v.encode(x), WanVAE(model=m).encode(x))


@pytest.mark.parametrize("name", ["cogvideox", "hunyuanvideo", "ltx-video"])
def test_other_diffusers_video_vaes_on_tiny_configs(name, tmp_path):
    """CogVideoX / HunyuanVideo / LTX-Video: depth = time with their own factors and normalisation constants."""
    import diffusers

    from fvae_ct.vae import DiffusersVideoVAE
    from fvae_ct.vae.diffusers_video import VIDEO_VAES

    torch.manual_seed(0)
    cls = getattr(diffusers, VIDEO_VAES[name][0])
    if name == "ltx-video":
        m = cls(latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), scaling_factor=0.8)
        with torch.no_grad():
            m.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            m.latents_std.copy_(torch.tensor([2.0, 0.5, 1.0, 4.0]))
        factors = (32, 8)
    else:
        m = cls(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4)
        factors = (8, 4)
    m.save_pretrained(tmp_path / "vae")
    v = load(name, weights=str(tmp_path))  # the registry, from a local diffusers folder
    assert (v.spatial_factor, v.depth_factor, v.latent_channels) == (*factors, 4)
    x = clip(6, 40, 40)
    z = v.encode(x)
    assert z.shape[2] == 1 + -(-(6 - 1) // factors[1]) and torch.equal(z, v.encode(x))
    with torch.no_grad():
        raw = m.encode(v._pad(x).expand(-1, 3, -1, -1, -1)).latent_dist.mode()  # padded to 1 + k * factor
    assert torch.allclose(v.denormalize(z), raw, atol=1e-5)  # normalisation round trip on the real latent
    if name == "ltx-video":
        expect = (raw - m.latents_mean.view(1, -1, 1, 1, 1)) * 0.8 / m.latents_std.view(1, -1, 1, 1, 1)
    else:
        expect = raw * m.config.scaling_factor
    assert torch.allclose(z, expect, atol=1e-5)
    assert v.reconstruct(x).shape == x.shape
    assert isinstance(v, DiffusersVideoVAE)
