"""Synthetic lesions with known masks, inserted into real CT (no public tumour label fits our test data).

A lesion is an ellipsoid inside an organ: hypodense (or hyperdense) by ``contrast_hu`` relative to the
organ, with partial-volume edges (a soft mask from the signed distance to the ellipsoid surface, in mm)
and the organ's own noise level inside (so it is not an unnaturally smooth blob). Volumes ``[X, Y, Z]``
in HU with their voxel spacing (mm); everything is deterministic for a given ``rng``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from ..errors import InputError, OptionError

__all__ = ["Lesion", "insert_lesion", "make_lesion_set", "HOST_ORGANS"]


@dataclass
class Lesion:
    """Where a lesion was put: centre (voxel), semi-axes (mm), mean HU inside, and its binary mask."""

    centre: tuple[int, int, int]
    semi_axes_mm: tuple[float, float, float]
    mean_hu: float
    mask: np.ndarray


def insert_lesion(
    ct: np.ndarray,
    organ: np.ndarray,
    spacing,
    radius_mm: float = 8.0,
    contrast_hu: float = -50.0,
    elongation: float = 1.3,
    edge_mm: float = 1.0,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, Lesion]:
    """Insert one ellipsoidal lesion inside ``organ`` (bool mask) of ``ct`` (HU); returns (new ct, lesion).

    The centre is drawn among organ voxels at least ``radius_mm * elongation`` from the organ surface, so
    the lesion stays inside. The lesion's mean is the organ's median HU + ``contrast_hu``; inside it, the
    organ's noise (robust sigma of the organ's HU) is kept by adding a matching gaussian texture. Edges are a
    sigmoid ramp of width ``edge_mm``. The mask is where the soft weight is at least 0.5.
    """
    rng = rng or np.random.default_rng(0)
    ct = np.asarray(ct, dtype=np.float32)
    organ = np.asarray(organ, bool)
    sp = np.asarray(spacing, dtype=np.float64)
    if not organ.any():
        raise ValueError("the organ mask is empty")  # make_lesion_set checks the label file first
    axes = radius_mm * np.array([elongation, 1.0, 1.0 / elongation])
    rng.shuffle(axes)
    depth = ndi.distance_transform_edt(organ, sampling=sp)
    candidates = np.argwhere(depth >= axes.max() + edge_mm)
    if len(candidates) == 0:
        raise OptionError(
            f"radius_mm {radius_mm:g}: no place in the organ is {axes.max() + edge_mm:.1f} mm from its surface "
            f"(its deepest point is {float(depth.max()):.1f} mm deep); use a smaller radius_mm"
        )
    centre = candidates[rng.integers(len(candidates))]
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(ct.shape, centre, sp)], indexing="ij")
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, axes)))  # 1 on the ellipsoid surface
    signed_mm = (r - 1.0) * axes.min()  # approximately mm outside (+) / inside (-)
    weight = expit(-signed_mm / max(edge_mm / 4.0, 1e-3))
    vals = ct[organ]
    med = float(np.median(vals))
    sigma = float(1.4826 * np.median(np.abs(vals - med)))
    mean = med + contrast_hu
    texture = mean + rng.normal(0.0, sigma, ct.shape).astype(np.float32)
    out = ((1.0 - weight) * ct + weight * texture).astype(np.float32)
    mask = weight >= 0.5
    return out, Lesion(tuple(int(c) for c in centre), tuple(float(a) for a in axes), mean, mask)


#: TotalSegmentator label ids of organs that take a lesion in the demo set (liver, spleen, kidneys).
HOST_ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}


def make_lesion_set(
    out_dir,
    ct_path,
    seg_path,
    n_cases: int = 6,
    organs=("liver", "spleen", "kidney_right", "kidney_left"),
    radius_mm: tuple[float, float] = (6.0, 10.0),
    contrast_hu: tuple[float, float] = (-70.0, -35.0),
    seed: int = 0,
) -> str:
    """Write ``n_cases`` copies of a real CT, each with one synthetic lesion, and an MSD-style dataset.json.

    Labels: 0 background, 1 host organ, 2 lesion. Images keep the source's affine and dtype (int16 HU).
    Returns the path of dataset.json (``training`` list of ``{"image", "label"}``, relative paths).
    """
    import json
    from pathlib import Path

    import nibabel as nib

    from ..io import save_nifti_atomic, write_text_atomic

    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    ct_img = nib.load(str(ct_path))
    ct = np.asarray(ct_img.dataobj).astype(np.float32)
    seg = np.asarray(nib.load(str(seg_path)).dataobj).astype(np.int16)
    spacing = ct_img.header.get_zooms()[:3]
    unknown = [o for o in organs if o not in HOST_ORGANS]
    if unknown:
        raise OptionError(f"organs {list(organs)}: {unknown} not among {', '.join(HOST_ORGANS)}")
    if int(n_cases) < 1:
        raise OptionError(f"n_cases {n_cases!r}: give at least 1")
    absent = [f"{o} ({HOST_ORGANS[o]})" for o in organs[: int(n_cases)] if not (seg == HOST_ORGANS[o]).any()]
    if absent:
        raise InputError(seg_path, f"no voxel of organ label(s) {', '.join(absent)}: not a TotalSegmentator label map?")
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_cases):
        organ_name = organs[i % len(organs)]
        organ = seg == HOST_ORGANS[organ_name]
        room = float(ndi.distance_transform_edt(organ, sampling=spacing).max())  # deepest point of the organ
        radius = min(float(rng.uniform(*radius_mm)), (room - 1.5) / 1.3)  # fits with the default elongation
        new, lesion = insert_lesion(
            ct, organ, spacing, radius_mm=radius, contrast_hu=float(rng.uniform(*contrast_hu)), rng=rng
        )
        label = np.zeros(ct.shape, np.int16)
        label[organ] = 1
        label[lesion.mask] = 2
        name = f"lesion_{i:03d}"
        save_nifti_atomic(np.round(new).astype(np.int16), ct_img.affine, out / "imagesTr" / f"{name}.nii.gz")
        save_nifti_atomic(label, ct_img.affine, out / "labelsTr" / f"{name}.nii.gz")
        items.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz", "organ": organ_name})
    meta = {
        "name": "fvae-ct synthetic lesions",
        "description": f"real CT {Path(ct_path).name} with inserted "
        "hypodense ellipsoidal lesions (partial-volume edges, organ-matched noise)",
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": n_cases,
        "training": items,
    }
    write_text_atomic(out / "dataset.json", json.dumps(meta, indent=2))
    return str(out / "dataset.json")


def main(argv=None) -> None:
    """``python -m fvae_ct.aug_seg.lesions OUT [--ct CT --seg SEG --n_cases 8 --seed 0]``: a lesion set from a bundle
    folder (the archive vendors this module); without ``--ct`` / ``--seg``, the bundle's ``sample_data`` files."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fvae_ct.aug_seg.lesions", description=make_lesion_set.__doc__)
    p.add_argument("output_dir")
    p.add_argument("--ct", default="sample_data/totalseg_ct_sm_3mm.nii.gz")
    p.add_argument("--seg", default="sample_data/totalseg_ct_sm_3mm_seg.nii.gz")
    p.add_argument("--n_cases", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for f in (a.ct, a.seg):
        if not os.path.isfile(f):
            raise SystemExit(
                f"{f}: not found (run from the bundle folder after download_large_files, or give --ct/--seg)"
            )
    print(make_lesion_set(a.output_dir, a.ct, a.seg, n_cases=a.n_cases, seed=a.seed))


if __name__ == "__main__":
    main()
