"""Segmentation with the frozen-VAE reconstruction view (the fvae_aug_seg bundle's logic).

- :func:`build_datalists`: MSD ``dataset.json`` or a plain list (``image``, ``label``, optional
  ``image_recon``) -> train / validation lists, with the reconstruction view attached per ``recon_mode``.
- :class:`SplitViewsd` (``recon_mix: union``): after the joint crop, each sample becomes two samples,
  the original and the reconstruction, sharing crop and label. :class:`RandReconViewd` (``prob``): the
  reconstruction replaces the original with probability ``recon_prob``.
- :class:`SpacingSurfaceDiceMetric` / :func:`surface_dice_handler`: NSD with the true voxel spacing read
  from each label's affine (MONAI's handler cannot pass ``spacing=``).
- :class:`LossHistory`: per-iteration training loss to JSON (for tests and the ablation report).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric
from monai.transforms import MapTransform, Randomizable

from .errors import InputError
from .io import case_name, write_text_atomic
from .recon import RECON_SUFFIX

__all__ = ["build_datalists", "recon_inputs", "SplitViewsd", "RandReconViewd", "view_mixer", "SpacingSurfaceDiceMetric",
           "SpacingHausdorffMetric", "surface_dice_handler", "hd95_handler", "LossHistory", "spacing_from_affine"]

log = logging.getLogger("fvae_ct")
RECON_MODES = ("none", "precomputed", "online")
RECON_MIXES = ("union", "prob")


def _read_datalist(datalist: str, dataset_dir: str | None) -> tuple[list[dict], list[dict] | None]:
    p = Path(datalist)
    if not p.is_file():
        raise InputError(p, "datalist JSON does not exist")
    base = dataset_dir or str(p.parent)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(p, f"not valid JSON ({e})") from e
    if isinstance(data, dict):
        if "training" not in data:
            raise InputError(p, "an MSD-style datalist needs a 'training' list of {'image', 'label'} items")
        train = load_decathlon_datalist(str(p), True, "training", base_dir=base)
        val = load_decathlon_datalist(str(p), True, "validation", base_dir=base) if "validation" in data else None
        return train, val
    items = []
    for d in data:
        if not isinstance(d, dict) or "image" not in d or "label" not in d:
            raise InputError(p, f"each item needs 'image' and 'label', got {d!r}")
        items.append({k: (v if os.path.isabs(str(v)) else os.path.join(base, str(v))) for k, v in d.items()})
    return items, None


def build_datalists(datalist: str, dataset_dir: str | None = None, recon_mode: str = "none",
                    recon_dir: str | None = None, val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...]}`` with ``image``, ``label`` (and ``image_recon`` for ``precomputed``).

    The split is the datalist's ``validation`` list when present, else a seeded shuffle holding out
    ``val_fraction`` of the cases (at least one): the same split for every arm of an ablation.
    ``precomputed`` reads ``<recon_dir>/<case>_recon.nii.gz`` (as written by fvae_recon) unless the item
    names its own ``image_recon``; a missing file is an error that names the case and the ``prepare`` run.
    """
    if recon_mode not in RECON_MODES:
        raise ValueError(f"recon_mode must be one of {RECON_MODES}, got {recon_mode!r}")
    train, val = _read_datalist(datalist, dataset_dir)
    if val is None:
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, int(round(val_fraction * len(train)))) if len(train) > 1 else 0
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    for item in (*train, *val):
        if recon_mode == "precomputed" and "image_recon" not in item:
            if recon_dir is None:
                raise ValueError("recon_mode 'precomputed' needs recon_dir")
            item["image_recon"] = str(Path(recon_dir) / f"{case_name(item['image'])}{RECON_SUFFIX}")
        if recon_mode == "precomputed" and not Path(item["image_recon"]).is_file():
            raise InputError(item["image_recon"], f"no reconstruction for case {case_name(item['image'])}: run the "
                                                  "bundle's 'prepare' run id first (python -m monai.bundle run "
                                                  "prepare --config_file .../train.yaml ...)")
        if recon_mode != "precomputed":
            item.pop("image_recon", None)
    return {"train": train, "val": val}


def recon_inputs(datalist: str, dataset_dir: str | None = None) -> list[str]:
    """Every image path of a datalist (training and validation), for the ``prepare`` run."""
    train, val = _read_datalist(datalist, dataset_dir)
    return [d["image"] for d in (*train, *(val or []))]


class SplitViewsd(MapTransform):
    """``union`` mixing: a sample (or the list of crops of one case) -> original and reconstruction samples.

    Put it after the joint crop and run it on the whole list (``map_items=False``): it returns a flat list
    twice as long, each pair sharing crop and label. ``image_recon`` is dropped from both.
    """

    def __init__(self, image_key: str = "image", recon_key: str = "image_recon"):
        super().__init__([image_key, recon_key])
        self.image_key, self.recon_key = image_key, recon_key

    def __call__(self, data):
        items = data if isinstance(data, list) else [data]
        out = []
        for d in items:
            a = {k: v for k, v in d.items() if k != self.recon_key}
            b = dict(a)
            b[self.image_key] = d[self.recon_key]
            a["view"], b["view"] = "original", "recon"
            out += [a, b]
        return out


