"""Figures people look at instead of tables: three-view comparisons of original, reconstruction and error.

Volumes are reoriented to RAS for display only and shown in radiological convention (patient right on
the image left, anterior / superior up) with the true aspect ratio from the voxel spacing.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from .io import _atomic  # noqa: E402

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
    bars); with ``hu_out=None`` one row of ``hu_in`` (a generated volume), ``labels`` drawn as contours."""
    a, sp = to_ras(np.asarray(hu_in, dtype=np.float32), affine)
    rows = [("original" if hu_out is not None else "volume", a, "gray", window)]
    if hu_out is not None:
        b, _ = to_ras(np.asarray(hu_out, dtype=np.float32), affine)
        err = np.abs(np.clip(b, *window) - np.clip(a, *window))
        emax = max(float(np.percentile(err, 99.5)), 1.0)
        rows += [("reconstruction", b, "gray", window), ("|error| (HU)", err, "magma", (0, emax))]
    lab = to_ras(np.asarray(labels), affine)[0] if labels is not None else None
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 3.6 * len(rows)), constrained_layout=True, squeeze=False)
    for r, (name, vol, cmap, (vmin, vmax)) in enumerate(rows):
        for c, ((img, aspect), view) in enumerate(zip(_views(vol, sp), ("axial", "coronal", "sagittal"))):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            if lab is not None and r == 0:
                li = _views(lab.astype(np.float32), sp)[c][0]
                for v in np.unique(li)[1:]:
                    ax.contour(li == v, levels=[0.5], linewidths=0.7, colors=[plt.cm.tab10(int(v) % 10)])
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
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path
