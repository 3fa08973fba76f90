"""Statistics of the segmentation ablation: one empty-label rule, lesion-wise detection, bootstrap CIs.

- :func:`apply_empty_rule`: MONAI gives Dice NaN for an empty ground truth (a false positive vanishes from the
  mean) but NSD 0. One rule for both, counted: ground truth empty and prediction empty -> 1 (correct); ground
  truth empty and prediction not -> 0 (false positive). Means are then taken with :func:`numpy.nanmean` only over
  what is still undefined (nothing, for a binary class map).
- :func:`lesion_detection`: by 3D connected components (26-connectivity) of one class: a ground-truth lesion is
  detected when a predicted voxel of the class touches it; a predicted component touching no ground-truth lesion
  is a false positive.
- :func:`hierarchical_bootstrap`: CI of the mean paired difference ``[seeds, cases]``, resampling seeds and cases.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi

__all__ = ["apply_empty_rule", "lesion_detection", "hierarchical_bootstrap"]


def apply_empty_rule(values, gt_empty, pred_empty) -> tuple[np.ndarray, dict[str, int]]:
    """``values`` (per case, Dice or NSD, NaN allowed) with the empty-label rule applied; and the counts
    ``{"empty_gt": n, "empty_gt_false_positive": n}``."""
    v = np.asarray(values, dtype=np.float64).copy()
    ge, pe = np.asarray(gt_empty, bool), np.asarray(pred_empty, bool)
    v[ge & pe] = 1.0
    v[ge & ~pe] = 0.0
    return v, {"empty_gt": int(ge.sum()), "empty_gt_false_positive": int((ge & ~pe).sum())}


def lesion_detection(pred: np.ndarray, gt: np.ndarray, label: int) -> dict[str, int]:
    """``{"lesions", "detected", "false_positives"}`` for class ``label`` of two label maps on one grid."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    structure = np.ones((3,) * gt.ndim, bool)
    p, g = pred == label, gt == label
    gl, n_g = ndi.label(g, structure)
    pl, n_p = ndi.label(p, structure)
    detected = len(set(np.unique(gl[p]).tolist()) - {0})
    fp = len(set(range(1, n_p + 1)) - set(np.unique(pl[g]).tolist()))
    return {"lesions": int(n_g), "detected": int(detected), "false_positives": int(fp)}


def hierarchical_bootstrap(diffs, n_boot: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean paired difference; ``diffs`` ``[seeds, cases]`` (a 1-D array
    is one seed). Each replicate draws seeds with replacement, then cases with replacement (the same cases for
    every drawn seed: the pairing of a case across seeds is kept). NaN entries are ignored."""
    d = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    if d.size == 0 or np.isnan(d).all():
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, d.shape[0], (n_boot, d.shape[0]))
    c_idx = rng.integers(0, d.shape[1], (n_boot, d.shape[1]))
    with warnings.catch_warnings():  # a replicate of only NaN entries is NaN and left out of the percentiles
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.array([np.nanmean(d[s][:, c]) for s, c in zip(s_idx, c_idx)])
    return float(np.nanmean(d)), float(np.nanpercentile(means, 2.5)), float(np.nanpercentile(means, 97.5))