class RandReconViewd(Randomizable, MapTransform):
    """``prob`` mixing: replace the image by the reconstruction with probability ``prob`` (per sample)."""

    def __init__(self, prob: float = 0.5, image_key: str = "image", recon_key: str = "image_recon"):
        MapTransform.__init__(self, [image_key, recon_key])
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"recon_prob must be in [0, 1], got {prob}")
        self.prob, self.image_key, self.recon_key = prob, image_key, recon_key

    def randomize(self, data=None) -> None:
        self._use = self.R.rand() < self.prob

    def __call__(self, data):
        if isinstance(data, list):
            return [self(d) for d in data]
        d = dict(data)
        self.randomize()
        if self._use:
            d[self.image_key] = d[self.recon_key]
        d["view"] = "recon" if self._use else "original"
        d.pop(self.recon_key, None)
        return d


class _Passthrough:
    """``recon_mode: none``: samples go on unchanged (a list of crops stays a list)."""

    def __call__(self, data):
        return data


def view_mixer(recon_mode: str = "none", recon_mix: str = "union", recon_prob: float = 0.5):
    """The transform that mixes the two views after the joint crop (run it with ``map_items=False``)."""
    if recon_mode not in RECON_MODES:
        raise ValueError(f"recon_mode must be one of {RECON_MODES}, got {recon_mode!r}")
    if recon_mix not in RECON_MIXES:
        raise ValueError(f"recon_mix must be one of {RECON_MIXES}, got {recon_mix!r}")
    if recon_mode == "none":
        return _Passthrough()
    return SplitViewsd() if recon_mix == "union" else RandReconViewd(recon_prob)


def spacing_from_affine(t) -> list[float]:
    """Voxel spacing (mm) of a MONAI ``MetaTensor`` (its affine; batched affines take the first)."""
    aff = getattr(t, "affine", None)
    if aff is None:
        raise ValueError("the label has no affine: NSD in mm needs MetaTensors (load with LoadImaged)")
    a = torch.as_tensor(aff, dtype=torch.float64)
    if a.ndim == 3:
        a = a[0]
    n = a.shape[0] - 1
    return torch.linalg.norm(a[:n, :n], dim=0).tolist()


class SpacingSurfaceDiceMetric(SurfaceDiceMetric):
    """MONAI's NSD with ``spacing`` taken from each label's affine when not given (tolerances in mm)."""

    def _compute_tensor(self, y_pred, y, **kwargs):
        if kwargs.get("spacing") is None:
            kwargs["spacing"] = spacing_from_affine(y)
        return super()._compute_tensor(y_pred, y, **kwargs)


class SpacingHausdorffMetric(HausdorffDistanceMetric):
    """MONAI's Hausdorff distance (percentile 95 by default) in mm, spacing from each label's affine."""

    def __init__(self, include_background: bool = False, percentile: float = 95.0, **kw):
        super().__init__(include_background=include_background, percentile=percentile, **kw)

    def _compute_tensor(self, y_pred, y, **kwargs):
        if kwargs.get("spacing") is None:
            kwargs["spacing"] = spacing_from_affine(y)
        return super()._compute_tensor(y_pred, y, **kwargs)


def surface_dice_handler(tolerances_mm: Sequence[float], include_background: bool = False,
                         output_transform=None, save_details: bool = True) -> IgniteMetricHandler:
    """Ignite handler: mean NSD over cases and classes, tolerances per class in mm, true voxel spacing."""
    metric = SpacingSurfaceDiceMetric(class_thresholds=list(map(float, tolerances_mm)),
                                      include_background=include_background)
    return IgniteMetricHandler(metric_fn=metric, output_transform=output_transform or from_engine(["pred", "label"]),
                               save_details=save_details)


def hd95_handler(include_background: bool = False, output_transform=None, save_details: bool = True):
    """Ignite handler: 95th-percentile Hausdorff distance in mm."""
    return IgniteMetricHandler(metric_fn=SpacingHausdorffMetric(include_background=include_background),
                               output_transform=output_transform or from_engine(["pred", "label"]),
                               save_details=save_details)


class LossHistory:
    """Ignite handler writing the training loss of every iteration to ``<output_dir>/train_loss.json``."""

    def __init__(self, output_dir: str, loss_transform=None):
        self.path = Path(output_dir) / "train_loss.json"
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.losses: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _iteration(self, engine) -> None:
        self.losses.append(float(self.loss_transform(engine.state.output)))
        if engine.state.iteration % 50 == 0:
            self._write(engine)

    def _write(self, engine=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"loss": self.losses}))
