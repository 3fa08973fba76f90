"""The reconstruction metrics protocol on volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fvae_ct.metrics import psnr, recon_metrics, ssim


def test_psnr_and_mse_known_values():
    x = np.zeros((12, 16, 16), np.float32)
    y = x + 20.0  # 20 HU everywhere = 0.01 in the [0, 1] scale of a 2000 HU window
    m = recon_metrics(x, y)
    assert m["mse"] == pytest.approx(1e-4, rel=1e-6)
    assert m["psnr"] == pytest.approx(40.0, abs=1e-6)
    assert m["mse_hu"] == pytest.approx(400.0, rel=1e-6)
    assert m["mae_hu"] == pytest.approx(20.0, rel=1e-6)
    assert recon_metrics(x, x)["psnr"] == math.inf


def test_window_clips_before_scoring():
    x = np.full((12, 12, 12), 1500.0)  # bone above the window
    y = np.full((12, 12, 12), 1000.0)
    assert recon_metrics(x, y)["mse"] == 0.0
    m = recon_metrics(x, y, window=(-1000, 2000))
    assert m["mse_hu"] == pytest.approx(500.0**2, rel=1e-6)


def test_ssim_identity_noise_and_slice_average():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 24, 24, generator=g)
    assert ssim(x[None], x[None], 3) == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.2 * torch.randn(12, 24, 24, generator=g)).clamp(0, 1)
    s3, s2 = ssim(x[None], noisy[None], 3), ssim(x, noisy, 2)
    assert 0.3 < s3 < 0.95 and 0.3 < s2 < 0.95
    # ssim2d is the mean of per-slice values
    per = [ssim(x[i : i + 1], noisy[i : i + 1], 2) for i in range(12)]
    assert s2 == pytest.approx(float(np.mean(per)), abs=1e-6)


def test_short_axes_shrink_the_window():
    x = torch.rand(3, 20, 20)
    assert ssim(x[None], x[None], 3) == pytest.approx(1.0, abs=1e-6)  # depth 3 < 11: window 3 there
    assert math.isnan(ssim(torch.rand(1, 2, 20, 20), torch.rand(1, 2, 20, 20), 3))  # too thin for any window


def test_psnr_data_range():
    a, b = torch.zeros(10), torch.full((10,), 0.1)
    assert psnr(a, b, data_range=2.0) == pytest.approx(psnr(a, b) + 20 * math.log10(2.0))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        recon_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def _whole_volume_reference(hu_in, hu_out, window=(-1000, 1000)):
    """The metrics as computed by the reference path (whole volume, float64 copies, MONAI's SSIMMetric)."""
    from fvae_ct.transforms import hu_to_unit

    x, y = torch.as_tensor(hu_in, dtype=torch.float64), torch.as_tensor(hu_out, dtype=torch.float64)
    xu, yu = hu_to_unit(x, window), hu_to_unit(y, window)
    mse = float(torch.mean((xu - yu) ** 2))
    return {"psnr": 10 * math.log10(1 / mse), "ssim3d": ssim(xu[None], yu[None], 3), "ssim2d": ssim(xu, yu, 2),
            "mse": mse, "mae_hu": float(torch.mean(torch.abs(xu - yu))) * (window[1] - window[0])}


@pytest.mark.parametrize("shape,chunk", [((23, 40, 36), 8), ((23, 40, 36), 1), ((23, 40, 36), 100), ((5, 30, 30), 2),
                                         ((11, 17, 13), 3)])
def test_streamed_metrics_equal_the_whole_volume_computation(shape, chunk, dicom_unit):
    """Real CT (a crop of the sample series) + structured noise; streamed over slabs of `chunk` slices: identical to
    the whole-volume computation within 1e-6."""
    g = np.random.default_rng(1)
    vol = dicom_unit.numpy()[0, 0] * 2000 - 1000  # [20, 512, 512], upright axial slices
    vol = np.concatenate([vol, vol[::-1]])  # 40 slices, mirrored
    hu = np.ascontiguousarray(vol[:, 40::11, 30::12][: shape[0], : shape[1], : shape[2]])  # whole body, coarse
    assert hu.shape == shape and hu.std() > 50
    rec = np.clip(np.round(hu + g.normal(0, 40, shape) + 30 * np.sin(np.arange(shape[0]))[:, None, None]),
                  -32768, 32767).astype(np.int16)
    ref, got = _whole_volume_reference(hu, rec), recon_metrics(hu, rec, chunk=chunk)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), (k, got[k], v)
    assert 0.2 < got["ssim3d"] < 0.99 and 10 < got["psnr"] < 40


def test_ssim_not_defined_is_explained():
    from fvae_ct.metrics import ssim_unavailable

    x = np.zeros((2, 20, 20))
    m = recon_metrics(x, x + 5)
    assert math.isnan(m["ssim3d"]) and m["ssim2d"] == pytest.approx(1.0, abs=1e-3) and m["psnr"] > 40
    assert ssim_unavailable(x.shape, 3) == "n/a: the volume is 2x20x20 voxels; the SSIM window needs at least 3 along every axis"
    assert ssim_unavailable((3, 20, 20), 3) is None and ssim_unavailable((2, 20, 20), 2) is None
    assert "axial slices are 2x20" in ssim_unavailable((5, 2, 20), 2)
