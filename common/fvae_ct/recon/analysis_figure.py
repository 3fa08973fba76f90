"""The analysis figure of one case: error maps, spectra and the table on one PNG."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry to close

from ..io import atomic_write
from .tables import SHORT

__all__ = ["analysis_figure"]


def analysis_figure(
    path, name: str, x: np.ndarray, outputs: dict, spectra: dict, rows: list[dict], labelled: bool, cutoff: float
) -> None:
    """Error maps (centre axial slice, |method - original| HU), spectra on one plot, and the table."""
    k = x.shape[0] // 2
    n = len(outputs)
    rows_, cols_ = np.nonzero(x[k] > -500)  # crop the maps to the body
    crop = (slice(rows_.min(), rows_.max() + 1), slice(cols_.min(), cols_.max() + 1)) if rows_.size else ...
    errs = {m: np.abs(y[k] - x[k])[crop] for m, y in outputs.items()}
    vmax = max(float(np.percentile(np.concatenate([e.ravel() for e in errs.values()]), 99.5)), 1.0)
    cols = min(n, 4)
    nrows = -(-n // cols)
    h, wd = errs[next(iter(errs))].shape
    map_h = 3.7 * h / wd  # each map about 3.7 inches wide
    fig = Figure(figsize=(16, nrows * (map_h + 0.4) + 5.2), layout="constrained")
    top, mid, foot = fig.subfigures(3, 1, height_ratios=[nrows * (map_h + 0.4), 4.4, 0.8])
    axes = np.atleast_1d(top.subplots(nrows, cols)).ravel()
    im = None
    for ax, (m, e) in zip(axes, errs.items()):
        im = ax.imshow(e, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"|{m} - original|", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    top.colorbar(im, ax=axes.tolist(), shrink=0.8, label="|error| HU, centre axial slice")
    gs = mid.add_gridspec(1, 2, width_ratios=[1.0, 1.25])
    ax = mid.add_subplot(gs[0, 0])
    first = next(iter(spectra.values()))
    ax.semilogy(first["freq"], first["image_power"], "k-", lw=2, label="original image")
    for m, s in spectra.items():
        ax.semilogy(s["freq"], s["error_power"], lw=1.4, label=f"error: {m} (HF {s['hf_fraction']:.2f})")
    ax.axvline(cutoff, color="grey", ls=":", lw=1)
    ax.set_xlabel("radial frequency (cycles/voxel), per axial slice")
    ax.set_ylabel("power")
    ax.legend(fontsize=7)
    ax.set_title("power spectra: image vs. reconstruction error")
    ax = mid.add_subplot(gs[0, 1])
    ax.axis("off")
    keys = list(SHORT)
    cell = [[f"{r[kk]:.3g}" for kk in keys] for r in rows]
    tab_rows = [r["method"] + (f"\n{r['param']}" if r["param"] else "") for r in rows]
    tab = ax.table(cellText=cell, rowLabels=tab_rows, colLabels=[SHORT[kk] for kk in keys], loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    tab.scale(1.0, 1.4)
    ax = foot.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(
        0.0,
        0.9,
        "noise: HU std in homogeneous regions vs original (lower = more denoising); shift: "
        "surface distance of re-thresholded boundaries (mm); floor wht / spc: the same for the original plus "
        "white noise of the method's RMSE / noise with its error spectrum (what noise alone causes); width: "
        "10-90 %% edge width vs original (erf fits along surface normals; > 1 = blurred); offset: median signed "
        "edge displacement (mm; labelled: > 0 = organs grow); |offset| and fl |off|: median absolute "
        "displacement, and its spectrum noise floor; HF err: error energy above %.2f cycles/voxel (white "
        "noise: %.2f); err near / far: mean |error| HU within 1 mm of boundaries / elsewhere in the body."
        "\nBoundaries: %s."
        % (
            cutoff,
            1 - np.pi * cutoff**2,
            "labelled organs" if labelled else "3D gradient edges of the original (no labels given)",
        ),
        fontsize=8,
        va="top",
        wrap=True,
    )
    fig.suptitle(f"{name}: is {next(iter(outputs), 'the VAE')} a boundary-preserving denoiser?")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
