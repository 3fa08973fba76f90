"""Evaluation of the fvae_ldm bundle (evaluate.yaml): generated vs. real CT volumes, read from two folders.

Which label map goes with which volume is a naming rule, not a datalist: a volume ``<stem>.nii[.gz]`` takes
``<stem>_seg``, ``<stem>_label`` or ``<stem>`` (in that order, ``.nii.gz`` before ``.nii``) from its label folder; a
generated volume's stem loses ``_generated`` first (``c0_generated.nii.gz`` -> ``masks/c0_seg.nii.gz``, the mask it
was generated from). Files named ``*_seg`` / ``*_label`` in a volume folder are label maps, not volumes.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..batch import BatchRunner
from ..checked_io import check_items
from ..errors import InputError
from ..io import Case, atomic_write, load_labels, spacing_of, write_text_atomic
from ..transforms import to_slices

__all__ = ["evaluate_generated", "volumes_in", "label_map_for", "volume_stem"]

log = logging.getLogger("fvae_ct")

#: suffixes that make a NIfTI file a label map (left out of the volumes of a folder)
LABEL_SUFFIXES = ("_seg", "_label")


def volume_stem(path, generated: bool = False) -> str:
    """The file name up to ``.nii``; ``generated``: without ``_generated`` (the stem of the mask it came from)."""
    stem = Path(path).name.split(".nii")[0]
    return stem.replace("_generated", "") if generated else stem


def volumes_in(folder) -> list[Path]:
    """The NIfTI volumes of ``folder`` (``*.nii.gz`` / ``*.nii``, label maps ``*_seg`` / ``*_label`` left out), sorted;
    a missing folder is an :class:`InputError` naming it."""
    if not Path(folder).is_dir():
        raise InputError(folder, "folder does not exist")
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.name.endswith((".nii.gz", ".nii")) and not volume_stem(p).endswith(LABEL_SUFFIXES)
    )


def label_map_for(folder, stem: str) -> Path | None:
    """The label map of volume ``stem`` in ``folder``: ``<stem>_seg``, ``<stem>_label``, then ``<stem>`` itself, each
    as ``.nii.gz`` then ``.nii``; ``None`` when ``folder`` is ``None`` or holds none of these."""
    if folder is None:
        return None
    for cand in (*(stem + s for s in LABEL_SUFFIXES), stem):
        for ext in (".nii.gz", ".nii"):
            if (Path(folder) / f"{cand}{ext}").is_file():
                return Path(folder) / f"{cand}{ext}"
    return None


def _raw(v):
    return "" if v is None else v


def _i3d_features(i3d, paths: Sequence[Path], window) -> np.ndarray:
    """I3D features ``[N, 1024]`` of the volumes at ``paths`` (upright slices, the documented clip protocol)."""
    from .fvd import ct_to_clip

    feats = []
    for p in tqdm(paths, desc="I3D features", unit="volume"):
        img = nib.load(str(p))
        v, _ = to_slices(np.asarray(img.dataobj).astype(np.float32), img.affine)
        with torch.no_grad():
            feats.append(i3d.features(ct_to_clip(v, window)[None])[0].numpy())
    return np.stack(feats)


def _figure(summary: dict, classes: Sequence[int], path: Path) -> None:
    """Median HU per class, real vs generated, titled with the FVD (``generation.png``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(classes))
    g = [summary["organ_median_hu_generated"][c] or np.nan for c in classes]
    r = [summary["organ_median_hu_real"][c] or np.nan for c in classes]
    ax.bar(x - 0.2, r, 0.4, label="real")
    ax.bar(x + 0.2, g, 0.4, label="generated")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("label id")
    ax.set_ylabel("median HU")
    ax.legend()
    ax.set_title(
        f"FVD {summary['fvd']:.1f} ({summary['n_generated']} generated vs {summary['n_real']} real"
        + (", too few for a reliable FVD)" if summary["fvd_warning"] else ")")
        + (f", mask Dice {summary['dice_mean']:.3f}" if "dice_mean" in summary else "")
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def evaluate_generated(
    gen_dir: str,
    real_dir: str,
    output_dir: str,
    masks_dir: str | None = None,
    real_labels_dir: str | None = None,
    classes: Sequence[int] = (1, 2, 3, 5, 6, 7),
    segmenter=None,
    tolerance_mm: float = 2.0,
    window=(-1000.0, 1000.0),
) -> dict:
    """Generated vs. real CT: FVD (I3D), per-organ median HU, and mask adherence when a segmenter is given.

    The volumes of ``gen_dir`` (e.g. ``<case>_generated.nii.gz``) are matched to their conditioning masks in
    ``masks_dir``, those of ``real_dir`` to labels in ``real_labels_dir`` (:func:`label_map_for`). ``segmenter``: a
    callable ``path -> label map`` (e.g. :class:`~fvae_ct.ldm.generation_metrics.BundleSegmenter`, built once for
    every volume) or a bundle folder. Writes ``generation_metrics.csv``, ``generation_summary.json`` and
    ``generation.png``; returns the summary (the caller prints it).
    """
    from .fvd import frechet_distance, fvd_sample_warning, load_i3d
    from .generation_metrics import BundleSegmenter, mask_adherence, organ_median_hu

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    gens, reals = volumes_in(gen_dir), volumes_in(real_dir)
    if len(gens) < 2 or len(reals) < 2:
        raise InputError(gen_dir if len(gens) < 2 else real_dir, "FVD needs at least two volumes in each folder")
    masks = {volume_stem(p): label_map_for(masks_dir, volume_stem(p, generated=True)) for p in gens}
    labels = {volume_stem(p): label_map_for(real_labels_dir, volume_stem(p)) for p in reals}
    # every volume and label map read once first (unreadable, not 3D, NaN, a label map off the volume): all bad
    # files listed, nothing scored
    pairs = [(p, masks[volume_stem(p)]) for p in gens] + [(p, labels[volume_stem(p)]) for p in reals]
    items = [{"image": str(p), **({"label": str(lab)} if lab is not None else {})} for p, lab in pairs]
    check_items(items, same_grid=False, what="nothing was scored")
    own_segmenter = isinstance(segmenter, str)
    if own_segmenter:  # the bundle's config is checked now; the segmentation workflow is built at its first volume
        segmenter = BundleSegmenter(segmenter)
    i3d = load_i3d()
    real_f, gen_f = _i3d_features(i3d, reals, window), _i3d_features(i3d, gens, window)
    fvd_value = frechet_distance(real_f, gen_f)
    fvd_warning = fvd_sample_warning(len(gens), len(reals), real_f.shape[1])
    if fvd_warning:
        log.warning("%s", fvd_warning)
        warnings.warn(fvd_warning, stacklevel=2)
    # the per-volume scores: one run per output folder, a failing volume reported after the others, torchrun shards
    try:
        with BatchRunner(out, "generation evaluation", {"generation_metrics.csv": None}, _raw, False) as runner:
            runner.plan(lambda: [Case(volume_stem(p), str(p)) for p in gens])
            for case in runner.mine():
                with runner.case(case) as rec:
                    img = nib.load(case.path)
                    hu = np.asarray(img.dataobj).astype(np.float32)
                    row = {"case": case.name}
                    if masks[case.name] is not None:
                        mask = load_labels(str(masks[case.name]), img.affine, hu.shape)
                        row.update({f"median_hu_{c}": v for c, v in organ_median_hu(hu, mask, classes).items()})
                        if segmenter is not None:
                            seg = segmenter(case.path)
                            row.update(mask_adherence(seg, mask, spacing_of(img.affine), classes, tolerance_mm))
                    rec.add(row)
            rows = runner.gather()[0]["generation_metrics.csv"]
    finally:
        if own_segmenter:
            segmenter.close()
    gen_hu = {c: [r[f"median_hu_{c}"] for r in rows if f"median_hu_{c}" in r] for c in classes}
    real_hu = {c: [] for c in classes}
    for p in reals:
        if labels[volume_stem(p)] is not None:
            img = nib.load(str(p))
            lab = load_labels(str(labels[volume_stem(p)]), img.affine, img.shape[:3])
            for c, v in organ_median_hu(np.asarray(img.dataobj).astype(np.float32), lab, classes).items():
                real_hu[c].append(v)
    summary = {
        "fvd": fvd_value,
        "n_generated": len(gens),
        "n_real": len(reals),
        "fvd_feature_dim": int(real_f.shape[1]),
        "fvd_warning": fvd_warning,
        "clip_protocol": f"HU window [{window[0]:g}, {window[1]:g}] -> [-1, 1]; 16 evenly spaced upright axial slices; "
        "224 x 224; grey -> RGB",
        "organ_median_hu_generated": {c: float(np.nanmean(v)) if v else None for c, v in gen_hu.items()},
        "organ_median_hu_real": {c: float(np.nanmean(v)) if v else None for c, v in real_hu.items()},
    }
    for k in ("dice_mean", "nsd_mean"):
        vals = [r[k] for r in rows if k in r]
        if vals:
            summary[k] = float(np.mean(vals))
    if distributed.is_main():
        write_text_atomic(out / "generation_summary.json", json.dumps(summary, indent=2))
        _figure(summary, classes, out / "generation.png")
    runner.raise_failures(" (generation_metrics.csv lists the others)")
    return summary
