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
``per_case.csv``, ``ablation.csv`` / ``.md`` / ``.json``. The runs are the cases of :class:`fvae_ct.batch.BatchRunner`:
one ablation per output folder at a time, a failed run is recorded and the others go on (one
:class:`~fvae_ct.errors.BatchFailure` at the end, no table), and a rerun reuses every finished run made with the same
settings (``skip_existing``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..batch import BatchRunner, csv_cell, write_csv
from ..errors import OptionError
from ..io import case_name, write_text_atomic
from .ablation_report import markdown, summary_rows
from .scoring import score_case, scoring_settings
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
        raise OptionError(
            f"num_samples {num_samples}: arm {arm} trains two views per crop, so give an even number "
            "(every arm then sees the same crops per step)"
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
    links = {Path(d["image"]).name: os.path.abspath(d["image"]) for d in split["test"]}
    for old in (sdir / "test").iterdir():  # an earlier split's test cases: not segmented again
        if old.name not in links or not old.is_symlink() or os.readlink(old) != links[old.name]:
            old.unlink()
    for name, target in links.items():
        if not (sdir / "test" / name).is_symlink():
            os.symlink(target, sdir / "test" / name)
    return trainval, sdir / "test"


def _view_dirs(root: Path, arms) -> dict[str, str]:
    """``{control arm: folder of its classical-filter views}``."""
    return {arm: str(root / "views" / VIEW_ARMS[arm]) for arm in arms if arm in VIEW_ARMS}


def _prepare_views(view_dirs: dict[str, str], train_items) -> None:
    """Classical-filter views of the training cases, named like reconstructions (``<case>_recon.nii.gz``)."""
    from ..reconstruct import RECON_SUFFIX
    from .nnunet_data import filtered_view

    for arm, folder in view_dirs.items():
        Path(folder).mkdir(parents=True, exist_ok=True)
        for d in train_items:
            filtered_view(d["image"], VIEW_ARMS[arm], Path(folder) / f"{case_name(d['image'])}{RECON_SUFFIX}")


def _run_in_subprocess(name: str, config, **overrides) -> None:
    """:func:`fvae_ct.bundle.run_bundle` in a new Python process (arguments as JSON: literals, never code)."""
    code = "import json, sys; from fvae_ct.bundle import run_bundle; a = json.loads(sys.argv[1]); run_bundle(*a[0], **a[1])"
    args = json.dumps([[name, config], overrides], default=str)
    r = subprocess.run([sys.executable, "-c", code, args], check=False)
    if r.returncode:
        raise RuntimeError(f"{name} {config} failed (exit code {r.returncode}; its log is above)")


def _run_bundle(name: str, config, **overrides) -> None:
    """:func:`fvae_ct.bundle.run_bundle` in this process."""
    from ..bundle import run_bundle

    run_bundle(name, config, **overrides)


def _train_and_segment(run_root: Path, trainval, test_dir, overrides: dict, infer_overrides: dict) -> Path:
    """Train one arm/seed into ``run_root`` and segment the test split with the bundle's inference config (SegResNet
    or nnU-Net, in a process of its own: nnU-Net reads its folders once per process); returns the predictions'
    folder (``<case>_seg.nii.gz``)."""
    nnunet = "nnunet_arm" in overrides
    run = _run_in_subprocess if nnunet else _run_bundle
    train = ["train.yaml", "nnunet_train.yaml"] if nnunet else "train.yaml"
    run("fvae_aug_seg", train, bundle_root=str(run_root), datalist=str(trainval), **overrides)
    pred_dir = run_root / "test_pred"
    run("fvae_aug_seg", "inference.yaml", bundle_root=str(run_root), input=str(test_dir), output_dir=str(pred_dir),
        **(infer_overrides if nnunet else {}))  # fmt: skip
    return pred_dir


def _run(run_root: Path, trainval, test_dir, split, overrides, scoring, infer_overrides, reuse=True) -> list[dict]:
    """Train, segment and score one arm/seed (per-case rows of the test split); with ``reuse``, a finished run with
    the same settings and split (its ``scores.json``) is not run again."""
    done = run_root / "scores.json"
    names = {k: [case_name(d["image"]) for d in v] for k, v in split.items()}
    settings = {"overrides": overrides, "scoring": scoring, "infer": infer_overrides, "split": names}
    settings = json.loads(json.dumps(settings, default=str))
    if reuse and done.is_file():
        try:
            saved = json.loads(done.read_text())
            if saved.get("settings") == settings:
                log.info("ablation: %s already done, reused", run_root)
                return saved["rows"]
            log.info("ablation: %s was made with other settings; running it again", run_root)
        except (OSError, ValueError, KeyError, AttributeError) as e:
            log.warning("ablation: %s is unreadable (%s); running it again", done, type(e).__name__)
    t0 = time.time()
    pred_dir = _train_and_segment(run_root, trainval, test_dir, overrides, infer_overrides)
    rows = []
    for d in split["test"]:
        pred = pred_dir / f"{case_name(d['image'])}_seg.nii.gz"
        rows.append({"case": case_name(d["image"]), **score_case(pred, d["label"], **scoring)})
    record = {"settings": settings, "seconds": time.time() - t0, "rows": rows}
    write_text_atomic(done, json.dumps(record, indent=1))
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


def _cell(v) -> str:
    """A ``per_case.csv`` / ``ablation.csv`` cell: floats with 6 significant digits (``nan`` written)."""
    return f"{v:.6g}" if isinstance(v, float) else csv_cell(v)


@dataclass
class _Run:
    """One training run of the ablation: a case of the batch runner (``name`` ``<arm>/seed<k>``, ``path`` its
    folder)."""

    name: str
    path: str
    arm: str
    seed: int


def _parse_list(value, what: str, kind=str) -> list:
    """``"a,b"`` / ``[a, b]`` / ``(a, b)`` / one value -> a list of ``kind``; an empty list or a bad item:
    :class:`OptionError` naming the option."""
    items = str(value).strip("[]()").split(",") if isinstance(value, (str, int)) else list(value)
    try:
        out = [kind(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise OptionError(f"{what} {value!r}: give a comma-separated list, e.g. 0,1,2") from None
    if not out:
        raise OptionError(f"{what} {value!r}: give at least one")
    return list(dict.fromkeys(out))  # a repeated one runs once


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
    skip_existing=True,
    **overrides,
) -> list[dict]:
    """Run the ablation (module docstring) and return the table's rows (one per arm; also in ``ablation.csv``,
    ``ablation.md`` and ``ablation.json``).

    ``overrides`` go to every training run (``max_epochs``, ``patch_size``, ``class_names``, ``scored_classes``,
    ``nsd_tolerance_mm``, ``vae`` ...). The reconstruction arms share one folder, filled once by the bundle's
    ``prepare`` run (the fvae_recon workflow). ``lesion_classes``: scored ids for the detection metric (default:
    scored classes whose name says lesion / tumour / nodule). nnU-Net arms (``nnunet_none``, ``nnunet_union``,
    ``nnunet_gaussian`` ...) take ``nnunet_*`` overrides (``nnunet_max_epochs``, ``nnunet_epoch_length``, ...) and
    segment the test split with ``nnunet_mirroring`` (nnU-Net's test-time mirroring; ``false`` is 8x faster).
    ``skip_existing`` (default true): a run finished with the same settings and split is reused, not trained again.

    Raises :class:`~fvae_ct.errors.OptionError` (bad option, before anything runs), :class:`~fvae_ct.errors.InputError`
    (bad datalist; another ablation writing into ``output_dir``) and, after every run was tried,
    :class:`~fvae_ct.errors.BatchFailure` listing the failed runs (the finished ones are kept and reused by a rerun).
    """
    from ..options import parse_bool

    arms = _parse_list(arms, "arms")
    seeds = _parse_list(seeds, "seeds", int)
    unknown = [a for a in arms if not valid_arm(a)]
    if unknown:
        raise OptionError(f"arms {','.join(unknown)}: not an arm; valid: {', '.join(ARMS)}, or nnunet_<arm> (nnU-Net)")
    infer = {"mirroring": parse_bool(nnunet_mirroring, "nnunet_mirroring")}
    reuse = parse_bool(skip_existing, "skip_existing")
    root = Path(output_dir)
    class_names = list(overrides.get("class_names", DEFAULT_NETWORK["class_names"]))
    scoring = scoring_settings(
        class_names, overrides.get("scored_classes", [1, 2]), overrides.get("nsd_tolerance_mm"), lesion_classes
    )
    dataset_dir = overrides.pop("dataset_dir", None)
    recon_dir = str(recon_dir or root / "recon")
    common = {"recon_dir": recon_dir, **overrides}
    view_dirs = _view_dirs(root, arms)
    arm_ov = {arm: {**common, **arm_overrides(arm, num_samples, view_dirs)} for arm in arms}
    state, table = {}, []

    def prepare() -> list[_Run]:  # under the output folder's lock: the split, reconstructions, control views
        split = state["split"] = split_cases(datalist, dataset_dir, val_fraction, test_fraction, split_seed)
        state["trainval"], state["test_dir"] = _write_split(root, split)
        if any(a in ARMS and ARMS[a]["recon_mode"] == "precomputed" and a not in VIEW_ARMS for a in arms):
            log.info("ablation: reconstructing the training cases into %s", recon_dir)
            _run_bundle("fvae_aug_seg", "train.yaml", run_id="prepare", bundle_root=str(root / "prepare"),
                        datalist=str(state["trainval"]), **common)  # fmt: skip
        _prepare_views(view_dirs, split["train"])
        return [_Run(f"{a}/seed{s}", str(root / a / f"seed{s}"), a, s) for a in arms for s in seeds]

    with BatchRunner(root, "fvae ablate-seg", progress=False) as runner:
        runner.plan(prepare)
        split = state["split"]
        for r in runner.mine():
            log.info("ablation: arm %s, seed %d", r.arm, r.seed)
            with runner.case(r) as c:
                rows = _run(Path(r.path), state["trainval"], state["test_dir"], split, {**arm_ov[r.arm], "seed": r.seed},
                            scoring, infer, reuse)  # fmt: skip
                c.add({"case": r.name, "arm": r.arm, "seed": r.seed, "rows": rows})
        done, failures = runner.gather()
        done = done.get("rows", [])
        per_case = [{"arm": d["arm"], "seed": d["seed"], **row} for d in done for row in d["rows"]]
        write_csv(root / "per_case.csv", None, per_case, _cell)
        if failures:
            for f in ("ablation.csv", "ablation.md", "ablation.json"):  # an earlier table is not this run's
                (root / f).unlink(missing_ok=True)
        else:
            table = _write_table(root, arms, seeds, split, done, arm_ov, scoring, n_boot, split_seed, common)
    runner.raise_failures("; no table: rerun the same command to run them (finished runs are reused)")
    return table


def _write_table(root, arms, seeds, split, done, arm_ov, scoring, n_boot, split_seed, common) -> list[dict]:
    """``ablation.csv`` / ``.md`` / ``.json`` from every run's per-case rows; returns the table's rows."""
    results = {arm: {} for arm in arms}
    for d in done:
        results[d["arm"]][d["seed"]] = {row["case"]: row for row in d["rows"]}
    batch, epochs = int(common.get("batch_size", 2)), int(common.get("max_epochs", 200))
    steps = epochs * math.ceil(len(split["train"]) / batch)
    budgets = {arm: _budget(arm, root / arm / f"seed{seeds[0]}", arm_ov[arm], steps, batch) for arm in arms}
    cases = [case_name(d["image"]) for d in split["test"]]
    table = summary_rows(results, budgets, cases, seeds, scoring, n_boot, split_seed)
    write_csv(root / "ablation.csv", None, table, _cell)
    write_text_atomic(root / "ablation.md", markdown(table, split, scoring, seeds) + "\n")
    write_text_atomic(
        root / "ablation.json",
        json.dumps({"arms": arms, "seeds": seeds, "rows": table, "scoring": scoring, "overrides": common,
                    "split": {k: [case_name(d["image"]) for d in v] for k, v in split.items()}}, indent=2, default=str),
    )  # fmt: skip
    log.info("ablation: table in %s", root / "ablation.md")
    return table
