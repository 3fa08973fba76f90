"""Generation metrics that run offline: FVD (see :mod:`.fvd`), mask adherence, organ HU, report alignment.

- :func:`mask_adherence`: segment a generated volume (any callable ``path -> label map``, e.g.
  :class:`BundleSegmenter` on our fvae_aug_seg bundle or any MONAI bundle) and score it against the
  conditioning mask: Dice and NSD (mm, true spacing) per class.
- :func:`organ_median_hu`: median HU per organ (the sanity check MAISI uses), generated vs. real.
- :class:`ImageTextScorer` / :class:`CTClipScorer`: image-text agreement. CT-CLIP is not re-implemented
  (its weights live in the CT-RATE dataset on Hugging Face, ``models/CT-CLIP-Related/CT-CLIP_v2.pt``); the
  adapter imports the user's local clone and feeds it the CT-CLIP preprocessing (:func:`ctclip_preprocess`).
- :func:`disease_auc`: per-class ROC AUC of any classifier's probabilities (MONAI ``compute_roc_auc``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice, compute_roc_auc, compute_surface_dice

from ..errors import InputError

__all__ = [
    "mask_adherence",
    "organ_median_hu",
    "BundleSegmenter",
    "ImageTextScorer",
    "CTClipScorer",
    "ctclip_preprocess",
    "disease_auc",
]


def _onehot(lab: np.ndarray, classes: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(lab) == c) for c in classes]).float()[None]


def mask_adherence(
    labels_pred: np.ndarray,
    mask: np.ndarray,
    spacing,
    classes: Sequence[int],
    tolerance_mm: float | Sequence[float] = 2.0,
) -> dict[str, float]:
    """Dice and NSD per class of a segmentation of the generated volume against its conditioning mask."""
    tol = [float(tolerance_mm)] * len(classes) if np.isscalar(tolerance_mm) else list(map(float, tolerance_mm))
    p, m = _onehot(labels_pred, classes), _onehot(mask, classes)
    dice = compute_dice(p, m, include_background=True, ignore_empty=False)[0]
    nsd = compute_surface_dice(
        p, m, class_thresholds=tol, include_background=True, spacing=[float(s) for s in spacing]
    )[0]
    out = {}
    for i, c in enumerate(classes):
        out[f"dice_{c}"], out[f"nsd_{c}"] = float(dice[i]), float(nsd[i])
    out["dice_mean"], out["nsd_mean"] = float(np.nanmean(dice.numpy())), float(np.nanmean(nsd.numpy()))
    return out


def organ_median_hu(hu: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Median HU inside each class (NaN where the class is absent)."""
    return {int(c): float(np.median(hu[labels == c])) if (labels == c).any() else float("nan") for c in classes}


class BundleSegmenter:
    """``segmenter(image_path) -> label map`` (on the image grid) through a MONAI bundle's inference config.

    Defaults fit the fvae_aug_seg bundle (``--input``, ``--output_dir``, output ``<name>_seg.nii.gz``);
    ``overrides`` go to the config (network size, patch size ...). The workflow is built, and its weights loaded,
    once: the first volume runs the config's ``run``, every later one only its ``evaluator`` with the ``dataset``'s
    data (a MONAI ``Dataset``, the bundle's ``dataset`` property) set to ``[{"image": path}]`` and the evaluator's
    ``CheckpointLoader`` handlers detached (the weights are in the network already). :meth:`close` finalizes it.
    """

    def __init__(
        self,
        bundle_root: str,
        config: str = "configs/inference.yaml",
        output_dir: str | None = None,
        overrides: dict | None = None,
        output_postfix: str = "seg",
    ):
        self.root = Path(bundle_root)
        self.config = self.root / config if not Path(config).is_absolute() else Path(config)
        if not self.config.is_file():
            raise InputError(self.config, "segmenter: no inference config in the segmentation bundle")
        self.output_dir = Path(output_dir or self.root / "adherence")
        self.overrides = overrides or {}
        self.postfix = output_postfix
        self._wf = None

    def _build(self, image: str):
        """The bundle's inference workflow for ``image``, run once (loads the weights), then ready for other images."""
        from ignite.engine import Events
        from monai.bundle import ConfigWorkflow
        from monai.handlers import CheckpointLoader

        wf = ConfigWorkflow(
            config_file=str(self.config),
            workflow_type="infer",
            bundle_root=str(self.root),
            input=str(image),
            output_dir=str(self.output_dir),
            logging_file=False,
            **self.overrides,
        )
        wf.initialize()
        wf.run()
        evaluator = wf.evaluator
        # the bundle's handlers, and what the engine runs at its start (ignite lists no handlers publicly)
        started = [h for h, *_ in getattr(evaluator, "_event_handlers", {}).get(Events.STARTED, [])]
        for h in [*(wf.handlers or []), *started]:
            if isinstance(h, CheckpointLoader) and evaluator.has_event_handler(h, Events.STARTED):
                evaluator.remove_event_handler(h, Events.STARTED)
        return wf

    def __call__(self, image: str) -> np.ndarray:
        if self._wf is None:
            self._wf = self._build(image)
        else:
            try:
                self._wf.dataset.data = [{"image": str(image)}]
                self._wf.evaluator.run()
            except Exception:
                self._wf = None  # a failed run leaves the engine mid-epoch: the next volume builds it again
                raise
        name = Path(image).name.split(".nii")[0]
        return np.asarray(nib.load(str(self.output_dir / f"{name}_{self.postfix}.nii.gz")).dataobj)

    def close(self) -> None:
        """Finalize the bundle's workflow (if one was built); the next call builds it again."""
        if self._wf is not None:
            wf, self._wf = self._wf, None
            wf.finalize()

    def __enter__(self) -> BundleSegmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageTextScorer:
    """Interface: ``score(hu [X, Y, Z], affine, text) -> float`` (higher = better agreement)."""

    def score(self, hu: np.ndarray, affine: np.ndarray, text: str) -> float:  # pragma: no cover - interface
        raise NotImplementedError


