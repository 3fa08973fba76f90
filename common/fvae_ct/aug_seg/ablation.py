"""The segmentation ablation: arms that differ only in the training view, scored on a held-out test split.

``fvae ablate-seg --datalist dataset.json --arms none,union,gaussian -o out`` trains the fvae_aug_seg bundle
(through ``monai.bundle``: the bundle's own train and inference configs) once per arm and seed, and:

- splits the labelled cases once (``split_seed``) into train / validation / test: validation picks the checkpoint
  (best Dice), the test split is never trained on nor used for selection, and only it is scored;
- trains every arm with each of ``seeds`` (3 by default) and the same budget: the same epochs and steps, and the
  same crops per step (arms that add a view per crop take half as many crops per case: ``num_samples // 2``);
- has a control arm with a classical-filter view in place of the reconstruction (``gaussian``, ``nlm``);
- scores the saved test label maps with :func:`fvae_ct.aug_seg.scoring.score_case` (one empty-label rule for Dice
  and NSD, counted; lesion-wise detection) and gives each arm's paired difference to the first arm with a bootstrap
  95 % CI over seeds and cases (:func:`fvae_ct.aug_seg.stats.hierarchical_bootstrap`).

Writes ``splits/`` (the split, as datalists), ``<arm>/seed<k>/`` (each run: models, test predictions, scores),
``per_case.csv``, ``ablation.csv`` / ``.md`` / ``.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..io import case_name, write_text_atomic
from .scoring import score_case, summarise
from .stats import hierarchical_bootstrap
from .workflow import DEFAULT_NETWORK, split_cases

__all__ = ["ARMS", "VIEW_ARMS", "arm_overrides", "ablate_seg"]

log = logging.getLogger("fvae_ct")

#: arm name -> overrides of bundles/fvae_aug_seg/configs/train.yaml
ARMS = {
    "none": {"recon_mode": "none"},
    "union": {"recon_mode": "precomputed", "recon_mix": "union"},
    "prob": {"recon_mode": "precomputed", "recon_mix": "prob", "recon_prob": 0.5},
    "gaussian": {"recon_mode": "precomputed", "recon_mix": "union"},
    "nlm": {"recon_mode": "precomputed", "recon_mix": "union"},
    "online": {"recon_mode": "online", "recon_mix": "union"},
}
#: control arms: the view is a classical filter (fvae_ct.recon.DENOISERS) instead of the VAE reconstruction
VIEW_ARMS = {"gaussian": "gaussian_1vox", "nlm": "nlm"}
#: nnU-Net v2 arms ``nnunet_<arm>`` (nnunet_train.yaml, then inference.yaml serves the model; views of
#: :data:`fvae_ct.aug_seg.nnunet_data.NNUNET_ARMS`): every arm runs nnU-Net's fixed iterations per epoch
NNUNET = "nnunet_"
_LESION_WORDS = ("lesion", "tumour", "tumor", "nodule", "metasta", "cancer")


def valid_arm(arm: str) -> bool:
    from .nnunet_data import NNUNET_ARMS

    return arm in ARMS or (arm.startswith(NNUNET) and arm[len(NNUNET) :] in NNUNET_ARMS)


def arm_overrides(arm: str, num_samples: int, view_dirs: dict[str, str]) -> dict:
    """The bundle overrides of one arm: its view settings, its recon folder (control arms) and ``num_samples``
    (halved where each crop becomes two samples, so that every arm sees the same crops per step)."""
    if arm.startswith(NNUNET):
        return {"nnunet_arm": arm[len(NNUNET) :]}
    ov = dict(ARMS[arm])
    two_views = _views_per_crop(ov) == 2
    if two_views and num_samples % 2:
        raise ValueError(
            f"num_samples must be even to compute-match arm {arm!r} (two views per crop), got {num_samples}"
        )
    ov["num_samples"] = num_samples // 2 if two_views else num_samples
    if arm in VIEW_ARMS:
        ov["recon_dir"] = view_dirs[arm]
    return ov


def _views_per_crop(ov: dict) -> int:
    """2 where each crop trains as the original and its view (``union``), else 1."""
    return 2 if ov.get("recon_mode", "none") != "none" and ov.get("recon_mix") == "union" else 1


def _write_split(root: Path, split: dict) -> tuple[Path, Path]:
    """``splits/trainval.json`` (MSD layout: training + validation) and ``splits/test/`` (links to the test images)."""
    sdir = root / "splits"
    (sdir / "test").mkdir(parents=True, exist_ok=True)
    trainval = sdir / "trainval.json"
    write_text_atomic(trainval, json.dumps({"training": split["train"], "validation": split["val"]}, indent=1))
    write_text_atomic(sdir / "test.json", json.dumps(split["test"], indent=1))
    for d in split["test"]:
        link = sdir / "test" / Path(d["image"]).name
        if not link.is_symlink():
            os.symlink(os.path.abspath(d["image"]), link)
    return trainval, sdir / "test"


def _prepare_views(root: Path, arms, train_items) -> dict[str, str]:
    """Classical-filter views of the training cases, named like reconstructions (``<case>_recon.nii.gz``)."""
    from ..recon import RECON_SUFFIX
    from .nnunet_data import filtered_view

    dirs = {}
    for arm in arms:
        if arm in VIEW_ARMS:
            dirs[arm] = str(root / "views" / VIEW_ARMS[arm])
            Path(dirs[arm]).mkdir(parents=True, exist_ok=True)
            for d in train_items:
                filtered_view(d["image"], VIEW_ARMS[arm], Path(dirs[arm]) / f"{case_name(d['image'])}{RECON_SUFFIX}")
    return dirs


def _run_in_subprocess(name: str, config, **overrides) -> None:
    """:func:`fvae_ct.bundle.run_bundle` in a new Python process (arguments as JSON: literals, never code)."""
    code = "import json, sys; from fvae_ct.bundle import run_bundle; a = json.loads(sys.argv[1]); run_bundle(*a[0], **a[1])"
    args = json.dumps([[name, config], overrides], default=str)
    r = subprocess.run([sys.executable, "-c", code, args], check=False)
    if r.returncode:
        raise RuntimeError(f"{name} {config} failed (exit code {r.returncode}; its log is above)")


def _run(run_root: Path, trainval, test_dir, split, overrides, scoring, infer_overrides) -> list[dict]:
    """Train one arm/seed, segment the test split with the bundle's inference config (SegResNet or nnU-Net), score;
    reuse a finished run with the same settings (``scores.json``)."""
    from ..bundle import run_bundle

    done = run_root / "scores.json"
    settings = json.loads(
        json.dumps({"overrides": overrides, "scoring": scoring, "infer": infer_overrides}, default=str)
    )
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("settings") == settings:
            log.info("ablation: %s already done, reused", run_root)
            return saved["rows"]
    nnunet = "nnunet_arm" in overrides
    run = _run_in_subprocess if nnunet else run_bundle  # nnU-Net reads its folders once per process
    t0 = time.time()
    train = ["train.yaml", "nnunet_train.yaml"] if nnunet else "train.yaml"
    run("fvae_aug_seg", train, bundle_root=str(run_root), datalist=str(trainval), **overrides)
    t_train = time.time() - t0
    pred_dir = run_root / "test_pred"
    run("fvae_aug_seg", "inference.yaml", bundle_root=str(run_root), input=str(test_dir), output_dir=str(pred_dir),
        **(infer_overrides if nnunet else {}))  # fmt: skip
    rows = []
    for d in split["test"]:
        pred = pred_dir / f"{case_name(d['image'])}_seg.nii.gz"
        rows.append({"case": case_name(d["image"]), **score_case(pred, d["label"], **scoring)})
    write_text_atomic(done, json.dumps({"settings": settings, "train_seconds": t_train, "rows": rows}, indent=1))
    return rows


def _budget(arm: str, run_root: Path, ov: dict, steps: int, batch: int) -> tuple[int, int]:
    """(optimisation steps, samples per step) of a finished run: SegResNet from the settings, nnU-Net from its plan
    (``epochs x iterations per epoch``, the plan's batch size)."""
    if not arm.startswith(NNUNET):
        return steps, batch * ov["num_samples"] * _views_per_crop(ov)
    plans = json.loads((run_root / "models" / "nnunet" / "plans.json").read_text())
    conf = plans["configurations"][ov.get("nnunet_configuration", "3d_fullres")]
    epochs, length = ov.get("nnunet_max_epochs") or 1000, ov.get("nnunet_epoch_length") or 250
    return int(epochs) * int(length), int(conf["batch_size"])


def _csv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    w.writerows([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    return buf.getvalue()


def ablate_seg(
    datalist: str,
    arms=("none", "union", "gaussian"),
    output_dir: str = "ablation",
    recon_dir: str | None = None,
    seeds=(0, 1, 2),
    split_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    num_samples: int = 2,
    lesion_classes=None,
    n_boot: int = 10000,
    nnunet_mirroring=True,
    **overrides,
) -> list[dict]:
    """Run the ablation (module docstring) and return the table's rows (one per arm).

    ``overrides`` go to every training run (``max_epochs``, ``patch_size``, ``class_names``, ``scored_classes``,
    ``nsd_tolerance_mm``, ``vae`` ...). The reconstruction arms share one folder, filled once by the bundle's
    ``prepare`` run (the fvae_recon workflow). ``lesion_classes``: scored ids for the detection metric (default:
    scored classes whose name says lesion / tumour / nodule). nnU-Net arms (``nnunet_none``, ``nnunet_union``,
    ``nnunet_gaussian`` ...) take ``nnunet_*`` overrides (``nnunet_max_epochs``, ``nnunet_epoch_length``, ...) and
    segment the test split with ``nnunet_mirroring`` (nnU-Net's test-time mirroring; ``false`` is 8x faster).
    """
    from ..bundle import run_bundle
    from ..options import parse_bool

    arms = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms)]
    seeds = [int(s) for s in (str(seeds).strip("[]()").split(",") if isinstance(seeds, (str, int)) else seeds)]
    unknown = [a for a in arms if not valid_arm(a)]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; valid: {', '.join(ARMS)}, and nnunet_<arm> for nnU-Net arms")
    infer = {"mirroring": parse_bool(nnunet_mirroring, "nnunet_mirroring")}
    if not seeds:
        raise ValueError("give at least one seed")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    class_names = list(overrides.get("class_names", DEFAULT_NETWORK["class_names"]))
    scored = [int(c) for c in overrides.get("scored_classes", [1, 2])]
    tol = [float(t) for t in overrides.get("nsd_tolerance_mm", [2.0] * len(scored))]
    if lesion_classes is None:
        lesion_classes = [c for c in scored if any(w in class_names[c].lower() for w in _LESION_WORDS)]
    scoring = {"scored_classes": scored, "tolerances_mm": tol, "lesion_classes": [int(c) for c in lesion_classes]}

    split = split_cases(datalist, overrides.pop("dataset_dir", None), val_fraction, test_fraction, split_seed)
    trainval, test_dir = _write_split(root, split)
    recon_dir = str(recon_dir or root / "recon")
    common = {"recon_dir": recon_dir, **overrides}
    if any(a in ARMS and ARMS[a]["recon_mode"] == "precomputed" and a not in VIEW_ARMS for a in arms):
        log.info("ablation: reconstructing the training cases into %s", recon_dir)
        run_bundle("fvae_aug_seg", "train.yaml", run_id="prepare", bundle_root=str(root / "prepare"),
                   datalist=str(trainval), **common)  # fmt: skip
    view_dirs = _prepare_views(root, arms, split["train"])

    batch, epochs = int(overrides.get("batch_size", 2)), int(overrides.get("max_epochs", 200))
    steps = epochs * math.ceil(len(split["train"]) / batch)
    per_case, results = [], {}
    for arm in arms:
        ov = {**common, **arm_overrides(arm, num_samples, view_dirs)}
        results[arm] = {"seeds": {}}
        for s in seeds:
            log.info("ablation: arm %s, seed %d", arm, s)
            rows = _run(root / arm / f"seed{s}", trainval, test_dir, split, {**ov, "seed": s}, scoring, infer)
            results[arm]["seeds"][s] = {r["case"]: r for r in rows}
            per_case += [{"arm": arm, "seed": s, **r} for r in rows]
        results[arm]["budget"] = _budget(arm, root / arm / f"seed{seeds[0]}", ov, steps, batch)
    write_text_atomic(root / "per_case.csv", _csv(per_case))

    cases = [case_name(d["image"]) for d in split["test"]]
    base = arms[0]
    table = []
    for arm in arms:
        by_seed = [summarise([results[arm]["seeds"][s][c] for c in cases], scored, scoring["lesion_classes"])
                   for s in seeds]  # fmt: skip
        row = {"arm": arm, "seeds": len(seeds), "test_cases": len(cases), "steps": results[arm]["budget"][0],
               "crops_per_step": results[arm]["budget"][1]}  # fmt: skip
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
            mean, lo, hi = hierarchical_bootstrap(d, n_boot, split_seed) if arm != base else (0.0, 0.0, 0.0)
            row.update({f"{m}_diff": mean, f"{m}_ci_low": lo, f"{m}_ci_high": hi})
        table.append(row)
    write_text_atomic(root / "ablation.csv", _csv(table))
    text = _markdown(table, base, split, scored, scoring["lesion_classes"], seeds)
    write_text_atomic(root / "ablation.md", text + "\n")
    write_text_atomic(
        root / "ablation.json",
        json.dumps({"arms": arms, "seeds": seeds, "rows": table, "scoring": scoring, "overrides": common,
                    "split": {k: [case_name(d["image"]) for d in v] for k, v in split.items()}}, indent=2, default=str),
    )  # fmt: skip
    print(text)
    return table


def _case_mean(results, arm, seed, case, metric, scored) -> float:
    """One test case's score of one run, mean over the scored classes."""
    return float(np.nanmean([results[arm]["seeds"][seed][case][f"{metric}_{k}"] for k in scored]))


def _markdown(table, base, split, scored, lesion_classes, seeds) -> str:
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
