"""Is the reconstruction a boundary-preserving denoiser? Numbers for the claim, and :func:`analyze`, all of them.

Here: the spectrum, the boundary shift, the edge sharpness, the error near / far from boundaries and the noise
floor. The masks (:mod:`.masks`), the edge-profile fits (:mod:`.edges`) and the noise measures (:mod:`.noise`)
have modules of their own and are re-exported here.

All functions take the original ``x`` and a reconstruction / filtered volume ``y`` in HU, ``[D, H, W]``
with the axial axis first, the voxel ``spacing`` (mm, same axis order) and, optionally, an integer
``labels`` map on the same grid (0 = background). Without labels, boundaries are 3D gradient-magnitude
edges of ``x`` inside the body.

- :func:`error_spectrum`: radially averaged 2D power spectra (per axial slice, averaged over slices) of
  ``y - x`` and of ``x``, and the fraction of the error's energy above a cutoff frequency. On the discrete
  grid, white noise has a fraction of ``1 - pi * cutoff**2`` (0.80 for the default 0.25 cycles/voxel) and
  a smooth error (a blur, a shift of large structures) a fraction near 0.
- :func:`boundary_shift`: per organ, x and y are thresholded at the midpoint between the organ's inside
  and outside mean intensity (measured on ``x`` in a band around its boundary) and the symmetric surface
  distance (mm) between the two thresholded surfaces is reported (mean and 95th percentile over all
  surface points). Without labels: distances between the edges of ``y`` and of ``x``.
- :func:`edge_profiles`: profiles of ``x`` and ``y`` along the original's surface normals, each fitted with an
  error-function edge: the median 10-90 % width ratio (blur) and the median signed offset of the edge (mm,
  displacement), separately; shift-invariant for the width, robust to noise for both.
- :func:`noise_floor`: the same boundary measures for the original plus noise of a method's own error (white,
  and with its spectrum), so a shift can be compared with what noise alone causes.
- :func:`edge_sharpness`: mean gradient magnitude on the boundaries in ``y`` relative to ``x``; kept for
  comparison, but it mixes displacement (a 1-voxel move of a sharp edge reads 0.56) and texture (white noise
  reads > 1): read :func:`edge_profiles` instead.
- :func:`noise_ratio`: HU standard deviation in homogeneous soft-tissue regions of ``y`` relative to ``x``.
- :func:`error_near_far`: mean |y - x| within 1 mm of boundaries and elsewhere in the body.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .edges import edge_profiles, fit_edges
from .masks import (
    body_mask,
    boundary_mask,
    box,
    edge_mask,
    f64,
    grad_mag,
    homogeneous_mask,
    homogeneous_regions,
    organs,
    reference,
    surface,
)
from .noise import ct_like_noise, noise_ratio, noise_removed, spectrum_like, white_like

__all__ = [
    "error_spectrum",
    "boundary_shift",
    "edge_sharpness",
    "edge_profiles",
    "fit_edges",
    "noise_floor",
    "noise_removed",
    "white_like",
    "spectrum_like",
    "ct_like_noise",
    "noise_ratio",
    "error_near_far",
    "homogeneous_regions",
    "homogeneous_mask",
    "reference",
    "body_mask",
    "boundary_mask",
    "edge_mask",
    "analyze",
]


# ---- spectra ---------------------------------------------------------------------------------------------
def _radial_power(v: np.ndarray, nbins: int):
    """Mean over axial slices of |FFT2|^2, radially averaged in cycles/voxel."""
    d, h, w = v.shape
    p = (np.abs(np.fft.fft2(v, axes=(1, 2))) ** 2).mean(0) / (h * w)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    r = np.hypot(fy, fx)
    edges = np.linspace(0, np.sqrt(0.5), nbins + 1)
    idx = np.clip(np.digitize(r.ravel(), edges) - 1, 0, nbins - 1)
    s = np.bincount(idx, weights=p.ravel(), minlength=nbins)
    n = np.bincount(idx, minlength=nbins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return centres, np.where(n > 0, s / np.maximum(n, 1), np.nan), p, r


def error_spectrum(x, y, cutoff: float = 0.25, nbins: int | None = None) -> dict:
    """Radial power spectra of ``y - x`` and of ``x`` and the error's energy fraction above ``cutoff``.

    Returns ``{"freq": [cycles/voxel], "error_power": [...], "image_power": [...], "hf_fraction": float}``.
    """
    x, y = f64(x), f64(y)
    nb = nbins or max(8, min(x.shape[1:]) // 2)
    f, pe, p2e, r = _radial_power(y - x, nb)
    _, px, _, _ = _radial_power(x - x.mean(), nb)
    total = p2e.sum()
    hf = float(p2e[r > cutoff].sum() / total) if total > 0 else float("nan")
    return {"freq": f, "error_power": pe, "image_power": px, "hf_fraction": hf, "cutoff": cutoff}


# ---- boundary position ------------------------------------------------------------------------------------
def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Symmetric surface distances (mm) between the surfaces of masks ``a`` and ``b``."""
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        return np.array([np.nan])
    db = ndi.distance_transform_edt(~sb, sampling=spacing)
    da = ndi.distance_transform_edt(~sa, sampling=spacing)
    return np.concatenate([db[sa], da[sb]])


