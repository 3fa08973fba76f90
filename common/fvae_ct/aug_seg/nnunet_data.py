"""nnU-Net v2 raw datasets for the augmentation arms (the paper's protocol: the reconstruction as an extra view).

:func:`export_arm` writes ``<nnunet_raw>/Dataset<ID>_<name>/`` from the bundle's datalist:

- ``imagesTr/<case><suffix>_0000.nii.gz`` + ``labelsTr/<case><suffix>.nii.gz`` for the training cases of the arm
  (:data:`NNUNET_ARMS`: ``none`` originals, ``recon`` reconstructions only, ``union`` both, a classical-filter view
  as control), each view keeping its original's label; validation cases original only;
- ``imagesTs`` / ``labelsTs``: the test split (never trained on, never used to select a checkpoint);
- ``dataset.json`` (``NibabelIO``: arrays in the file's voxel order, as MONAI's ``LoadImage`` gives them, so the
  trained model and :class:`monai.apps.nnunet.ModelnnUNetWrapper` see the same axes);
- ``<nnunet_preprocessed>/Dataset<ID>_<name>/splits_final.json``: validation = originals only; a view is trained
  on exactly when its original is (never in another fold's training set while its original validates).

Sources that are ``.nii.gz`` are linked, others written as ``.nii.gz`` with their header; inputs are never
modified.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError, OptionError
from ..io import case_name, save_nifti_atomic, write_text_atomic

__all__ = ["NNUNET_ARMS", "arm_views", "export_arm", "make_folds", "dataset_folder_name", "filtered_view"]

log = logging.getLogger("fvae_ct")

#: arm -> the training views (``original``, ``recon`` or a classical-filter name of fvae_ct.recon.DENOISERS)
NNUNET_ARMS = {
    "none": ("original",),
    "recon": ("recon",),
    "union": ("original", "recon"),
    "gaussian": ("original", "gaussian_1vox"),
    "nlm": ("original", "nlm"),
}


def arm_views(arm: str) -> tuple[str, ...]:
    """The training views of nnU-Net arm ``arm`` (:data:`NNUNET_ARMS`); another name is an :class:`OptionError`."""
    if arm not in NNUNET_ARMS:
        raise OptionError(f"nnunet_arm {arm!r}: must be one of {', '.join(NNUNET_ARMS)}")
    return NNUNET_ARMS[arm]


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name ``Dataset<ID:03d>_<name>``."""
    if not 1 <= int(dataset_id) <= 999:
        raise OptionError(f"nnunet_dataset_id {dataset_id}: nnU-Net dataset ids are 1..999")
    return f"Dataset{int(dataset_id):03d}_{name}"


def make_folds(train_ids: list[str], val_ids: list[str], num_folds: int, seed: int) -> list[tuple[list, list]]:
    """``[(train originals, val originals)]``: one fold = the bundle's split; k folds = a seeded k-way split of all."""
    ids = sorted(train_ids + val_ids)
    if not 1 <= int(num_folds) <= max(1, len(ids)):
        raise OptionError(
            f"nnunet_folds {num_folds}: give 1 (the bundle's split) or k folds with at least k labelled cases "
            f"(the datalist has {len(ids)})"
        )
    if num_folds == 1:
        return [(sorted(train_ids), sorted(val_ids))]
    order = np.random.default_rng(seed).permutation(len(ids))
    groups = [sorted(ids[i] for i in order[k::num_folds]) for k in range(num_folds)]
    return [(sorted(set(ids) - set(g)), g) for g in groups]


def filtered_view(image: str, denoiser: str, out: Path, window=(-1000.0, 1000.0)) -> Path:
    """The classical-filter control view of one CT (fvae_ct.recon.DENOISERS ``denoiser``), HU, source header kept."""
    from ..recon.denoisers import DENOISERS

    if out.is_file():
        return out
    img = nib.load(image)
    x = np.asarray(img.dataobj, dtype=np.float32)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    y = DENOISERS[denoiser].fn(x, spacing, tuple(window))
    save_nifti_atomic(np.round(y).astype(np.int16), img.affine, out, like=image, forbid=(image,))
    return out


