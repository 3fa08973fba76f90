"""Per-case scores of saved label maps against ground truth: the one scorer of every ablation arm.

SegResNet (the bundle's ``inference.yaml``) and nnU-Net predictions alike are files on the ground truth's grid;
:func:`score_case` reads both, checks the grid, and gives per scored class:

- ``dice_<c>`` / ``nsd_<c>`` (MONAI's ``compute_dice`` / ``compute_surface_dice``, NSD tolerance in mm with the
  voxel spacing of the label's affine), with the empty-label rule of :func:`fvae_ct.aug_seg.stats.apply_empty_rule`
  applied to both: ground truth and prediction empty -> 1, ground truth empty and prediction not -> 0;
- ``gt_empty_<c>`` / ``pred_empty_<c>`` (0 / 1), so that the rule's cases are counted;
- for lesion classes ``lesions_<c>`` / ``detected_<c>`` / ``fp_<c>`` (:func:`~fvae_ct.aug_seg.stats.lesion_detection`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice

from ..errors import InputError, OptionError
from ..io import read_labels, spacing_of
from .stats import apply_empty_rule, lesion_detection

__all__ = ["scoring_settings", "score_case", "summarise"]


_LESION_WORDS = ("lesion", "tumour", "tumor", "nodule", "metasta", "cancer")


def _numbers(option: str, value, kind=int) -> list:
    """``value`` (one number or a list of them) as a list of ``kind``; anything else: :class:`OptionError`."""
    items = [value] if isinstance(value, (int, float, str)) else list(value)
    try:
        return [kind(v) for v in items]
    except (TypeError, ValueError):
        raise OptionError(f"{option} {value!r}: give a number or a list of numbers") from None


def scoring_settings(class_names, scored_classes, tolerances_mm=None, lesion_classes=None) -> dict:
    """``{"scored_classes", "tolerances_mm", "lesion_classes"}`` for :func:`score_case`, checked before anything
    runs (:class:`OptionError` naming the option). ``tolerances_mm`` default 2 mm per class; ``lesion_classes``
    default: the scored classes whose name says lesion / tumour / nodule / metastasis / cancer."""
    names = list(class_names)
    scored = _numbers("scored_classes", scored_classes)
    bad = [c for c in scored if not 1 <= c < len(names)]
    if bad or not scored:
        raise OptionError(f"scored_classes {scored}: give classes among 1..{len(names) - 1} of class_names {names}")
    tol = [2.0] * len(scored) if tolerances_mm is None else _numbers("nsd_tolerance_mm", tolerances_mm, float)
    if len(tol) != len(scored) or any(not t > 0 for t in tol):
        raise OptionError(f"nsd_tolerance_mm {tol}: give one positive tolerance (mm) per scored class {scored}")
    if lesion_classes is None:
        lesion_classes = [c for c in scored if any(w in names[c].lower() for w in _LESION_WORDS)]
    lesions = _numbers("lesion_classes", lesion_classes)
    if any(not 1 <= c < len(names) for c in lesions):
        raise OptionError(f"lesion_classes {lesions}: give classes among 1..{len(names) - 1} of class_names {names}")
    return {"scored_classes": scored, "tolerances_mm": tol, "lesion_classes": lesions}


def score_case(
    pred_path, label_path, scored_classes, tolerances_mm, lesion_classes=(), atol_mm: float = 1e-3
) -> dict[str, float]:
    """Scores of one prediction file against its ground-truth file (same grid: shape and affine within ``atol_mm``).

    Returns ``{"dice_<c>", "nsd_<c>", "gt_empty_<c>", "pred_empty_<c>"}`` for each scored class ``c`` and
    ``{"lesions_<c>", "detected_<c>", "fp_<c>"}`` for each of ``lesion_classes``.
    """
    scored_classes = [int(c) for c in scored_classes]
    if len(tolerances_mm) != len(scored_classes):
        raise OptionError(
            f"nsd_tolerance_mm {list(tolerances_mm)}: give one tolerance per scored class {scored_classes}"
        )
    pred, pa = read_labels(pred_path)
    gt, ga = read_labels(label_path)
    if pred.shape != gt.shape or not np.allclose(pa, ga, atol=atol_mm):
        raise InputError(
            pred_path, f"prediction grid {pred.shape} does not match the ground truth {gt.shape} of {label_path}"
        )
    spacing = spacing_of(ga).tolist()
    yp, yg = (torch.from_numpy(np.stack([a == c for c in [0, *scored_classes]])[None]).float() for a in (pred, gt))
    dice = compute_dice(yp, yg, include_background=False, ignore_empty=True)[0].numpy()
    with warnings.catch_warnings():  # "the ground truth of class c is all 0": the empty-label rule below decides
        warnings.filterwarnings("ignore", "the (ground truth|prediction) of class", UserWarning)
        nsd = compute_surface_dice(yp, yg, list(map(float, tolerances_mm)), include_background=False, spacing=spacing)
    nsd = nsd[0].numpy()
    gt_empty = np.array([not (gt == c).any() for c in scored_classes])
    pred_empty = np.array([not (pred == c).any() for c in scored_classes])
    dice, _ = apply_empty_rule(dice, gt_empty, pred_empty)
    nsd, _ = apply_empty_rule(nsd, gt_empty, pred_empty)
    out: dict[str, float] = {}
    for i, c in enumerate(scored_classes):
        out.update({f"dice_{c}": float(dice[i]), f"nsd_{c}": float(nsd[i])})
        out.update({f"gt_empty_{c}": float(gt_empty[i]), f"pred_empty_{c}": float(pred_empty[i])})
    for c in lesion_classes:
        det = lesion_detection(pred, gt, int(c))
        out.update(
            {f"lesions_{c}": det["lesions"], f"detected_{c}": det["detected"], f"fp_{c}": det["false_positives"]}
        )
    return out


def summarise(rows: list[dict], scored_classes, lesion_classes=()) -> dict[str, float]:
    """Means over cases (NaN-aware; NaN stays only where no case is defined) of one model's per-case scores, and
    counts: empty ground truths, false positives on them, detection sensitivity (detected / lesions, pooled) and
    false-positive components per case."""
    out: dict[str, float] = {"cases": len(rows)}

    def col(k):
        return np.array([r[k] for r in rows], dtype=np.float64)

    for c in scored_classes:
        for m in ("dice", "nsd"):
            v = col(f"{m}_{c}")
            out[f"{m}_{c}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        ge, pe = col(f"gt_empty_{c}").astype(bool), col(f"pred_empty_{c}").astype(bool)
        out[f"empty_gt_{c}"] = int(ge.sum())
        out[f"empty_gt_fp_{c}"] = int((ge & ~pe).sum())
    for m in ("dice", "nsd"):  # the case's mean over scored classes, then over cases
        v = np.array([np.nanmean([r[f"{m}_{c}"] for c in scored_classes]) for r in rows])
        out[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    for c in lesion_classes:
        n = col(f"lesions_{c}").sum()
        out[f"sensitivity_{c}"] = float(col(f"detected_{c}").sum() / n) if n else float("nan")
        out[f"fp_per_case_{c}"] = float(col(f"fp_{c}").mean()) if rows else float("nan")
    return out