def boundary_shift(x, y, spacing, labels=None, band_mm: float = 6.0, ref: dict | None = None) -> dict:
    """Symmetric surface distance (mm) between boundaries in ``x`` and ``y``: mean, p95, per organ.

    With labels, each organ's boundary is re-found by thresholding both volumes in a ``band_mm`` band
    around the labelled surface, at the midpoint between the organ's inside and outside mean HU in ``x``.
    Without labels, edges of ``y`` are compared with edges of ``x`` (:func:`edge_mask`) in both directions.
    """
    x, y = f64(x), f64(y)
    spacing = tuple(float(s) for s in spacing)
    dists, per = [], {}
    if labels is None:
        ref = ref or reference(x, spacing, None)
        ex, ey = ref["boundaries"], edge_mask(y, spacing, body=ref["body"])
        if ex.any() and ey.any():
            dx = ndi.distance_transform_edt(~ex, sampling=spacing)
            dy = ndi.distance_transform_edt(~ey, sampling=spacing)
            dists = [dx[ey], dy[ex]]
    else:
        full = np.asarray(labels)
        for organ in organs(full):
            roi = box(full == organ, 2 * band_mm, spacing)  # work in the organ's neighbourhood only
            m, xo, yo = full[roi] == organ, x[roi], y[roi]
            d_in = ndi.distance_transform_edt(m, sampling=spacing)
            d_out = ndi.distance_transform_edt(~m, sampling=spacing)
            band = (m & (d_in <= band_mm)) | (~m & (d_out <= band_mm))
            shell = min(band_mm, 3.0)  # intensities next to the surface, not of the neighbours further out
            inside, outside = xo[m & (d_in <= shell)], xo[~m & (d_out <= shell)]
            if inside.size < 10 or outside.size < 10:
                continue
            mu_in, mu_out = inside.mean(), outside.mean()
            if abs(mu_in - mu_out) < 20.0:  # no contrast at this boundary: nothing to threshold
                continue
            t = 0.5 * (mu_in + mu_out)
            core = m & ~band
            ax_ = ((xo > t) if mu_in > mu_out else (xo < t)) & band | core
            ay_ = ((yo > t) if mu_in > mu_out else (yo < t)) & band | core
            d = _surface_distances(ax_, ay_, spacing)
            d = d[np.isfinite(d)]
            if d.size:
                per[organ] = {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95))}
                dists.append(d)
    if not dists:
        return {"mean_mm": float("nan"), "p95_mm": float("nan"), "per_organ": per}
    d = np.concatenate(dists)
    return {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95)), "per_organ": per}


