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
from monai.metrics.regression import compute_ssim_and_cs

from ..transforms import DEFAULT_HU_WINDOW, hu_to_unit

__all__ = ["recon_metrics", "psnr", "ssim", "ssim_unavailable", "PROTOCOL"]

PROTOCOL = (
    "HU clipped to the window and scaled to [0,1] (data range 1); PSNR and MSE over the whole volume on the "
    "original grid; mse_hu in HU^2 of the clipped volumes; ssim3d: MONAI SSIMMetric 3D, gaussian window 11, "
    "sigma 1.5 (shrunk to the largest odd size along axes shorter than 11); ssim2d: SSIMMetric 2D per axial "
    "slice, averaged; reconstruction rounded to integer HU before scoring; SSIM is n/a when an axis has fewer than 3 "
    "voxels."
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
    out = m(y[:, None], x[:, None])
    assert isinstance(out, torch.Tensor)  # a tensor batch in: one tensor of scores out
    return float(out.mean())


def ssim_unavailable(shape, spatial_dims: int) -> str | None:
    """Why SSIM is not defined for a ``[D, H, W]`` volume (3D) or its axial slices (2D), else ``None``."""
    dims = tuple(shape)[-spatial_dims:]
    if min(_win(n) for n in dims) >= 3:
        return None
    what = "volume is" if spatial_dims == 3 else "axial slices are"
    return f"n/a: the {what} {'x'.join(map(str, dims))} voxels; the SSIM window needs at least 3 along every axis"


def _unit_chunk(a, window) -> torch.Tensor:
    """A slab of HU (numpy/torch, any dtype) -> float64 [0, 1] tensor (a copy of the slab only)."""
    return hu_to_unit(_t(a), window)


def _ssim_map_sum(x: torch.Tensor, y: torch.Tensor, spatial_dims: int, win: list[int]) -> torch.Tensor:
    """Per-item sums (float64) of MONAI's SSIM map (valid convolution, gaussian sigma 1.5) of ``[N, *spatial]``."""
    s, _ = compute_ssim_and_cs(
        y[:, None].float(), x[:, None].float(), spatial_dims, win, [1.5] * spatial_dims, data_range=1.0
    )
    return s.reshape(s.shape[0], -1).double().sum(1)


def recon_metrics(hu_in, hu_out, window=DEFAULT_HU_WINDOW, chunk: int = 8) -> dict[str, float]:
    """PSNR / SSIM (3D and per slice) / MSE of ``hu_out`` against ``hu_in``, both ``[D, H, W]`` in HU.

    Streamed over axial slabs of ``chunk`` slices (3D SSIM slabs overlap by the window minus one), so the memory
    beyond the two volumes is a few slabs, whatever ``D``; the inputs are read, never copied whole (an int16
    reconstruction is fine). The results equal the whole-volume computation to float rounding (about 1e-7).
    SSIM that is not defined (an axis under 3 voxels, see :func:`ssim_unavailable`) is NaN.
    """
    if tuple(hu_in.shape) != tuple(hu_out.shape):
        raise ValueError(f"shapes differ: original {tuple(hu_in.shape)} vs reconstruction {tuple(hu_out.shape)}")
    nd, nh, nw = hu_in.shape
    lo, hi = window
    chunk = max(1, int(chunk))
    se, ae, s2d = 0.0, 0.0, []
    win2 = [_win(nh), _win(nw)]
    for a in range(0, nd, chunk):
        x, y = _unit_chunk(hu_in[a : a + chunk], window), _unit_chunk(hu_out[a : a + chunk], window)
        d = x - y
        se += float((d * d).sum())
        ae += float(d.abs().sum())
        if min(win2) >= 3:
            n_map = (nh - win2[0] + 1) * (nw - win2[1] + 1)
            s2d.append(_ssim_map_sum(x, y, 2, win2) / n_map)
    win3 = [_win(nd), *win2]
    ssim3d = float("nan")
    if min(win3) >= 3:
        out_d = nd - win3[0] + 1  # valid output slices of the 3D map; slab [a, b) needs input [a, b + w - 1)
        total = 0.0
        for a in range(0, out_d, chunk):
            b = min(a + chunk, out_d)
            x = _unit_chunk(hu_in[a : b + win3[0] - 1], window)
            y = _unit_chunk(hu_out[a : b + win3[0] - 1], window)
            total += float(_ssim_map_sum(x[None], y[None], 3, win3)[0])
        ssim3d = total / (out_d * (nh - win3[1] + 1) * (nw - win3[2] + 1))
    n = nd * nh * nw
    mse = se / n
    return {
        "psnr": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse),
        "ssim3d": ssim3d,
        "ssim2d": float(torch.cat(s2d).mean()) if s2d else float("nan"),
        "mse": mse,
        "mse_hu": mse * (hi - lo) ** 2,
        "mae_hu": ae / n * (hi - lo),
    }
