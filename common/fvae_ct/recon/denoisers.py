"""Classical denoisers, the baselines the frozen VAE is compared with (one registry, one line each).

A denoiser maps a HU volume ``[D, H, W]`` (axial axis first, float, already clipped to the HU window),
its ``spacing`` (mm) and the HU ``window`` to a volume of the same shape in HU. Add one with :func:`register_denoiser`
and it appears in every analysis table. The VAE itself enters the table through the recon workflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "Denoiser",
    "DENOISERS",
    "register_denoiser",
    "gaussian",
    "match_gaussian_sigma",
    "noise_sigma",
    "body_noise_sigma",
]


@dataclass(frozen=True)
class Denoiser:
    name: str
    description: str
    fn: Callable[[np.ndarray, tuple, tuple], np.ndarray]


DENOISERS: dict[str, Denoiser] = {}


def register_denoiser(name: str, description: str):
    def deco(fn):
        DENOISERS[name] = Denoiser(name, description, fn)
        return fn

    return deco


def gaussian(x: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Isotropic-in-voxels 3D gaussian of ``sigma_vox`` voxels."""
    return ndi.gaussian_filter(np.asarray(x, np.float64), sigma_vox, mode="nearest")


@register_denoiser("gaussian_1vox", "3D gaussian, sigma = 1 voxel")
def _gauss1(x, spacing, window):
    return gaussian(x, 1.0)


@register_denoiser("median3", "3x3x3 median")
def _median3(x, spacing, window):
    return ndi.median_filter(np.asarray(x, np.float64), size=3, mode="nearest")


# in-plane filters: CT is anisotropic and the VAE works slice by slice, so these are the like-for-like baselines
@register_denoiser("gaussian_inplane_0.5", "2D gaussian per axial slice, sigma = 0.5 voxel")
def _gauss_ip05(x, spacing, window):
    return ndi.gaussian_filter(np.asarray(x, np.float64), (0, 0.5, 0.5), mode="nearest")


@register_denoiser("gaussian_inplane_1", "2D gaussian per axial slice, sigma = 1 voxel")
def _gauss_ip1(x, spacing, window):
    return ndi.gaussian_filter(np.asarray(x, np.float64), (0, 1.0, 1.0), mode="nearest")


@register_denoiser("median3_inplane", "3x3 median per axial slice")
def _median3_ip(x, spacing, window):
    return ndi.median_filter(np.asarray(x, np.float64), size=(1, 3, 3), mode="nearest")


def _per_slice(x: np.ndarray, fn, lo: float, hi: float) -> np.ndarray:
    """Apply a [0, 1] 2D filter to each axial slice of a HU volume."""
    u = (np.clip(x, lo, hi) - lo) / (hi - lo)
    return np.stack([fn(s) for s in u]) * (hi - lo) + lo


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def noise_sigma(s: np.ndarray) -> float:
    """Gaussian noise sigma of a 2D image (Immerkaer 1996: mean |Laplacian-difference kernel| response)."""
    r = ndi.convolve(np.asarray(s, np.float64), _IMMERKAER, mode="nearest")[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(r).mean() / 6.0)


def body_noise_sigma(x: np.ndarray, body_hu: float = -500.0) -> float:
    """Noise sigma (HU) of a CT volume ``[D, H, W]`` measured inside the body only.

    Immerkaer's estimator per axial slice, averaged over the voxels whose whole 3x3 neighbourhood is body
    (``> body_hu``): air clipped to the window has no noise, and counting it (most of a slice) shrinks the
    estimate several-fold. Returns 0 for a volume without body voxels."""
    x = np.asarray(x, np.float64)
    body = ndi.binary_erosion(x > body_hu, np.ones((1, 3, 3), bool))
    if not body.any():
        return 0.0
    r = np.stack([ndi.convolve(s, _IMMERKAER, mode="nearest") for s in x])
    return float(np.sqrt(np.pi / 2) * np.abs(r[body]).mean() / 6.0)


@register_denoiser("bilateral", "bilateral per axial slice (scikit-image; sigma 1 voxel, 3 x body noise sigma in HU)")
def _bilateral(x, spacing, window):
    from skimage.restoration import denoise_bilateral

    lo, hi = window
    sig = max(body_noise_sigma(x), 1.0) / (hi - lo)  # noise in the filter's [0, 1] units

    return _per_slice(
        x, lambda s: denoise_bilateral(s, sigma_color=3.0 * sig, sigma_spatial=1.0, win_size=5, mode="edge"), lo, hi
    )


@register_denoiser("nlm", "non-local means per axial slice (scikit-image; h = 0.8 x body noise sigma)")
def _nlm(x, spacing, window):
    from skimage.restoration import denoise_nl_means

    lo, hi = window
    sig = max(body_noise_sigma(x), 1.0) / (hi - lo)

    def f(s):
        return denoise_nl_means(s, h=0.8 * sig, sigma=sig, patch_size=5, patch_distance=6, fast_mode=True)

    return _per_slice(x, f, lo, hi)


def match_gaussian_sigma(
    x: np.ndarray,
    target: float,
    score: Callable[[np.ndarray], float],
    lo: float = 0.05,
    hi: float = 3.0,
    grid: int = 12,
    iters: int = 8,
) -> float:
    """The smallest gaussian sigma (voxels) at which ``score(gaussian(x, sigma))`` falls to ``target``.

    ``score`` falls with sigma (a noise ratio, a PSNR) at least until the target is reached; a coarse scan
    finds the first crossing and bisection refines it. Returns NaN when no sigma in [lo, hi] reaches the
    target, or when the gentlest gaussian already does (matching the noise ratio of a method that suppresses
    no noise).
    """
    if not np.isfinite(target) or score(gaussian(x, lo)) <= target:  # nothing to match: no-op already there
        return float("nan")
    prev = lo
    for s in np.geomspace(lo, hi, grid)[1:]:
        if score(gaussian(x, s)) <= target:
            a, b = prev, s
            for _ in range(iters):
                mid = 0.5 * (a + b)
                if score(gaussian(x, mid)) > target:
                    a = mid
                else:
                    b = mid
            return float(0.5 * (a + b))
        prev = s
    return float("nan")
