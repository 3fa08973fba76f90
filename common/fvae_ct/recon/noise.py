"""Noise: how much a method leaves in homogeneous tissue (:func:`noise_ratio`), noise made to measure (white, with an
error's spectrum, CT-like) and how much of an inserted noise a method removes (:func:`noise_removed`).

Volumes are HU ``[D, H, W]`` with the axial axis first, ``spacing`` in mm in the same order.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage as ndi

from ..errors import OptionError
from .masks import f64, homogeneous_regions

__all__ = ["noise_ratio", "noise_removed", "white_like", "spectrum_like", "ct_like_noise", "noise_level", "make_noise"]


def noise_ratio(
    x, y, spacing, labels=None, regions=None, soft_tissue=(-150.0, 250.0), min_voxels: int = 100, rtol: float = 1e-6
) -> float:
    """HU noise in homogeneous soft-tissue regions of ``y`` relative to ``x`` (1 = unchanged, < 1 = denoised).

    Noise is the fluctuation around the local mean: each voxel minus the gaussian-weighted mean (sigma 2
    voxels in-plane) of the homogeneous voxels around it (normalised convolution over the region mask,
    so tissue outside the regions never enters the mean). Slow anatomical variation and the partial
    volume a strong blur drags into an organ therefore do not count as noise. Per region (an eroded organ, or a
    connected low-gradient soft-tissue region without labels) whose median HU lies in ``soft_tissue``:
    the standard deviation of that fluctuation in ``y`` over that in ``x`` on the same voxels, leaving out
    voxels of ``x`` farther than 3 robust sigmas (1.4826 MAD) from the median (vessels, gas pockets,
    calcifications). Regions are averaged weighted by their voxel count; bones, gas-filled bowel and
    lungs are not homogeneous and are left out. A region whose noise in ``x`` is below ``rtol`` x its |median HU|
    (a noise-free phantom: only rounding residue) has no ratio; if no region has one, the result is NaN with a
    warning.
    """
    x, y = f64(x), f64(y)
    m, groups = regions if regions is not None else homogeneous_regions(x, spacing, labels)
    w = ndi.gaussian_filter(m.astype(np.float64), (0, 2, 2), mode="constant")
    safe = np.where(w > 1e-6, w, 1.0)
    hx = x - ndi.gaussian_filter(x * m, (0, 2, 2), mode="constant") / safe
    hy = y - ndi.gaussian_filter(y * m, (0, 2, 2), mode="constant") / safe
    ix, fx, fy = x[m], hx[m], hy[m]
    num = den = 0.0
    noiseless = 0
    for g in np.unique(groups):
        k = groups == g
        if k.sum() < min_voxels:
            continue
        a = ix[k]
        med = np.median(a)
        if not soft_tissue[0] <= med <= soft_tissue[1]:
            continue
        mad = 1.4826 * np.median(np.abs(a - med))
        keep = np.abs(a - med) <= 3 * max(mad, 1e-6)
        sa, sb = fx[k][keep].std(), fy[k][keep].std()
        if keep.sum() < min_voxels:
            continue
        if sa <= rtol * max(abs(float(med)), 1.0):  # no measurable noise in the original (a phantom)
            noiseless += 1
            continue
        num += keep.sum() * sb / sa
        den += keep.sum()
    if not den and noiseless:
        warnings.warn(
            f"noise_ratio: the original has no measurable noise in {noiseless} homogeneous region(s) "
            f"(std <= {rtol:g} x |median HU|); returning NaN",
            stacklevel=2,
        )
    return float(num / den) if den else float("nan")


def white_like(err, body, seed: int = 0) -> np.ndarray:
    """White gaussian noise with the RMS of ``err`` inside ``body`` (same shape as ``err``)."""
    err = f64(err)
    rms = float(np.sqrt(np.mean(err[body] ** 2))) if np.any(body) else float(np.sqrt(np.mean(err**2)))
    return np.random.default_rng(seed).normal(0.0, rms, err.shape)


def spectrum_like(err, seed: int = 0) -> np.ndarray:
    """Noise with exactly the 2D power spectrum of ``err`` in every axial slice and random phases: the error's
    texture without its position (a boundary-following error becomes spread-out noise of the same spectrum)."""
    err = f64(err)
    white = np.random.default_rng(seed).normal(size=err.shape)
    w = np.fft.fft2(white, axes=(1, 2))
    mag = np.abs(np.fft.fft2(err, axes=(1, 2)))
    return np.real(np.fft.ifft2(mag * w / np.maximum(np.abs(w), 1e-12), axes=(1, 2)))


def ct_like_noise(shape, sigma_hu: float, seed: int = 0, f0: float = 0.2) -> np.ndarray:
    """Correlated noise like a filtered-back-projection CT's: per axial slice a noise power spectrum
    ``f * exp(-(f / f0)^2)`` (ramp filter x apodisation, cycles/voxel), scaled to ``sigma_hu``."""
    d, h, w = shape
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    f = np.hypot(fy, fx)
    amp = np.sqrt(f * np.exp(-((f / f0) ** 2)))
    white = np.random.default_rng(seed).normal(size=(d, h, w))
    n = np.real(np.fft.ifft2(np.fft.fft2(white, axes=(1, 2)) * amp[None], axes=(1, 2)))
    return n * (sigma_hu / max(float(n.std()), 1e-12))


def noise_removed(y_clean, y_noisy, noise, mask) -> float:
    """Fraction of inserted ``noise`` a method removed: ``1 - RMS(y_noisy - y_clean) / RMS(noise)`` over ``mask``
    (the homogeneous regions), where ``y_clean`` / ``y_noisy`` are the method's outputs for the original and for the
    original plus ``noise``: what of the inserted noise comes through, independent of what the method does to the
    scanner's own noise. 0 = passes it unchanged (the identity), 1 = removes it all, < 0 = amplifies it. For a
    linear filter ``G`` it is ``1 - RMS(G noise) / RMS(noise)``."""
    yc, yn, n = f64(y_clean), f64(y_noisy), f64(noise)
    if not np.any(mask):
        return float("nan")
    return float(1.0 - np.sqrt(np.mean((yn - yc)[mask] ** 2)) / max(np.sqrt(np.mean(n[mask] ** 2)), 1e-12))


def noise_level(kind: str) -> tuple[str, float]:
    """``white<HU>`` / ``ct<HU>`` -> (``"white"`` or ``"ct"``, HU); anything else: :class:`OptionError`."""
    for prefix in ("white", "ct"):
        if kind.startswith(prefix):
            try:
                hu = float(kind[len(prefix) :])
            except ValueError:
                break
            if math.isfinite(hu) and hu >= 0:
                return prefix, hu
    raise OptionError(f"insert_noise {kind!r}: give white<HU> or ct<HU>, e.g. white10, ct20")


def make_noise(kind: str, shape, seed: int) -> np.ndarray:
    """Inserted noise ``white<HU>`` (gaussian) or ``ct<HU>`` (FBP-like correlated, :func:`ct_like_noise`), HU."""
    prefix, hu = noise_level(kind)
    if prefix == "white":
        return np.random.default_rng(seed).normal(0.0, hu, shape)
    return ct_like_noise(shape, hu, seed)
