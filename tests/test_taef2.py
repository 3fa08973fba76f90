"""TAEF2 (real weights) and the TAESD-family module: loading, interface, numbers on real CT, tiling."""

from __future__ import annotations

import shutil

import pytest
import torch

from fvae_ct import assets as fassets
from fvae_ct.errors import UnknownVAEError, WeightsError
from fvae_ct.metrics import psnr, ssim
from fvae_ct.tiling import TilingConfig
from fvae_ct.vae import TAESDVAE, list_vaes, load
from fvae_ct.vae.taesd import TAESDDecoder, TAESDEncoder


def test_real_weights_load_strict_and_properties(taef2):
    assert (taef2.latent_channels, taef2.spatial_factor, taef2.depth_factor) == (32, 8, 1)
    assert taef2.input_range == (0.0, 1.0)
    assert not taef2.training
    assert all(not p.requires_grad for p in taef2.parameters())
    n = sum(p.numel() for p in taef2.parameters())
    assert 2_600_000 < n < 2_750_000  # two 2.7 MB fp16 files


def test_frozen_refuses_training(taef2):
    with pytest.raises(RuntimeError, match="refuses to train"):
        taef2.train()
    with pytest.raises(RuntimeError, match="frozen"):
        taef2.requires_grad_(True)
    taef2.eval()  # allowed


def test_encode_decode_shapes_determinism_and_padding(taef2, dicom_unit):
    x = dicom_unit[:, :, :2, 100:141, 200:263]  # 2 slices, 41 x 63: not multiples of 8
    z1, z2 = taef2.encode(x), taef2.encode(x)
    assert z1.shape == (1, 32, 2, 6, 8) == (1, 32, *taef2.latent_shape((2, 41, 63)))
    assert torch.equal(z1, z2)
    assert -3.5 < float(z1.min()) and float(z1.max()) < 3.5  # TAEF2 latents roughly in [-3, 3]
    y = taef2.decode(z1)
    assert y.shape == (1, 1, 2, 48, 64)
    r = taef2.reconstruct(x)
    assert r.shape == x.shape
    assert 0.0 <= float(r.min()) and float(r.max()) <= 1.0
    assert psnr(x, r) > 30.0  # a real reconstruction, not noise
    # stage-2 hooks scale the latent
    taef2.scale_factor = 0.5
    try:
        assert torch.allclose(taef2.encode_stage_2_inputs(x), 0.5 * z1)
        assert torch.allclose(taef2.decode_stage_2_outputs(0.5 * z1), y, atol=1e-6)
    finally:
        taef2.scale_factor = 1.0


def test_real_taef2_on_real_dicom_meets_reference(taef2, dicom_unit):
    """Independent implementation: 39.6 dB and per-slice SSIM 0.978 on this series."""
    r = taef2.reconstruct(dicom_unit)
    p = psnr(dicom_unit, r)
    s2 = ssim(dicom_unit[0, 0], r[0, 0], 2)
    assert p >= 39.3, p
    assert s2 >= 0.97, s2


def test_slice_orientation_matters_upright_is_better(taef2, dicom_unit):
    """The transforms present slices upright (radiological display); transposed slices score worse."""
    x = dicom_unit[:, :, :3]
    up = psnr(x, taef2.reconstruct(x))
    tr = psnr(x.transpose(-1, -2), taef2.reconstruct(x.transpose(-1, -2).contiguous()))
    assert up > tr + 0.2, (up, tr)


def test_tiled_matches_untiled_on_real_ct(taef2, dicom_unit):
    x = dicom_unit[:, :, 8:10]
    full = taef2.reconstruct(x, tiling=TilingConfig(slice_batch=2))
    tiled = taef2.reconstruct(x, tiling=TilingConfig(tile_size=256, tile_overlap=96, slice_batch=1))
    p_full, p_tiled = psnr(x, full), psnr(x, tiled)
    assert abs(p_full - p_tiled) < 0.1, (p_full, p_tiled)
    assert psnr(full, tiled) > 60.0  # the two outputs agree closely voxel by voxel


