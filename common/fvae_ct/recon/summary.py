"""The recon run's tables: metrics.csv columns, summary.json (statistics per metric, each case, the failures) and the
console table."""

from __future__ import annotations

import math

import numpy as np

from ..batch import csv_cell
from ..metrics import PROTOCOL

__all__ = ["METRIC_KEYS", "CASE_KEYS", "CSV_COLUMNS", "as_float", "json_value", "summarize", "metrics_table"]

METRIC_KEYS = ("psnr", "ssim3d", "ssim2d", "mse", "mse_hu", "mae_hu", "seconds")
CASE_KEYS = ("shape", "spacing_mm", "modality", "warnings", "input", "output", "output_dicom")
CSV_COLUMNS = ("case", "status", *METRIC_KEYS, *CASE_KEYS)


def as_float(v) -> float:
    """``float(v)``, NaN when ``v`` is not a number (an empty CSV cell)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def json_value(v):
    """JSON-safe: inf -> ``"inf"``, NaN -> ``None`` (not measured); the rest as is."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _statistics(rows: list[dict]) -> dict:
    """Mean / std / n per metric over the finite values; ``n_inf`` (identical reconstructions: counted, not
    averaged) and ``n_na`` (not measurable) where they occur."""
    stats = {}
    for k in METRIC_KEYS:
        vals = [r.get(k) for r in rows]
        v = np.array([x for x in vals if isinstance(x, float) and math.isfinite(x)])
        stats[k] = {"mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None}
        stats[k]["n"] = int(v.size)
        n_inf = sum(isinstance(x, float) and math.isinf(x) for x in vals)
        n_na = sum(x == "n/a" for x in vals)
        if k == "psnr" or n_inf:
            stats[k]["n_inf"] = int(n_inf)
        if n_na:
            stats[k]["n_na"] = int(n_na)
    return stats


def summarize(rows: list[dict], failures: list[dict], n_cases: int, run: dict, interrupted=False, ranks=None) -> dict:
    """summary.json's content: ``run`` (the VAE, its properties and the settings), the statistics per metric over the
    finished ``rows``, each case, the ``failures``; ``ranks``: each rank's share of a torchrun run."""
    modalities: dict[str, int] = {}
    for r in rows:
        modalities[r["modality"] or "unknown"] = modalities.get(r["modality"] or "unknown", 0) + 1
    return {
        **run,
        "protocol": PROTOCOL,
        "n_cases": n_cases,
        "n_ok": len(rows),
        "n_failed": len(failures),
        "interrupted": interrupted,
        "world_size": len(ranks) if ranks else 1,
        **({"ranks": ranks} if ranks else {}),
        "metrics": _statistics(rows),
        "modalities": modalities,
        "n_with_warnings": sum(bool(r["warnings"]) for r in rows),
        "cases": [{k: json_value(r.get(k)) for k in ("case", "status", *METRIC_KEYS, *CASE_KEYS)} for r in rows],
        "failures": failures,
    }


def _cell(v, width: int, fmt: str) -> str:
    return f"{v:{width}{fmt}}" if isinstance(v, float) and math.isfinite(v) else f"{csv_cell(v) or '-':>{width}}"


def metrics_table(rows: list[dict], failures: list[dict]) -> str:
    """The console table: one line per case (PSNR, SSIM, MSE HU^2, seconds), the mean, warnings and failures."""
    head = f"{'case':<32} {'PSNR dB':>8} {'SSIM3d':>7} {'SSIM2d':>7} {'MSE HU2':>9} {'sec':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case'][:32]:<32} {_cell(r['psnr'], 8, '.2f')} {_cell(r['ssim3d'], 7, '.4f')} "
            f"{_cell(r['ssim2d'], 7, '.4f')} {_cell(r['mse_hu'], 9, '.1f')} {_cell(r['seconds'], 7, '.1f')}"
        )
    if len(rows) > 1:
        mean = {}
        for k in ("psnr", "ssim3d", "ssim2d", "mse_hu"):
            v = [r[k] for r in rows if isinstance(r[k], float) and math.isfinite(r[k])]
            mean[k] = float(np.mean(v)) if v else math.nan
        lines.append(
            f"{'mean (finite)':<32} {_cell(mean['psnr'], 8, '.2f')} {_cell(mean['ssim3d'], 7, '.4f')} "
            f"{_cell(mean['ssim2d'], 7, '.4f')} {_cell(mean['mse_hu'], 9, '.1f')}"
        )
    for r in rows:
        for w in r.get("warnings") or ():
            lines.append(f"WARNING {r['case']}: {w}")
    for f in failures:
        lines.append(f"FAILED {f['case']}: {f['error']}")
    return "\n".join(lines)