def ctclip_preprocess(hu: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """CT-CLIP's input: HU clipped to +-1000 and divided by 1000, resampled to 0.75 x 0.75 x 1.5 mm, then
    centre-cropped / padded to 480 x 480 x 240; returns ``[1, 1, 480, 480, 240]`` (RAS voxel order)."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

    x = MetaTensor(
        torch.as_tensor(np.clip(np.asarray(hu, np.float32), -1000, 1000) / 1000.0)[None], affine=torch.as_tensor(affine)
    )
    x = Orientation(axcodes="RAS")(x)
    x = Spacing(pixdim=(0.75, 0.75, 1.5), mode="bilinear")(x)
    x = ResizeWithPadOrCrop((480, 480, 240), value=-1.0)(x)
    return x.as_tensor()[None]


class CTClipScorer(ImageTextScorer):
    """CT-CLIP image-text similarity through the user's local clone of the official repository.

    ``repo``: folder of the CT-CLIP code (its packages become importable); ``factory``: dotted path of a
    callable (in that code or yours) returning a model with ``encode_image(x)`` and ``encode_text(list)``
    given ``weights`` (e.g. ``CT-CLIP_v2.pt`` from the CT-RATE dataset). Score = cosine similarity.
    """

    def __init__(self, repo: str, weights: str, factory: str, device: str = "cpu", **kwargs):
        if not Path(repo).is_dir():
            raise InputError(repo, "CT-CLIP code not found; clone the official repository and give its path")
        if not Path(weights).is_file():
            raise InputError(weights, "CT-CLIP weights not found (CT-RATE: models/CT-CLIP-Related/CT-CLIP_v2.pt)")
        sys.path.insert(0, str(repo))
        module, _, name = factory.rpartition(".")
        self.model = getattr(importlib.import_module(module), name)(weights=weights, **kwargs).to(device).eval()
        self.device = device

    @torch.no_grad()
    def score(self, hu, affine, text) -> float:
        img = self.model.encode_image(ctclip_preprocess(hu, affine).to(self.device))
        txt = self.model.encode_text([text])
        return float(torch.nn.functional.cosine_similarity(img.flatten(1), txt.flatten(1)).item())


def disease_auc(probs, labels, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-class ROC AUC of probabilities ``[N, K]`` against binary labels ``[N, K]``, and their mean."""
    p, y = torch.as_tensor(np.asarray(probs, np.float32)), torch.as_tensor(np.asarray(labels, np.float32))
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"probs and labels must both be [N, K], got {tuple(p.shape)} and {tuple(y.shape)}")
    names = list(names) if names is not None else [f"class{k}" for k in range(p.shape[1])]
    aucs = compute_roc_auc(p, y, average="none")
    out = {n: float(a) for n, a in zip(names, np.atleast_1d(aucs))}
    out["mean"] = float(np.nanmean(list(out.values())))
    return out
