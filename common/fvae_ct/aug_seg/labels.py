"""Label ids of the fvae_aug_seg bundle's training data: a check against the bundle's classes and an optional mapping.

A label map with other ids (e.g. a TotalSegmentator multi-organ map, ids up to 117) would otherwise fail deep in
training (``index 100 is out of bounds for dimension 1 with size 3`` in the one-hot loss). ``label_map`` (config key,
also a MONAI Label train option) maps source ids to the bundle's classes, e.g. ``{"5": 1, "6": 2}``; ids it does not
list become 0 (background).

- :func:`parse_label_map`: the setting (a dict or a JSON string, never evaluated as code) -> ``{int: int}`` or None.
- :class:`MapLabelsd`: transform after ``LoadImaged``: applies the mapping, then refuses ids outside the classes
  with an :class:`~fvae_ct.errors.InputError` naming the file.
- :func:`check_label_files`: the same check over every label file of the training and validation lists, before
  training starts (one line naming the file, the ids found and the classes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from ..errors import InputError, OptionError

__all__ = ["parse_label_map", "apply_label_map", "label_problem", "MapLabelsd", "check_label_files"]

log = logging.getLogger("fvae_ct")


def parse_label_map(value, class_names: Sequence[str] | None = None) -> dict[int, int] | None:
    """``label_map`` setting -> ``{source id: bundle class}``; None (no mapping) for None, ``""``, ``"{}"`` or ``{}``.

    ``value``: a mapping or a JSON object string (``'{"5": 1, "6": 2}'``), parsed with :func:`json.loads` only.
    Keys and values must be non-negative integers (or their strings); values must be classes of ``class_names``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise OptionError(f'label_map {value!r} is not a JSON object like \'{{"5": 1, "6": 2}}\' ({e})') from e
    if not isinstance(value, Mapping):
        raise OptionError(f'label_map must map source label ids to classes, like {{"5": 1}}, got {value!r}')
    out = {}
    for k, v in value.items():
        try:
            src, dst = int(str(k).strip()), int(str(v).strip())
        except ValueError:
            raise OptionError(f"label_map entry {k!r}: {v!r}: source ids and classes must be integers") from None
        if src < 0 or dst < 0:
            raise OptionError(f"label_map entry {k!r}: {v!r}: ids must be non-negative")
        if class_names is not None and dst >= len(class_names):
            raise OptionError(
                f"label_map entry {k!r}: {v!r}: class {dst} is not one of the bundle's classes {_classes(class_names)}"
            )
        out[src] = dst
    return out or None


def _classes(class_names: Sequence[str]) -> str:
    return "{" + ", ".join(f"{i}: {n}" for i, n in enumerate(class_names)) + "}"


def apply_label_map(label, label_map: Mapping[int, int] | None):
    """Label ids mapped by ``label_map`` (ids not listed -> 0); the input unchanged when there is no mapping."""
    if not label_map:
        return label
    is_torch = isinstance(label, torch.Tensor)
    out = torch.zeros_like(label) if is_torch else np.zeros_like(label)
    for src, dst in label_map.items():
        if dst:
            out[label == src] = dst
    return out


def label_problem(ids, class_names: Sequence[str], label_map: Mapping[int, int] | None = None) -> str | None:
    """The one-line problem of label ids ``ids`` (after any mapping) for the classes, or None when they fit."""
    found = sorted({int(i) for i in ids})
    bad = [i for i in found if i < 0 or i >= len(class_names)]
    if not bad:
        return None
    shown = found if len(found) <= 20 else found[:20] + ["..."]
    how = "the label_map setting leaves them" if label_map else "set label_map (source id -> class, e.g. '{\"5\": 1}')"
    return (
        f"label ids {shown} found, {bad[:10]}{'...' if len(bad) > 10 else ''} outside the bundle's classes "
        f"{_classes(class_names)}: {how}"
    )


def _unique(label) -> list:
    t = label if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label))
    u = torch.unique(t.detach().cpu() if isinstance(t, torch.Tensor) else t)
    if u.is_floating_point() and not torch.equal(u, torch.round(u)):
        return u.tolist()  # non-integer values: reported as they are
    return [int(x) for x in u.tolist()]


class MapLabelsd(MapTransform):
    """After ``LoadImaged``: map the label ids (``label_map``), then refuse ids outside ``class_names`` with an
    :class:`~fvae_ct.errors.InputError` naming the label file."""

    def __init__(self, keys, class_names: Sequence[str], label_map=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.class_names = list(class_names)
        self.label_map = parse_label_map(label_map, self.class_names)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = apply_label_map(d[key], self.label_map)
            problem = label_problem(_unique(lab), self.class_names, self.label_map)
            if problem:
                meta = getattr(d[key], "meta", {}) or {}
                raise InputError(meta.get("filename_or_obj", key), problem)
            d[key] = lab
        return d


def check_label_files(items: Sequence[Mapping] | None, class_names: Sequence[str], label_map=None, key="label") -> int:
    """Read every ``item[key]`` label file of ``items`` (training + validation lists) and refuse, before training,
    the first with ids outside ``class_names`` after ``label_map``. Returns the number of files checked."""
    import nibabel as nib

    mapping = parse_label_map(label_map, class_names)
    paths = list(dict.fromkeys(str(d[key]) for d in (items or []) if isinstance(d, Mapping) and d.get(key)))
    for p in paths:
        try:
            data = np.asanyarray(nib.load(p).dataobj)
        except Exception as e:  # not a file nibabel reads (e.g. NRRD): MapLabelsd checks it when it is loaded
            log.info("%s: label ids checked when loaded (%s: %s)", p, type(e).__name__, e)
            continue
        problem = label_problem(_unique(apply_label_map(data, mapping)), class_names, mapping)
        if problem:
            raise InputError(p, problem)
    if mapping:
        log.info(
            "label_map %s: other ids become 0 (background); %d label files checked",
            json.dumps({str(k): v for k, v in mapping.items()}),
            len(paths),
        )
    return len(paths)
