"""Reconstruction metrics protocol (documented in the fvae_recon bundle README).

Inputs are HU volumes on the original grid, axial axis first: ``[D, H, W]`` (numpy or torch).

- both volumes are clipped to the HU window and scaled to [0, 1] (data range 1);
- ``psnr`` = 10 log10(1 / MSE) over the whole volume; ``mse`` in that [0, 1] scale; ``mse_hu`` in HU^2
  (of the clipped volumes);
- ``ssim3d``: MONAI ``SSIMMetric`` on the volume, gaussian window 11 (sigma 1.5), shrunk to the largest
  odd size that fits along an axis shorter than 11 voxels;
- ``ssim2d``: the same on each axial slice, averaged over slices.

Label maps never go through a VAE for metrics.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import SSIMMetric

from ..transforms import DEFAULT_HU_WINDOW, hu_to_unit

__all__ = ["recon_metrics", "psnr", "ssim", "PROTOCOL"]

PROTOCOL = (
    "HU clipped to the window and scaled to [0,1] (data range 1); PSNR and MSE over the whole volume on the "
    "original grid; mse_hu in HU^2 of the clipped volumes; ssim3d: MONAI SSIMMetric 3D, gaussian window 11, "
    "sigma 1.5 (shrunk to the largest odd size along axes shorter than 11); ssim2d: SSIMMetric 2D per axial "
    "slice, averaged; reconstruction rounded to integer HU before scoring."
)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, dtype=torch.float64)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    mse = float(torch.mean((_t(x) - _t(y)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _win(n: int, w: int = 11) -> int:
    return w if n >= w else max(1, n - 1 + n % 2)


def ssim(x: torch.Tensor, y: torch.Tensor, spatial_dims: int) -> float:
    """Mean SSIM of ``[N, *spatial]`` batches in [0, 1] (N volumes or N slices), gaussian window 11."""
    x, y = _t(x).float(), _t(y).float()
    win = [_win(n) for n in x.shape[1:]]
    if min(win) < 3:
        return float("nan")
    m = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=win, kernel_sigma=1.5)
    return float(m(y[:, None], x[:, None]).mean())


def recon_metrics(hu_in, hu_out, window=DEFAULT_HU_WINDOW) -> dict[str, float]:
    """PSNR / SSIM (3D and per slice) / MSE of ``hu_out`` against ``hu_in``, both ``[D, H, W]`` in HU."""
    x, y = _t(hu_in), _t(hu_out)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: original {tuple(x.shape)} vs reconstruction {tuple(y.shape)}")
    xu, yu = hu_to_unit(x, window), hu_to_unit(y, window)
    lo, hi = window
    mse = float(torch.mean((xu - yu) ** 2))
    return {
        "psnr": psnr(xu, yu),
        "ssim3d": ssim(xu[None], yu[None], 3),
        "ssim2d": ssim(xu, yu, 2),
        "mse": mse,
        "mse_hu": mse * (hi - lo) ** 2,
        "mae_hu": float(torch.mean(torch.abs(xu - yu))) * (hi - lo),
    }
