"""``fvae compare-vaes``: the recon bundle once per VAE, one table.

For each VAE the fvae_recon bundle reconstructs every case into ``<output_dir>/<vae>/``, in a process of its own
(``python -m fvae_ct.recon.compare``), so ``peak_rss_mib`` is that VAE's run alone: the child's maximum resident
memory as the kernel counts it (``wait4``), Python, torch and the data included. The table has the mean PSNR, SSIM, MSE from its
summary.json, the wall seconds of the run, and the boundary / noise measures of :mod:`fvae_ct.recon.boundary`
computed from the written reconstructions: noise ratio, mean boundary shift, edge-width ratio, added blur and signed
edge offset (mm), high-frequency error fraction.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import discover_cases, load_ct, load_labels, write_text_atomic
from ..transforms import to_slices
from .boundary import analyze
from .workflow import RECON_SUFFIX, BatchFailure

__all__ = ["MEASURES", "compare_vaes", "run_measured"]

logger = logging.getLogger(__name__)

#: the boundary / noise measures of the table (:func:`fvae_ct.recon.boundary.analyze` keys)
MEASURES = (
    "noise_ratio",
    "boundary_shift_mean_mm",
    "edge_width_ratio",
    "edge_added_blur_mm",
    "edge_offset_mm",
    "hf_error_fraction",
)


def run_measured(cmd: list[str]) -> tuple[int, str, float, float]:
    """Run ``cmd`` as a child process: (exit code, its stderr, wall seconds, its peak resident memory in MiB)."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(cmd, stdout=null, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, time.perf_counter() - t0, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def compare_vaes(
    input_path: str,
    vaes,
    output_dir: str,
    weights: dict | None = None,
    labels: str | None = None,
    hu_window=(-1000.0, 1000.0),
    **overrides,
) -> list[dict]:
    """Reconstruct ``input_path`` with every VAE of ``vaes`` (one ``fvae recon`` process each; ``overrides``: its
    options) and write ``compare.csv`` / ``compare.md``; a VAE that fails is reported at the end, after the others."""
    vaes = [v.strip() for v in (vaes.split(",") if isinstance(vaes, str) else vaes)]
    weights = weights or {}
    out = Path(output_dir)
    rows, failed = [], []
    for vae in vaes:
        sub = out / vae
        opts = {"input": str(input_path), "output_dir": str(sub), "vae": vae, "vae_weights": weights.get(vae)}
        opts.update(hu_window=list(hu_window), figures=False, **overrides)
        code, err, seconds, peak = run_measured([sys.executable, "-m", __name__, json.dumps(opts)])
        if code:  # the child's one-line error is its last stderr line
            cause = (err.strip().splitlines() or [f"exit code {code}"])[-1].removeprefix(_CHILD_ERROR)
            logger.error("compare-vaes: %s failed: %s", vae, cause)
            failed.append(f"{vae}: {cause}")
            continue
        summary = json.loads((sub / "summary.json").read_text())
        row = {
            "vae": vae,
            **{k: summary["metrics"][k]["mean"] for k in ("psnr", "ssim3d", "ssim2d", "mse_hu")},
            "seconds": seconds,
            "peak_rss_mib": peak,
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
            figs.append([a[k] for k in MEASURES])
        for k, v in zip(MEASURES, np.nanmean(np.array(figs, dtype=np.float64), 0)):
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


_CHILD_ERROR = "compare-vaes child: "


def _child(argv: list[str]) -> None:
    """``python -m fvae_ct.recon.compare '<json options>'``: one recon run of :func:`compare_vaes` in a process of
    its own; an fvae-ct error ends it with one line on stderr and exit code 1."""
    from ..bundle import run_bundle
    from ..errors import user_error

    try:
        run_bundle("fvae_recon", "inference.yaml", **json.loads(argv[0]))
    except Exception as e:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        cause = user_error(e)
        if cause is None:
            raise
        sys.exit(f"{_CHILD_ERROR}{cause}")


if __name__ == "__main__":
    _child(sys.argv[1:])
