"""Where the boundary / noise measures look, computed from the original alone: the body, its edges, label surfaces,
the homogeneous regions, and :func:`reference` (all of them at once, once per volume).

Volumes are HU ``[D, H, W]`` with the axial axis first, ``spacing`` in mm in the same order, ``labels`` an integer
map on the same grid (0 = background).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "body_mask",
    "edge_mask",
    "boundary_mask",
    "homogeneous_mask",
    "homogeneous_regions",
    "reference",
    "grad_mag",
    "surface",
    "box",
    "organs",
    "f64",
]


def f64(a) -> np.ndarray:
    """``a`` as a float64 array (every measure computes in float64)."""
    return np.asarray(a, dtype=np.float64)


def body_mask(x, threshold: float = -500.0) -> np.ndarray:
    """Voxels of the patient: above ``threshold`` HU, holes filled per slice, largest 3D component."""
    m = f64(x) > threshold
    lab, n = ndi.label(m)
    if n > 1:
        sizes = ndi.sum(m, lab, range(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    return np.stack([ndi.binary_fill_holes(s) for s in m])


def grad_mag(v: np.ndarray, spacing, sigma_mm: float = 1.0) -> np.ndarray:
    """3D gradient magnitude (HU/mm) after a gaussian of ``sigma_mm`` (at least 0.5 voxel per axis)."""
    sp = np.asarray(spacing, dtype=np.float64)
    sig = np.maximum(sigma_mm / sp, 0.5)
    sm = ndi.gaussian_filter(v, sig)
    g = np.gradient(sm, *sp)
    return np.sqrt(sum(gi**2 for gi in g))


def edge_mask(x, spacing, threshold: float = 30.0, body=None) -> np.ndarray:
    """Edges of ``x``: voxels inside the body whose gradient magnitude (after a 1 mm gaussian) exceeds
    ``threshold`` HU/mm and is a ridge (a local maximum along at least one axis): thin, 3D, spacing-aware.

    30 HU/mm keeps organ-fat and organ-organ boundaries (a 100 HU step gives about 40 HU/mm) and drops
    the gradients of CT noise."""
    x = f64(x)
    g = grad_mag(x, spacing)
    body = body_mask(x) if body is None else body
    ridge = np.zeros(x.shape, bool)
    for ax in range(3):
        ridge |= g >= ndi.maximum_filter1d(g, size=3, axis=ax)
    return (g > threshold) & body & ridge


def boundary_mask(labels, spacing, within_mm: float = 1.0) -> np.ndarray:
    """Voxels within ``within_mm`` of any label boundary (both sides), spacing-aware."""
    lab = np.asarray(labels)
    surf = np.zeros(lab.shape, bool)
    for ax in range(lab.ndim):
        a, b = [slice(None)] * lab.ndim, [slice(None)] * lab.ndim
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        diff = lab[tuple(a)] != lab[tuple(b)]
        surf[tuple(a)] |= diff
        surf[tuple(b)] |= diff
    if within_mm <= 0:
        return surf
    return ndi.distance_transform_edt(~surf, sampling=spacing) <= within_mm


def surface(m: np.ndarray) -> np.ndarray:
    """The voxels of mask ``m`` with a neighbour outside it (6-connected; the volume border counts as inside)."""
    return m & ~ndi.binary_erosion(m, border_value=1)


def box(mask: np.ndarray, margin_mm: float, spacing) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin_mm`` on every side (clipped to the volume)."""
    idx = np.nonzero(mask)
    out = []
    for a, n, sp in zip(idx, mask.shape, spacing):
        m = int(np.ceil(margin_mm / sp)) + 1
        out.append(slice(max(0, int(a.min()) - m), min(n, int(a.max()) + m + 1)))
    return tuple(out)


def organs(labels, min_voxels: int = 50) -> list[int]:
    """Label ids with at least ``min_voxels`` voxels (smaller ones are too small to have a measurable boundary)."""
    lab = np.asarray(labels)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return [int(i) for i, c in zip(ids, counts) if c >= min_voxels]


def homogeneous_mask(x, spacing, labels=None, erode_mm: float = 3.0, body=None) -> np.ndarray:
    """Voxels of homogeneous tissue: organs eroded by ``erode_mm`` (and by at least two in-plane voxels),
    or low-gradient soft tissue of the body."""
    x = f64(x)
    erode_mm = max(erode_mm, 2.0 * max(spacing[1:]))
    if labels is not None:
        lab = np.asarray(labels)
        out = np.zeros(lab.shape, bool)
        for organ in organs(lab):
            roi = box(lab == organ, 1.0, spacing)
            m = lab[roi] == organ
            out[roi] |= ndi.distance_transform_edt(m, sampling=spacing) > erode_mm
        return out
    g = grad_mag(x, spacing)
    soft = (x > -100) & (x < 200) & (body_mask(x) if body is None else body)
    if not soft.any():
        return soft
    return soft & (g <= np.percentile(g[soft], 25))


def homogeneous_regions(x, spacing, labels=None, body=None) -> tuple[np.ndarray, np.ndarray]:
    """(mask, region id per masked voxel) of the homogeneous regions :func:`noise_ratio` scores."""
    m = homogeneous_mask(x, spacing, labels, body=body)
    if labels is not None:
        return m, np.asarray(labels)[m]
    comp, _ = ndi.label(m)  # connected homogeneous regions (fat, muscle, liver ... separated by edges)
    sizes = np.bincount(comp.ravel())
    m &= sizes[comp] >= 20
    return m, comp[m]


def reference(x, spacing, labels=None) -> dict:
    """What every figure needs from the original alone, computed once per volume: ``body``, ``boundaries``
    (label surfaces, or the edges of ``x`` without labels) and the homogeneous ``regions`` (mask, ids)."""
    x = f64(x)
    body = body_mask(x)
    bounds = boundary_mask(labels, spacing, 0.0) if labels is not None else edge_mask(x, spacing, body=body)
    return {"body": body, "boundaries": bounds, "regions": homogeneous_regions(x, spacing, labels, body)}