def _put(src: str, dst: Path) -> None:
    """Link a ``.nii.gz`` (relative link), else write it as ``.nii.gz`` with its header."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if str(src).lower().endswith(".nii.gz"):
        os.symlink(os.path.relpath(os.path.abspath(src), dst.parent), dst)
        return
    if not str(src).lower().endswith(".nii"):
        raise InputError(src, "nnU-Net export takes NIfTI files (convert DICOM series with fvae_recon first)")
    img = nib.load(str(src))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), str(dst))


def _check_label(path: str, n_classes: int) -> None:
    ids = np.unique(np.asarray(nib.load(path).dataobj))
    bad = [v for v in ids.tolist() if v != int(v) or not 0 <= v < n_classes]
    if bad:
        raise InputError(path, f"label ids {sorted(ids.tolist())} outside the classes 0..{n_classes - 1}")


def export_arm(
    splits: dict[str, list[dict]],
    arm: str,
    nnunet_raw: str,
    nnunet_preprocessed: str,
    dataset_id: int,
    class_names,
    recon_path=None,
    view_dir: str | None = None,
    num_folds: int = 1,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write the arm's raw dataset and ``splits_final.json``; returns the raw dataset folder.

    Args:
        splits: ``{"train", "val"[, "test"]}`` lists of ``{"image", "label"}`` (absolute paths), e.g.
            :func:`fvae_ct.aug_seg.build_datalists`.
        recon_path: callable ``image path -> reconstruction path`` (the recon workflow's cached output); needed by
            arms with the ``recon`` view.
        view_dir: folder for the classical-filter views (cached).
        num_folds: 1 = the given train / val split as fold 0; k > 1 = k folds over train + val.
    """
    views = arm_views(arm)
    folder = dataset_folder_name(dataset_id, name or f"fvae_{arm}")
    root = Path(nnunet_raw) / folder
    items = {case_name(d["image"]): d for k in ("train", "val", "test") for d in splits.get(k) or []}
    if len(items) != sum(len(splits.get(k) or []) for k in ("train", "val", "test")):
        raise InputError("datalist", "two cases share a name (nnU-Net needs unique case ids)")
    for d in items.values():
        _check_label(d["label"], len(class_names))
    train_ids = [case_name(d["image"]) for d in splits["train"]]
    val_ids = [case_name(d["image"]) for d in splits["val"]]
    folds = make_folds(train_ids, val_ids, num_folds, seed)
    trained = sorted({c for tr, _ in folds for c in tr})  # originals that train in some fold
    cases: dict[str, dict] = {}
    for case in sorted(set(train_ids) | set(val_ids)):
        d = items[case]
        for view in views if case in trained else ("original",):
            if view == "original":
                src = d["image"]
            elif view == "recon":
                if recon_path is None:  # a caller's bug: the bundle config always passes it
                    raise ValueError(f"arm {arm} needs reconstructions (recon_path)")
                src = str(recon_path(d["image"]))
            else:
                src = str(filtered_view(d["image"], view, Path(view_dir or root / "views") / f"{case}_{view}.nii.gz"))
            cid = case if view == "original" else f"{case}__{view}"
            cases[cid] = {"source": case, "view": view, "image": src, "label": d["label"]}
    for cid, c in cases.items():
        _put(c["image"], root / "imagesTr" / f"{cid}_0000.nii.gz")
        _put(c["label"], root / "labelsTr" / f"{cid}.nii.gz")
    for d in splits.get("test") or []:
        case = case_name(d["image"])
        _put(d["image"], root / "imagesTs" / f"{case}_0000.nii.gz")
        _put(d["label"], root / "labelsTs" / f"{case}.nii.gz")
    splits_final = []
    for tr, va in folds:
        fold_train = [cid for cid, c in cases.items() if c["source"] in tr and (c["view"] in views)]
        splits_final.append({"train": sorted(fold_train), "val": sorted(va)})
    # a fold's training cases must not include any view of its validation cases
    for s in splits_final:
        assert not {cases[c]["source"] for c in s["train"]} & set(s["val"]), "a validation case's view leaked"
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {n: i for i, n in enumerate(class_names)},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIO",
        "name": folder,
        "description": f"fvae-ct augmentation arm '{arm}': training views {list(views)}",
        "fvae_arm": arm,
        "fvae_cases": {cid: {"source": c["source"], "view": c["view"]} for cid, c in cases.items()},
        "fvae_test": sorted(case_name(d["image"]) for d in splits.get("test") or []),
    }
    write_text_atomic(root / "dataset.json", json.dumps(meta, indent=1))
    pre = Path(nnunet_preprocessed) / folder
    pre.mkdir(parents=True, exist_ok=True)
    write_text_atomic(pre / "splits_final.json", json.dumps(splits_final, indent=1))
    log.info(
        "nnU-Net arm %s: %d training images (%s) in %s, %d fold(s)", arm, len(cases), "+".join(views), root, len(folds)
    )
    return root
