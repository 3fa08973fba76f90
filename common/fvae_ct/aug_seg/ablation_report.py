"""The segmentation ablation's table: per-arm means over seeds, paired differences to the first arm, markdown.

:func:`summary_rows` takes the per-case scores of every run (``results[arm][seed][case]``, rows of
:func:`fvae_ct.aug_seg.scoring.score_case`) and gives one row per arm; :func:`markdown` renders them with the
protocol in one paragraph (``ablation.md``). Nothing here prints: the ``fvae ablate-seg`` command does.
"""

from __future__ import annotations

import numpy as np

from .scoring import summarise
from .stats import hierarchical_bootstrap

__all__ = ["summary_rows", "markdown"]


def _case_mean(results, arm, seed, case, metric, scored) -> float:
    """One test case's score of one run, mean over the scored classes."""
    return float(np.nanmean([results[arm][seed][case][f"{metric}_{k}"] for k in scored]))


def summary_rows(results: dict, budgets: dict, cases: list[str], seeds: list[int], scoring: dict, n_boot: int,
                 boot_seed: int) -> list[dict]:  # fmt: skip
    """One row per arm (in ``results``' order; the first is the reference): ``steps`` / ``crops_per_step`` (from
    ``budgets[arm]``), the mean over seeds of :func:`~fvae_ct.aug_seg.scoring.summarise` (``dice``, ``nsd``, per
    class, detection, empty-label counts), ``dice_seed_sd`` / ``nsd_seed_sd`` (SD over seeds) and ``<m>_diff`` /
    ``<m>_ci_low`` / ``<m>_ci_high``: the paired difference to the first arm with a bootstrap 95 % CI over seeds and
    cases (:func:`~fvae_ct.aug_seg.stats.hierarchical_bootstrap`; 0 for the first arm itself)."""
    scored, lesions = scoring["scored_classes"], scoring["lesion_classes"]
    arms = list(results)
    base = arms[0]
    table = []
    for arm in arms:
        by_seed = [summarise([results[arm][s][c] for c in cases], scored, lesions) for s in seeds]
        row = {"arm": arm, "seeds": len(seeds), "test_cases": len(cases), "steps": budgets[arm][0],
               "crops_per_step": budgets[arm][1]}  # fmt: skip
        for k in by_seed[0]:
            if k == "cases":
                continue
            v = np.array([b[k] for b in by_seed], dtype=np.float64)
            row[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            if k in ("dice", "nsd"):
                row[f"{k}_seed_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        for m in ("dice", "nsd"):
            d = np.array([[_case_mean(results, arm, s, c, m, scored) - _case_mean(results, base, s, c, m, scored)
                           for c in cases] for s in seeds])  # fmt: skip
            mean, lo, hi = hierarchical_bootstrap(d, n_boot, boot_seed) if arm != base else (0.0, 0.0, 0.0)
            row.update({f"{m}_diff": mean, f"{m}_ci_low": lo, f"{m}_ci_high": hi})
        table.append(row)
    return table


def markdown(table: list[dict], split: dict, scoring: dict, seeds: list[int]) -> str:
    """``ablation.md``: the protocol (split sizes, empty-label rule, what is averaged) and one row per arm."""
    scored, lesion_classes = scoring["scored_classes"], scoring["lesion_classes"]
    base = table[0]["arm"]
    lines = [
        f"Checkpoint: best validation Dice on {len(split['val'])} validation cases; scored on {len(split['test'])} "
        f"held-out test cases (never trained on or used for selection); {len(split['train'])} training cases; seeds "
        f"{', '.join(map(str, seeds))}. Empty ground truth: Dice = NSD = 1 if the prediction is empty too, else 0. "
        f"Scores: mean over seeds of the mean over test cases and classes {scored}; +- SD over seeds; difference to "
        f"{base} paired by seed and case, 95 % CI by bootstrap over seeds and cases.",
        "",
    ]
    det = [f"det. sens. {c} | FP/case {c}" for c in lesion_classes]
    lines.append("| arm | steps x crops | Dice | NSD | Dice - " + base + " [95% CI] | NSD - " + base + " [95% CI] | "
                 + "".join(f"{d} | " for d in det) + "empty GT (FP) |")  # fmt: skip
    lines.append("|---" * (7 + 2 * len(lesion_classes)) + "|")
    for r in table:
        cells = [
            r["arm"],
            f"{r['steps']} x {r['crops_per_step']}",
            f"{r['dice']:.4f} +- {r['dice_seed_sd']:.4f}",
            f"{r['nsd']:.4f} +- {r['nsd_seed_sd']:.4f}",
            f"{r['dice_diff']:+.4f} [{r['dice_ci_low']:+.4f}, {r['dice_ci_high']:+.4f}]",
            f"{r['nsd_diff']:+.4f} [{r['nsd_ci_low']:+.4f}, {r['nsd_ci_high']:+.4f}]",
        ]
        for c in lesion_classes:
            cells += [f"{r[f'sensitivity_{c}']:.3f}", f"{r[f'fp_per_case_{c}']:.2f}"]
        cells.append(", ".join(f"{c}: {r[f'empty_gt_{c}']:.0f} ({r[f'empty_gt_fp_{c}']:.1f})" for c in scored))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
