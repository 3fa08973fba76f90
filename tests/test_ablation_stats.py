"""The ablation's statistics: one empty-label rule for Dice and NSD, lesion-wise detection, bootstrap CIs."""

import numpy as np
import torch
from fvae_ct.aug_seg import SpacingSurfaceDiceMetric
from fvae_ct.aug_seg.stats import apply_empty_rule, hierarchical_bootstrap, lesion_detection
from monai.metrics import DiceMetric


def _onehot(lab, n=2):
    from monai.data import MetaTensor

    t = torch.nn.functional.one_hot(torch.as_tensor(lab).long(), n).permute(3, 0, 1, 2)[None].float()
    return MetaTensor(t, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))


def test_monai_disagrees_on_an_empty_ground_truth_and_the_rule_makes_both_zero():
    gt = np.zeros((12, 12, 6), int)
    fp = gt.copy()
    fp[2:4, 2:4, 2:4] = 1
    y, p = _onehot(gt), _onehot(fp)
    dice = DiceMetric(include_background=False)(p, y).item()
    nsd = SpacingSurfaceDiceMetric(class_thresholds=[2.0], include_background=False)(p, y).item()
    assert np.isnan(dice) and nsd == 0.0  # what MONAI gives: the false positive vanishes from a Dice mean
    both, counts = zip(*(apply_empty_rule([v], [True], [False]) for v in (dice, nsd)))
    assert [b[0] for b in both] == [0.0, 0.0] and counts[0] == {"empty_gt": 1, "empty_gt_false_positive": 1}
    v, c = apply_empty_rule([np.nan, 0.0, 0.8], [True, True, False], [True, False, False])
    assert v.tolist() == [1.0, 0.0, 0.8] and c == {"empty_gt": 2, "empty_gt_false_positive": 1}
    assert np.nanmean(v) == np.mean(v)  # nothing left undefined


def test_lesion_detection_by_connected_components():
    gt = np.zeros((20, 20, 10), int)
    gt[2:5, 2:5, 2:5] = 2      # lesion A (hit)
    gt[12:15, 12:15, 5:8] = 2  # lesion B (missed)
    gt[0:20, 0:2, :] = 1       # another class is ignored
    pred = np.zeros_like(gt)
    pred[4:6, 4:6, 4:6] = 2    # touches A
    pred[8, 8, 1] = 2          # false positive ...
    pred[9, 9, 2] = 2          # ... diagonal neighbour: the same component (26-connectivity)
    assert lesion_detection(pred, gt, 2) == {"lesions": 2, "detected": 1, "false_positives": 1}
    assert lesion_detection(gt, gt, 2) == {"lesions": 2, "detected": 2, "false_positives": 0}
    assert lesion_detection(np.zeros_like(gt), gt, 2) == {"lesions": 2, "detected": 0, "false_positives": 0}


def test_hierarchical_bootstrap_covers_case_and_seed_spread():
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 1.0, 400)
    m, lo, hi = hierarchical_bootstrap(d, n_boot=4000)
    assert abs(m - d.mean()) < 1e-12
    assert abs((hi - lo) / 2 - 1.96 * d.std() / 20) < 0.02  # one seed: the usual case bootstrap
    m, lo, hi = hierarchical_bootstrap(np.full((3, 5), 0.25))
    assert m == lo == hi == 0.25
    # three seeds, one of them shifted: the seed spread widens the interval beyond the case bootstrap's
    seeds = np.stack([d[:50], d[:50] + 1.0, d[:50]])
    _, lo_s, hi_s = hierarchical_bootstrap(seeds, n_boot=4000)
    _, lo_c, hi_c = hierarchical_bootstrap(seeds.mean(0), n_boot=4000)
    assert hi_s - lo_s > 1.5 * (hi_c - lo_c)
    assert np.isnan(hierarchical_bootstrap(np.array([np.nan, np.nan]))[0])
    with_nan = np.array([0.5, np.nan, 0.5])
    assert hierarchical_bootstrap(with_nan)[:1] == (0.5,)


# ---- the scorer of saved label maps (every arm, SegResNet or nnU-Net) -------------------------------------------
def _save(tmp_path, name, arr, affine):
    import nibabel as nib

    p = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(p))
    return p


def test_score_case_values_empty_rule_detection_and_grid(tmp_path):
    import pytest
    from fvae_ct.aug_seg.scoring import score_case, summarise
    from fvae_ct.errors import InputError

    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    gt = np.zeros((20, 20, 10), np.uint8)
    gt[2:12, 2:12, 2:8] = 1  # organ: 600 voxels
    gt[4:6, 4:6, 3:5] = 2  # lesion A (8 voxels, inside the organ)
    gt[9:11, 9:11, 5:7] = 2  # lesion B (8 voxels)
    pred = gt.copy()
    pred[9:11, 9:11, 5:7] = 1  # lesion B missed
    pred[15:17, 15:17, 2:4] = 2  # a false-positive component
    g, p = _save(tmp_path, "gt", gt, aff), _save(tmp_path, "pred", pred, aff)
    s = score_case(p, g, [1, 2], [2.0, 2.0], lesion_classes=[2])
    organ_gt, organ_pred = (gt == 1).sum(), (pred == 1).sum()
    assert s["dice_1"] == pytest.approx(2 * ((gt == 1) & (pred == 1)).sum() / (organ_gt + organ_pred))
    assert s["dice_2"] == pytest.approx(2 * 8 / (16 + 16))  # 8 shared of 16 + 16
    assert (s["lesions_2"], s["detected_2"], s["fp_2"]) == (2, 1, 1)
    assert s["gt_empty_2"] == 0.0 and s["pred_empty_2"] == 0.0
    # an empty ground truth: a false positive scores 0 in both metrics, an empty prediction 1 in both
    gt0 = np.where(gt == 2, 1, gt).astype(np.uint8)
    s0 = score_case(p, _save(tmp_path, "gt0", gt0, aff), [1, 2], [2.0, 2.0], lesion_classes=[2])
    assert (s0["dice_2"], s0["nsd_2"], s0["gt_empty_2"], s0["fp_2"]) == (0.0, 0.0, 1.0, 2)
    s1 = score_case(_save(tmp_path, "p0", gt0, aff), _save(tmp_path, "g0", gt0, aff), [1, 2], [2.0, 2.0], [2])
    assert (s1["dice_2"], s1["nsd_2"], s1["dice_1"], s1["nsd_1"]) == (1.0, 1.0, 1.0, 1.0)
    summ = summarise([s, s0, s1], [1, 2], [2])
    assert summ["empty_gt_2"] == 2 and summ["empty_gt_fp_2"] == 1
    assert summ["sensitivity_2"] == pytest.approx(1 / 2) and summ["fp_per_case_2"] == pytest.approx(1.0)
    assert summ["dice_2"] == pytest.approx((0.5 + 0.0 + 1.0) / 3) and np.isfinite(summ["nsd"])
    # another grid (affine shifted by 5 mm) or a missing file: one line naming the file
    moved = aff.copy()
    moved[0, 3] = 5.0
    with pytest.raises(InputError, match="does not match"):
        score_case(_save(tmp_path, "moved", pred, moved), g, [1, 2], [2.0, 2.0])
    with pytest.raises(InputError, match="does not exist"):
        score_case(tmp_path / "none.nii.gz", g, [1], [2.0])