def edge_sharpness(x, y, spacing, labels=None, ref: dict | None = None) -> float:
    """Mean gradient magnitude of ``y`` on the boundaries over that of ``x`` (1 = as sharp, < 1 = blurred)."""
    x, y = f64(x), f64(y)
    b = (ref or reference(x, spacing, labels))["boundaries"]
    if not b.any():
        return float("nan")
    gx, gy = grad_mag(x, spacing, 0.0), grad_mag(y, spacing, 0.0)
    return float(gy[b].mean() / max(gx[b].mean(), 1e-9))


# ---- noise floors and the whole set ------------------------------------------------------------------------
def noise_floor(
    x, y, spacing, labels=None, ref: dict | None = None, lo: float = -1000.0, hi: float = 1000.0, seed: int = 0
) -> dict:
    """What noise alone does to the boundary measures: the original plus noise of the method's own error ``y - x``
    (white with its RMS inside the body, and with its spectrum, :func:`spectrum_like`), clipped to the window,
    scored like the method. Keys ``floor_{white,spectrum}_{shift_mean_mm,shift_p95_mm,abs_offset_mm,width_ratio}``."""
    x, y = f64(x), f64(y)
    ref = ref or reference(x, spacing, labels)
    err = y - x
    out = {}
    for kind, n in (("white", white_like(err, ref["body"], seed)), ("spectrum", spectrum_like(err, seed))):
        z = np.clip(x + n, lo, hi)
        sh = boundary_shift(x, z, spacing, labels, ref=ref)
        ep = edge_profiles(x, z, spacing, labels, ref=ref)
        out[f"floor_{kind}_shift_mean_mm"] = sh["mean_mm"]
        out[f"floor_{kind}_shift_p95_mm"] = sh["p95_mm"]
        out[f"floor_{kind}_abs_offset_mm"] = ep["abs_offset_mm"]
        out[f"floor_{kind}_width_ratio"] = ep["width_ratio"]
    return out


def error_near_far(x, y, spacing, labels=None, within_mm: float = 1.0, ref: dict | None = None) -> tuple[float, float]:
    """Mean |y - x| (HU) within ``within_mm`` of boundaries, and elsewhere inside the body."""
    x, y = f64(x), f64(y)
    ref = ref or reference(x, spacing, labels)
    body, e = ref["body"], ref["boundaries"]
    near = ndi.distance_transform_edt(~e, sampling=spacing) <= within_mm if e.any() else np.zeros_like(e)
    err = np.abs(y - x)
    far = body & ~near
    nb = near & body if labels is None else near
    return (float(err[nb].mean()) if nb.any() else float("nan"), float(err[far].mean()) if far.any() else float("nan"))


def analyze(x, y, spacing, labels=None, cutoff: float = 0.25, ref: dict | None = None) -> dict:
    """Every boundary/noise figure of ``y`` against ``x`` in one dict (see the module docstring).

    ``ref``: :func:`reference` of ``x`` when several ``y`` are scored against the same original."""
    ref = ref or reference(x, spacing, labels)
    spec = error_spectrum(x, y, cutoff)
    shift = boundary_shift(x, y, spacing, labels, ref=ref)
    near, far = error_near_far(x, y, spacing, labels, ref=ref)
    ep = edge_profiles(x, y, spacing, labels, ref=ref)
    return {
        "noise_ratio": noise_ratio(x, y, spacing, labels, ref["regions"]),
        "boundary_shift_mean_mm": shift["mean_mm"],
        "boundary_shift_p95_mm": shift["p95_mm"],
        "edge_width_ratio": ep["width_ratio"],
        "edge_added_blur_mm": ep["added_blur_mm"],
        "edge_offset_mm": ep["offset_mm"],
        "edge_abs_offset_mm": ep["abs_offset_mm"],
        "edge_profiles": ep["n"],
        "edge_sharpness": edge_sharpness(x, y, spacing, labels, ref=ref),
        "hf_error_fraction": spec["hf_fraction"],
        "error_near_boundary_hu": near,
        "error_far_hu": far,
        "_spectrum": spec,
        "_per_organ": shift["per_organ"],
    }