def test_slice_batch_does_not_change_result(taef2, dicom_unit):
    x = dicom_unit[:, :, :5, :128, :128]
    a = taef2.reconstruct(x, tiling=TilingConfig(slice_batch=1))
    b = taef2.reconstruct(x, tiling=TilingConfig(slice_batch=4))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("latent,pool", [(4, 0), (16, 0), (32, 256)])
def test_taesd_family_variants_roundtrip_strict(tmp_path, latent, pool):
    torch.manual_seed(0)
    enc, dec = TAESDEncoder(latent, width=8, pool_width=pool // 8), TAESDDecoder(latent, width=8, pool_width=pool // 8)
    torch.save(enc.state_dict(), tmp_path / "e.pth")
    torch.save(dec.state_dict(), tmp_path / "d.pth")
    vae = TAESDVAE(tmp_path / "e.pth", tmp_path / "d.pth", latent_channels=latent, pool_width=pool // 8, width=8)
    x = torch.rand(1, 1, 2, 16, 24)
    with torch.no_grad():
        ref = enc(x[0, 0][:, None].expand(-1, 3, -1, -1))
    assert torch.allclose(vae.encode(x)[0].transpose(0, 1), ref, atol=1e-6)
    assert ("pool" in " ".join(enc.state_dict())) == (pool > 0)


def test_wrong_architecture_is_a_clear_error(assets):
    with pytest.raises(WeightsError, match="taef2_decoder.pth.*do not fit"):
        TAESDVAE(assets / "weights" / "taef2_decoder.pth", None)
    with pytest.raises(WeightsError, match="do not fit"):  # TAEF2 weights into a TAESD (4 ch, no pool)
        TAESDVAE(assets / "weights" / "taef2_encoder.pth", None, latent_channels=4, pool_width=0)


def test_wrong_hash_is_refused(tmp_path, monkeypatch, assets):
    bad = tmp_path / "weights"
    bad.mkdir()
    shutil.copy(assets / "weights" / "taef2_encoder.pth", bad / "taef2_encoder.pth")
    with open(bad / "taef2_encoder.pth", "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    monkeypatch.setenv("FVAE_ASSETS", str(tmp_path))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        fassets.resolve("taef2_encoder")


def test_assets_search_order_and_no_download(tmp_path, monkeypatch, assets):
    monkeypatch.setenv("FVAE_ASSETS", f"{tmp_path / 'nothing'}:{assets}")
    assert fassets.resolve("taef2_decoder") == assets / "weights" / "taef2_decoder.pth"
    monkeypatch.setenv("FVAE_ASSETS", str(tmp_path))
    monkeypatch.setenv("FVAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="not found"):
        fassets.resolve("taef2_decoder", download=False)
    (tmp_path / "cache" / "weights").mkdir(parents=True)
    shutil.copy(assets / "weights" / "taef2_decoder.pth", tmp_path / "cache" / "weights")
    assert fassets.resolve("taef2_decoder") == tmp_path / "cache" / "weights" / "taef2_decoder.pth"


def test_registry_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownVAEError, match="valid names: .*taef2.*wan2.1.*wan2.2"):
        load("sdxl-vae")
    names = {v["name"] for v in list_vaes()}
    assert {"taef2", "wan2.1", "wan2.2", "identity"} <= names
    assert all(v["source"] and v["licence"] for v in list_vaes())


def test_bf16_autocast_keeps_fp32_weights_and_is_within_a_tenth_of_a_db(taef2, dicom_unit):
    """vae_dtype bfloat16 for TAEF2 = autocast with fp32 weights; on 2 real 512x512 slices it stays within 0.1 dB of
    fp32 (the rule for using bf16) and is not fp32 in disguise."""
    from fvae_ct.metrics import psnr
    from fvae_ct.vae import load

    bf = load("taef2", dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in bf.parameters()) and bf.autocast_dtype == torch.bfloat16
    x = dicom_unit[:, :, 9:11]
    a, b = taef2.reconstruct(x), bf.reconstruct(x)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert psnr(x, a) - psnr(x, b) < 0.1
