"""Segmentation with the frozen-VAE reconstruction view (the fvae_aug_seg bundle's logic).

- :func:`build_datalists`: MSD ``dataset.json`` or a plain list (``image``, ``label``, optional
  ``image_recon``) -> train / validation lists; :class:`ReconPathd` attaches the precomputed reconstruction
  (made and cached on first use when missing).
- :class:`SaveNetworkConfig` / :func:`trained_network`: the network sizes travel with ``models/model.pt``.
- :class:`SplitViewsd` (``recon_mix: union``): after the joint crop, each sample becomes two samples,
  the original and the reconstruction, sharing crop and label. :class:`RandReconViewd` (``prob``): the
  reconstruction replaces the original with probability ``recon_prob``.
- :class:`SpacingSurfaceDiceMetric` / :func:`surface_dice_handler`: NSD with the true voxel spacing read
  from each label's affine (MONAI's handler cannot pass ``spacing=``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric
from monai.transforms import MapTransform, Randomizable

from ..datalist import read_datalist, read_json
from ..errors import InputError, OptionError
from ..io import case_name, write_text_atomic
from ..reconstruct import RECON_SUFFIX

__all__ = [
    "build_datalists",
    "split_cases",
    "recon_inputs",
    "ReconPathd",
    "SaveNetworkConfig",
    "trained_network",
    "DEFAULT_NETWORK",
    "SplitViewsd",
    "RandReconViewd",
    "view_mixer",
    "SpacingSurfaceDiceMetric",
    "SpacingHausdorffMetric",
    "surface_dice_handler",
    "hd95_handler",
    "spacing_from_affine",
]

log = logging.getLogger("fvae_ct")
RECON_MODES = ("none", "precomputed", "online")
RECON_MIXES = ("union", "prob")


def check_choice(option: str, value, allowed) -> None:
    """An :class:`OptionError` naming ``option``, ``value`` and the ``allowed`` values unless ``value`` is one."""
    if value not in allowed:
        raise OptionError(f"{option} {value!r}: must be one of {', '.join(map(str, allowed))}")


def _read_datalist(datalist: str, dataset_dir: str | None) -> tuple[list[dict], list[dict] | None]:
    """(training items, the datalist's own validation items or ``None``), absolute paths, by the one datalist reader
    (:func:`fvae_ct.datalist.read_datalist`: a list, or an MSD dict's ``training`` / ``validation``; every item needs
    ``image`` and ``label``). Files are checked later, all at once (``checked_io.check_items``)."""
    kw = {"required_keys": ("image", "label"), "base_dir": dataset_dir, "check_files": False}
    train = read_datalist(datalist, ("training",), **kw)
    data = read_json(datalist, "datalist JSON")  # read_datalist checked it; only: is there a validation list?
    has_val = isinstance(data, dict) and "validation" in data
    return train, (read_datalist(datalist, ("validation",), **kw) if has_val else None)


def split_cases(datalist: str, dataset_dir=None, val_fraction=0.2, test_fraction=0.0, seed=0) -> dict[str, list]:
    """``{"train", "val", "test"}`` items (absolute paths): the one split rule of training, nnU-Net export and
    ablation. The datalist's own ``validation`` list is the validation split when present; the test split is a seeded
    draw of ``test_fraction`` of the other labelled cases (at least one; none at 0); the validation split (if not
    given) a draw of ``val_fraction`` of all (at least one; none at 0 or with a single case); the rest trains."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(f) < 1.0:
            raise OptionError(f"{name} {f!r}: give a fraction of the cases in [0, 1)")
    train, val = _read_datalist(datalist, dataset_dir)
    order = np.random.default_rng(seed).permutation(len(train))
    n_all = len(order) + len(val or [])
    n_test = max(1, round(test_fraction * n_all)) if test_fraction > 0 else 0
    rest = len(order) - n_test
    n_val = 0 if val is not None or val_fraction <= 0 or rest < 2 else max(1, round(val_fraction * n_all))
    if rest - n_val < 1:
        raise OptionError(
            f"val_fraction {val_fraction} / test_fraction {test_fraction}: the {len(order)} labelled case(s) of "
            f"{datalist} cannot give {n_test} test, {n_val} validation and 1 training case; lower them"
        )

    def pick(idx):  # each split keeps the datalist's order
        return [train[i] for i in sorted(idx)]

    test, held = pick(order[:n_test]), pick(order[n_test : n_test + n_val])
    return {"train": pick(order[n_test + n_val :]), "val": held if val is None else val, "test": test}


def build_datalists(
    datalist: str,
    dataset_dir: str | None = None,
    recon_mode: str = "none",
    recon_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...]}`` with ``image`` and ``label`` (an item's own ``image_recon`` is kept for
    ``precomputed``; :class:`ReconPathd` fills in the others, so a plain image/label list such as MONAI Label's
    works too).

    The split is the datalist's ``validation`` list when present, else a seeded shuffle holding out
    ``val_fraction`` of the cases (at least one; none at 0, as for evaluate.yaml's ``eval_datalist``): the same split
    for every arm.
    """
    check_choice("recon_mode", recon_mode, RECON_MODES)
    split = split_cases(datalist, dataset_dir, val_fraction, 0.0, seed)
    train, val = split["train"], split["val"]
    for item in (*train, *val):
        if recon_mode != "precomputed":
            item.pop("image_recon", None)
    return {"train": train, "val": val}


class ReconPathd(MapTransform):
    """``precomputed`` view: ``d[output_key]`` = ``<recon_dir>/<case>_recon.nii.gz`` (the fvae_recon output name)
    unless the item names its own; a missing reconstruction is made once with the frozen VAE and cached there.

    Args:
        keys: the image key (a path, before loading).
        recon_dir: folder of the reconstructions (the bundle's ``prepare`` run fills it for a whole datalist).
        workflow_factory: zero-argument callable returning a :class:`fvae_ct.recon.ReconWorkflow` writing into
            ``recon_dir`` (called only when a reconstruction is missing, so the VAE loads only then); ``None``: a
            missing file is an error naming it and the ``prepare`` run.
    """

    def __init__(self, keys, recon_dir: str, workflow_factory=None, output_key: str = "image_recon"):
        super().__init__(keys)
        self.recon_dir = Path(recon_dir)
        self.workflow_factory = workflow_factory
        self.output_key = output_key
        self._workflow = None

    def path_of(self, image) -> Path:
        """``<recon_dir>/<case>_recon.nii.gz`` of an image path (made or not)."""
        return self.recon_dir / f"{case_name(image)}{RECON_SUFFIX}"

    def __call__(self, data):
        from ..io import Case

        d = dict(data)
        for key in self.key_iterator(d):
            if d.get(self.output_key):
                continue
            name = case_name(d[key])
            path = self.path_of(d[key])
            if not path.is_file():
                if self.workflow_factory is None:
                    raise InputError(
                        path,
                        f"no reconstruction for case {name}: run the bundle's 'prepare' run id "
                        "first (python -m monai.bundle run prepare --config_file configs/train.yaml)",
                    )
                if self._workflow is None:
                    self._workflow = self.workflow_factory()
                log.info(
                    "%s: no reconstruction in %s yet, making it with %s",
                    name,
                    self.recon_dir,
                    self._workflow.network.name,
                )
                self._workflow.run_case(Case(name, str(d[key])))
            d[self.output_key] = str(path)
        return d


class SaveNetworkConfig:
    """Ignite handler for the validator: writes ``<ckpt_dir>/model.json`` (network sizes, class names, intensity
    window, patch size) after each validation, when the best ``model.pt`` is saved beside it, so ``inference.yaml``
    rebuilds the network the saved weights fit without overrides (MONAI Label passes none)."""

    def __init__(self, ckpt_dir: str, config: dict):
        self.path = Path(ckpt_dir) / "model.json"
        self.config = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in config.items()}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(self.path, json.dumps(self.config, indent=1))


#: the bundle's default network and input settings (SegResNet), used when no models/model.json exists; ``network``
#: names the model type (``segresnet`` or ``nnunet``: nnunet_train.yaml writes ``network`` and ``nnunet_fold``)
DEFAULT_NETWORK = {
    "network": "segresnet",
    "nnunet_fold": 0,
    "class_names": ["background", "organ", "lesion"],
    "init_filters": 16,
    "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1],
    "patch_size": [96, 96, 64],
    "intensity_window": [-250, 350],
}


def trained_network(bundle_root: str, defaults: dict | None = None, network: str | None = None) -> dict:
    """:data:`DEFAULT_NETWORK` (or ``defaults``) updated with ``<bundle_root>/models/model.json`` (written with
    ``models/model.pt`` by :class:`SaveNetworkConfig` or nnunet_train.yaml) when present: the model the saved weights
    fit. ``network``: the model type a training config writes; a saved model of another type is refused (training
    would overwrite it)."""
    defaults = DEFAULT_NETWORK if defaults is None else defaults
    p = Path(bundle_root) / "models" / "model.json"
    if not p.is_file():
        return dict(defaults)
    try:
        saved = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(p, f"not valid JSON ({e})") from e
    out = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    if network is not None and out["network"] != network:
        raise InputError(
            p,
            f"this bundle_root holds a trained {out['network']} model, which training a {network} would overwrite: "
            "train into another --bundle_root",
        )
    return out


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
        if not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise OptionError(f"recon_prob {prob!r}: give a probability in [0, 1]")
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
    check_choice("recon_mode", recon_mode, RECON_MODES)
    check_choice("recon_mix", recon_mix, RECON_MIXES)
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


def surface_dice_handler(
    tolerances_mm: Sequence[float], include_background: bool = False, output_transform=None, save_details: bool = True
) -> IgniteMetricHandler:
    """Ignite handler: mean NSD over cases and classes, tolerances per class in mm, true voxel spacing."""
    metric = SpacingSurfaceDiceMetric(
        class_thresholds=list(map(float, tolerances_mm)), include_background=include_background
    )
    return IgniteMetricHandler(
        metric_fn=metric, output_transform=output_transform or from_engine(["pred", "label"]), save_details=save_details
    )


def hd95_handler(include_background: bool = False, output_transform=None, save_details: bool = True):
    """Ignite handler: 95th-percentile Hausdorff distance in mm."""
    return IgniteMetricHandler(
        metric_fn=SpacingHausdorffMetric(include_background=include_background),
        output_transform=output_transform or from_engine(["pred", "label"]),
        save_details=save_details,
    )
