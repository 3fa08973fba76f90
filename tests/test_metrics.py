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
