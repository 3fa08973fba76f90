"""The analysis tables: the columns of analysis.csv / denoising.csv, their cells, and the console tables."""

from __future__ import annotations

__all__ = ["COLUMNS", "NOISE_COLUMNS", "SHORT", "cell", "table", "noise_table"]

COLUMNS = (
    "case",
    "method",
    "psnr",
    "ssim2d",
    "ssim3d",
    "noise_ratio",
    "boundary_shift_mean_mm",
    "boundary_shift_p95_mm",
    "floor_white_shift_mean_mm",
    "floor_white_shift_p95_mm",
    "floor_spectrum_shift_mean_mm",
    "floor_spectrum_shift_p95_mm",
    "edge_width_ratio",
    "edge_added_blur_mm",
    "edge_offset_mm",
    "edge_abs_offset_mm",
    "floor_white_abs_offset_mm",
    "floor_spectrum_abs_offset_mm",
    "floor_white_width_ratio",
    "floor_spectrum_width_ratio",
    "edge_profiles",
    "edge_sharpness",
    "hf_error_fraction",
    "error_near_boundary_hu",
    "error_far_hu",
    "param",
    "seconds",
)
NOISE_COLUMNS = (
    "case",
    "method",
    "noise",
    "noise_hu",
    "noise_removed",
    "error_hu",
    "boundary_shift_mean_mm",
    "boundary_shift_p95_mm",
    "edge_width_ratio",
    "edge_offset_mm",
    "param",
)
SHORT = {
    "psnr": "PSNR",
    "ssim2d": "SSIM2d",
    "noise_ratio": "noise",
    "boundary_shift_mean_mm": "shift mm",
    "floor_white_shift_mean_mm": "floor wht",
    "floor_spectrum_shift_mean_mm": "floor spc",
    "boundary_shift_p95_mm": "shift p95",
    "edge_width_ratio": "width",
    "edge_added_blur_mm": "blur+ mm",
    "edge_offset_mm": "offset mm",
    "edge_abs_offset_mm": "|offset|",
    "floor_spectrum_abs_offset_mm": "fl |off|",
    "hf_error_fraction": "HF err",
    "error_near_boundary_hu": "err near",
    "error_far_hu": "err far",
}


def cell(v) -> str:
    """An analysis.csv cell: floats with 6 significant digits (``nan`` kept)."""
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def table(rows: list[dict], markdown: bool = False) -> str:
    """analysis.csv's main columns per method: the console table, or a Markdown one."""
    keys = list(SHORT)
    if markdown:
        out = ["| case | method | " + " | ".join(SHORT[k] for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in rows:
            out.append(
                f"| {r['case']} | {r['method']}{' (' + r['param'] + ')' if r['param'] else ''} | "
                + " | ".join(f"{r[k]:.3g}" for k in keys)
                + " |"
            )
        return "\n".join(out)
    head = f"{'method':<18}" + "".join(f"{SHORT[k]:>10}" for k in keys)
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['method'][:18]:<18}" + "".join(f"{r[k]:>10.4g}" for k in keys))
    return "\n".join(out)


def noise_table(rows: list[dict]) -> str:
    """The inserted-noise test: per noise and method, the fraction removed and the boundary movement."""
    keys = ("noise_removed", "error_hu", "boundary_shift_mean_mm", "edge_width_ratio", "edge_offset_mm")
    short = ("removed", "error HU", "shift mm", "width", "offset mm")
    head = f"{'noise':<9}{'method':<20}" + "".join(f"{h:>10}" for h in short)
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['noise']:<9}{r['method'][:20]:<20}" + "".join(f"{r[k]:>10.3g}" for k in keys))
    return "\n".join(out)
