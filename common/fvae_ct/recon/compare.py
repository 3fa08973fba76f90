"""``fvae compare-vaes``: the recon bundle once per VAE, one table.

For each VAE the fvae_recon bundle reconstructs every case into ``<output_dir>/<vae>/``; the table has the
mean PSNR, SSIM, MSE and seconds from its summary.json, the peak resident memory of the run (sampled), and
the boundary/noise figures of :mod:`fvae_ct.recon.boundary` computed from the written reconstructions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

from ..errors import user_error
from ..io import discover_cases, load_ct, load_labels, write_text_atomic
from ..transforms import to_slices
from .boundary import analyze
from .workflow import RECON_SUFFIX, BatchFailure

__all__ = ["PeakRSS", "compare_vaes"]

logger = logging.getLogger(__name__)


class PeakRSS:
    """Context manager sampling this process's resident memory every ``interval`` s; ``peak_mib`` afterwards."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._run = interval, 0, False
        self.proc = psutil.Process()

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.before = self.proc.memory_info().rss
        self._run = True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._run = False
        self._t.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def compare_vaes(
    input_path: str,
    vaes,
    output_dir: str,
    weights: dict | None = None,
    labels: str | None = None,
    hu_window=(-1000.0, 1000.0),
    **overrides,
) -> list[dict]:
    """Reconstruct ``input_path`` with every VAE of ``vaes`` and write ``compare.csv`` / ``compare.md``."""
    from ..bundle import run_bundle

    vaes = [v.strip() for v in (vaes.split(",") if isinstance(vaes, str) else vaes)]
    weights = weights or {}
    out = Path(output_dir)
    rows, failed = [], []
    for vae in vaes:
        sub = out / vae
        t0 = time.perf_counter()
        try:
            with PeakRSS() as mem:
                run_bundle(
                    "fvae_recon",
                    "inference.yaml",
                    input=str(input_path),
                    output_dir=str(sub),
                    vae=vae,
                    vae_weights=weights.get(vae),
                    hu_window=list(hu_window),
                    figures=False,
                    **overrides,
                )
        except Exception as e:  # noqa: BLE001 - a VAE that cannot run is reported; the others go on
            cause = user_error(e)
            if cause is None:
                raise
            logger.error("compare-vaes: %s failed: %s", vae, cause)
            failed.append(f"{vae}: {cause}")
            continue
        summary = json.loads((sub / "summary.json").read_text())
        row = {
            "vae": vae,
            **{k: summary["metrics"][k]["mean"] for k in ("psnr", "ssim3d", "ssim2d", "mse_hu")},
            "seconds": time.perf_counter() - t0,
            "peak_rss_mib": mem.peak_mib,
        }
        figs = []
        for case in discover_cases(input_path):
            img = nib.load(str(sub / f"{case.name}{RECON_SUFFIX}"))
            src = load_ct(case.path)
            aff = img.affine
            x, sp = to_slices(np.clip(src[0].numpy().astype(np.float64), *hu_window), aff)
            y, _ = to_slices(np.asarray(img.dataobj).astype(np.float64), aff)
            lab = None
            if labels is not None:
                lab = to_slices(load_labels(labels, aff, img.shape), aff)[0]
            a = analyze(x, y, sp, lab)
            figs.append(
                [a[k] for k in ("noise_ratio", "boundary_shift_mean_mm", "edge_sharpness", "hf_error_fraction")]
            )
        for k, v in zip(
            ("noise_ratio", "boundary_shift_mean_mm", "edge_sharpness", "hf_error_fraction"),
            np.nanmean(np.array(figs, dtype=np.float64), 0),
        ):
            row[k] = float(v)
        rows.append(row)
    if rows:
        _write_tables(rows, out)
    if failed:
        raise BatchFailure(
            f"{len(failed)} of {len(vaes)} VAEs failed (the table has the others):\n  " + "\n  ".join(failed)
        )
    return rows


def _write_tables(rows: list[dict], out: Path) -> None:
    cols = list(rows[0])
    write_text_atomic(
        out / "compare.csv",
        "\n".join(
            [",".join(cols)]
            + [",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols) for r in rows]
        )
        + "\n",
    )
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += [
        "| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows
    ]
    write_text_atomic(out / "compare.md", "\n".join(md) + "\n")
    print("\n".join(md))
