"""Figures people look at instead of tables: three-view comparisons of original, reconstruction and error.

Volumes are reoriented to RAS for display only and shown in radiological convention (patient right on
the image left, anterior / superior up) with the true aspect ratio from the voxel spacing.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry to close

from .io import atomic_write

__all__ = ["three_view", "to_ras"]


def to_ras(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vol [X, Y, Z]`` reoriented to RAS axes and its spacing (mm) in that order."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(vol, ornt)
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)[ornt[:, 0].astype(int)]
    return out, spacing


def _views(v: np.ndarray, sp: np.ndarray):
    """(axial, coronal, sagittal) 2D display arrays through the centre of RAS ``v`` and their aspect ratios."""
    i, j, k = (s // 2 for s in v.shape)
    return [
        (v[::-1, ::-1, k].T, sp[1] / sp[0]),  # rows: anterior->posterior, cols: right->left
        (v[::-1, j, ::-1].T, sp[2] / sp[0]),  # rows: superior->inferior, cols: right->left
        (v[i, ::-1, ::-1].T, sp[2] / sp[1]),  # rows: superior->inferior, cols: anterior->posterior
    ]


def three_view(
    hu_in: np.ndarray,
    hu_out: np.ndarray | None,
    affine: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    window=(-1000.0, 1000.0),
    metrics: dict | None = None,
    labels: np.ndarray | None = None,
) -> Path:
    """Write a PNG, columns axial / coronal / sagittal: rows original / reconstruction / |error| (HU, with colour
    bars); with ``hu_out=None`` one row of ``hu_in`` (a generated volume), ``labels`` drawn as contours. The error
    colour scale ends at the 99.5th percentile of the error on the three planes shown."""
    # only the three central planes are ever copied or converted (memory stays flat in the volume size)
    a, sp = to_ras(np.asarray(hu_in), affine)
    va = [(img.astype(np.float32), asp) for img, asp in _views(a, sp)]
    rows = [("original" if hu_out is not None else "volume", va, "gray", window)]
    if hu_out is not None:
        vb = [(img.astype(np.float32), asp) for img, asp in _views(to_ras(np.asarray(hu_out), affine)[0], sp)]
        ve = [(np.abs(np.clip(y, *window) - np.clip(x, *window)), asp) for (x, asp), (y, _) in zip(va, vb)]
        emax = max(float(np.percentile(np.concatenate([e.ravel() for e, _ in ve]), 99.5)), 1.0)
        rows += [("reconstruction", vb, "gray", window), ("|error| (HU)", ve, "magma", (0, emax))]
    lab = [img for img, _ in _views(to_ras(np.asarray(labels), affine)[0], sp)] if labels is not None else None
    fig = Figure(figsize=(11, 3.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, views, cmap, (vmin, vmax)) in enumerate(rows):
        for c, ((img, aspect), view) in enumerate(zip(views, ("axial", "coronal", "sagittal"))):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            if lab is not None and r == 0:
                li = lab[c]
                for v in np.unique(li)[1:]:
                    ax.contour(li == v, levels=[0.5], linewidths=0.7, colors=[colormaps["tab10"](int(v) % 10)])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view)
            if c == 0:
                ax.set_ylabel(name)
        fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.85, label="HU" if r < 2 else "|error| HU")
    if metrics:
        title = (title + "  " if title else "") + "  ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))
        )
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return path
