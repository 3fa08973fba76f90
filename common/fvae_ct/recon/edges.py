"""Edge position and blur, separated: profiles along the original's surface normals fitted with error-function edges.

Volumes are HU ``[D, H, W]`` with the axial axis first, ``spacing`` in mm in the same order, ``labels`` an integer
map on the same grid (0 = background).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .masks import box, f64, organs, reference, surface

__all__ = ["fit_edges", "edge_profiles"]

_W1090 = 2.0 * 1.2815515655446004  # 10-90 % width of a gaussian-blurred step, in sigmas


def _edge_points(x, spacing, labels=None, ref: dict | None = None, max_points: int = 1500, seed: int = 0):
    """Surface points of the original (voxel coordinates ``[N, 3]``) and unit normals in mm ``[N, 3]``.

    With labels: points on each organ's surface, normals pointing out of the organ (gradient of the organ mask
    smoothed by 1 voxel), so a positive offset means the organ grew. Without labels: the edges of ``x``
    (:func:`edge_mask`), normals along the gradient of ``x`` (towards the brighter side)."""
    x = f64(x)
    sp = np.asarray(spacing, np.float64)
    rng = np.random.default_rng(seed)
    pts, nrm = [], []
    if labels is not None:
        lab = np.asarray(labels)
        ids = organs(lab)
        for organ in ids:
            roi = box(lab == organ, 4.0 * float(sp.max()), spacing)
            m = lab[roi] == organ
            surf = np.argwhere(surface(m))
            if not len(surf):
                continue
            sm = ndi.gaussian_filter(m.astype(np.float64), 1.0)
            g = np.stack(np.gradient(sm, *sp), -1)[tuple(surf.T)]
            keep = min(len(surf), max(1, max_points // max(len(ids), 1)))
            pick = rng.choice(len(surf), keep, replace=False)
            pts.append(surf[pick] + np.array([b.start for b in roi]))
            nrm.append(-g[pick])
    else:
        e = (ref or reference(x, spacing, None))["boundaries"]
        surf = np.argwhere(e)
        if len(surf):
            sm = ndi.gaussian_filter(x, np.maximum(1.0 / sp, 0.5))
            g = np.stack(np.gradient(sm, *sp), -1)[tuple(surf.T)]
            pick = rng.choice(len(surf), min(len(surf), max_points), replace=False)
            pts.append(surf[pick])
            nrm.append(g[pick])
    if not pts:
        return np.zeros((0, 3)), np.zeros((0, 3))
    p, n = np.concatenate(pts).astype(np.float64), np.concatenate(nrm)
    length = np.linalg.norm(n, axis=1)
    ok = length > 1e-9
    return p[ok], n[ok] / length[ok, None]


def _sample_profiles(v: np.ndarray, pts: np.ndarray, nrm: np.ndarray, spacing, s_mm: np.ndarray) -> np.ndarray:
    """``v`` sampled (linear interpolation) at ``pts + s * normal`` for every offset ``s`` (mm): ``[N, S]``."""
    sp = np.asarray(spacing, np.float64)
    coords = pts[:, None, :] + s_mm[None, :, None] * (nrm / sp)[:, None, :]
    out = ndi.map_coordinates(v, coords.reshape(-1, 3).T, order=1, mode="nearest")
    return out.reshape(len(pts), len(s_mm))


def fit_edges(profiles: np.ndarray, s_mm: np.ndarray, iters: int = 40) -> dict:
    """Least-squares fit of ``a + b * Phi((s - mu) / sigma)`` (an error-function edge) to every profile ``[N, S]``.

    Batched Levenberg-Marquardt; returns ``{"a", "b", "mu" (mm), "sigma" (mm), "width" (10-90 %, mm), "r2"}``."""
    from scipy.special import ndtr

    y = np.asarray(profiles, np.float64)
    n, m = y.shape
    q = max(2, m // 4)
    a, b = y[:, :q].mean(1), y[:, -q:].mean(1) - y[:, :q].mean(1)
    mid = a + 0.5 * b
    mu = s_mm[np.argmin(np.abs(y - mid[:, None]), 1)]
    theta = np.stack([a, b, mu, np.zeros(n)], 1)  # a, b, mu, log sigma

    def resid(th):
        z = (s_mm[None] - th[:, 2:3]) / np.exp(th[:, 3:4])
        return th[:, :1] + th[:, 1:2] * ndtr(z) - y, z

    r, z = resid(theta)
    cost = (r**2).sum(1)
    lam = np.full(n, 1e-2)
    for _ in range(iters):
        sig = np.exp(theta[:, 3:4])
        phi = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
        jac = np.stack([np.ones_like(z), ndtr(z), -theta[:, 1:2] * phi / sig, -theta[:, 1:2] * phi * z], -1)
        jtj = np.einsum("nsi,nsj->nij", jac, jac)
        jtr = np.einsum("nsi,ns->ni", jac, r)
        diag = np.diagonal(jtj, axis1=1, axis2=2)
        ridge = 1e-9 * (diag.sum(1) + 1.0)  # keeps flat profiles (b = 0: no mu / sigma gradient) solvable
        damp = jtj + np.eye(4)[None] * (lam[:, None] * diag + ridge[:, None])[:, :, None]
        step = np.linalg.solve(damp, -jtr[..., None])[..., 0]
        step[:, 3] = np.clip(step[:, 3], -1.0, 1.0)
        cand = theta + step
        rc, zc = resid(cand)
        cc = (rc**2).sum(1)
        better = cc < cost
        theta[better], r[better], z[better], cost[better] = cand[better], rc[better], zc[better], cc[better]
        lam = np.where(better, lam * 0.3, lam * 10.0)
    ss = ((y - y.mean(1, keepdims=True)) ** 2).sum(1)
    sigma = np.exp(theta[:, 3])
    return {
        "a": theta[:, 0],
        "b": theta[:, 1],
        "mu": theta[:, 2],
        "sigma": sigma,
        "width": _W1090 * sigma,
        "r2": 1.0 - cost / np.maximum(ss, 1e-12),
    }


def edge_profiles(
    x,
    y,
    spacing,
    labels=None,
    ref: dict | None = None,
    half_mm: float = 6.0,
    min_contrast: float = 40.0,
    max_points: int = 1500,
    seed: int = 0,
) -> dict:
    """Where and how sharp are the boundaries of ``y`` against those of ``x``? Shift-invariant and noise-robust.

    Profiles of ``x`` and ``y`` are sampled along the normals of the original's surface points (±``half_mm``,
    every quarter of the smallest voxel size) and each is fitted with an error-function edge (:func:`fit_edges`):
    its centre is the edge position, its sigma the blur. Profiles are kept where the original's fit is a clear
    edge (step >= ``min_contrast`` HU, R^2 >= 0.8, centre within half of ``half_mm``, 10-90 % width below
    ``half_mm``) and ``y``'s fit has the same polarity. Returns the medians over them:
    ``added_blur_mm`` (the Gaussian blur y adds, in quadrature: sign(s_y^2 - s_x^2) sqrt|s_y^2 - s_x^2| of the fitted
    sigmas; unbiased where the ratio is not), ``width_ratio`` (10-90 % width of y / of x; 1 = as sharp, > 1 =
    blurred; biased toward 1, because the sampling adds its own width to both), ``offset_mm`` (signed centre of y
    minus x along the normal: with labels > 0 = organs grow; without, towards the brighter side), ``abs_offset_mm``,
    ``width_mm`` (the original's 10-90 % width) and ``n`` (profiles used)."""
    x, y = f64(x), f64(y)
    nan = {
        "added_blur_mm": float("nan"),
        "width_ratio": float("nan"),
        "offset_mm": float("nan"),
        "abs_offset_mm": float("nan"),
        "width_mm": float("nan"),
        "n": 0,
    }
    pts, nrm = _edge_points(x, spacing, labels, ref, max_points, seed)
    if not len(pts):
        return nan
    step = float(min(spacing)) / 4.0
    s_mm = np.arange(-half_mm, half_mm + 1e-9, step)
    fx = fit_edges(_sample_profiles(x, pts, nrm, spacing, s_mm), s_mm)
    good = (
        (np.abs(fx["b"]) >= min_contrast)
        & (fx["r2"] >= 0.8)
        & (np.abs(fx["mu"]) <= half_mm / 2)
        & (fx["width"] < half_mm)
    )
    if not good.any():
        return nan
    fy = fit_edges(_sample_profiles(y, pts[good], nrm[good], spacing, s_mm), s_mm)
    ok = np.sign(fy["b"]) == np.sign(fx["b"][good])
    if not ok.any():
        return nan
    wr = fy["width"][ok] / fx["width"][good][ok]
    off = fy["mu"][ok] - fx["mu"][good][ok]
    # blur added in quadrature: the sampling's own blur is in both sigmas and cancels in the difference of squares
    d2 = fy["sigma"][ok] ** 2 - fx["sigma"][good][ok] ** 2
    return {
        "added_blur_mm": float(np.median(np.sign(d2) * np.sqrt(np.abs(d2)))),
        "width_ratio": float(np.median(wr)),
        "offset_mm": float(np.median(off)),
        "abs_offset_mm": float(np.median(np.abs(off))),
        "width_mm": float(np.median(fx["width"][good])),
        "n": int(ok.sum()),
    }
