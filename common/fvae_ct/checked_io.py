"""Bad input ends in one line naming the file and the problem, on every bundle's every route.

- :class:`CheckedLoadImaged`: MONAI's ``LoadImaged`` (a subclass, so MONAI Label still recognises and wraps it) whose
  failures are :class:`~fvae_ct.errors.InputError` naming the file: missing or unreadable file, not one 3D volume,
  NaN/Inf voxels, a label map that is not integer or lies on another grid than its image.
- :func:`check_items`: the same checks over every item of a datalist before a route starts (training, evaluation,
  segmentation inference, the generation evaluation), so that nothing is lost mid-run: one bad case is its
  ``InputError``; several are a :class:`~fvae_ct.errors.BatchFailure` listing each on one line.
- :func:`read_json`, :func:`image_datalist`: datalists and stats files read (condition masks: :func:`fvae_ct.io.read_labels`)
  with the same errors.
- :func:`install_one_line_errors`: under ``python -m monai.bundle run`` (installed by
  :func:`fvae_ct.bundle.check_command_line`, the first step of every bundle's ``run``), an fvae-ct error (or a
  missing file) behind the exception MONAI raises is printed as one line instead of the traceback; any other
  exception (a bug) keeps its traceback, and ``FVAE_TRACEBACK=1`` keeps it for all.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImaged

from .datalist import read_json  # also fvae_ct.checked_io.read_json, as the ldm configs call it
from .errors import BatchFailure, InputError, user_error

__all__ = [
    "CheckedLoadImaged",
    "check_items",
    "read_checkpoint",
    "read_json",
    "image_datalist",
    "install_one_line_errors",
]

log = logging.getLogger("fvae_ct")

IMAGE_KEYS = ("image", "image_recon")
LABEL_KEYS = ("label",)


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike))


def _read_error(path: str, e: Exception) -> InputError:
    """The one-line error of a file MONAI's readers could not read (the NIfTI reader's own error, not the list of
    every reader's traceback that ``LoadImage`` raises)."""
    from .io import _reader_error

    cause = e
    if str(path).lower().endswith((".nii", ".nii.gz")):
        cause = _reader_error("NibabelReader", Path(path)) or e
    msg = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    return InputError(path, f"cannot read the image, truncated or corrupt file? ({msg})")


def _spatial_shape(img) -> tuple[tuple[int, ...], int]:
    """(spatial shape, channels) of a loaded volume (with or without a channel dimension)."""
    meta = getattr(img, "meta", {}) or {}
    spatial = meta.get("spatial_shape")
    spatial = tuple(int(s) for s in (np.asarray(spatial).ravel() if spatial is not None else img.shape))
    n = int(np.prod(spatial)) if spatial else 0
    return spatial, (int(np.prod(img.shape)) // n if n else 0)


def check_volume(img, path, label: bool = False) -> None:
    """The checks of :func:`fvae_ct.io.load_ct` on a volume loaded by ``LoadImage``: one 3D volume, not empty,
    finite; a label map: integer values."""
    what = "label map" if label else "image"
    spatial, channels = _spatial_shape(img)
    full = tuple(int(s) for s in img.shape)
    if len(spatial) < 3:
        raise InputError(path, f"a {len(spatial)}D {what} of shape {full}: a 3D volume is needed")
    if len(spatial) > 3 or channels != 1:
        raise InputError(path, f"a 4D {what} of shape {full} (time points or channels): give one 3D volume")
    if min(spatial) < 1:
        raise InputError(path, f"empty {what} of shape {full}")
    a = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
    if np.issubdtype(a.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise InputError(path, f"{bad} NaN/Inf voxels in the {what}; fix or mask them")
        if label and not np.array_equal(a, np.round(a)):
            raise InputError(path, "label map holds non-integer values")


def _affine(img) -> np.ndarray:
    return np.asarray(torch.as_tensor(img.affine, dtype=torch.float64))


def check_same_grid(label, label_path, image, image_path, rtol: float = 1e-4, atol_mm: float = 1e-3) -> None:
    """A label map must lie on its image's voxel grid (same shape, same affine): else an :class:`InputError` naming
    the label map and both grids."""
    ls, _ = _spatial_shape(label)
    ims, _ = _spatial_shape(image)
    la, ia = _affine(label), _affine(image)
    if ls != ims or not np.allclose(la, ia, rtol=rtol, atol=atol_mm):
        what = f"shape {ls} vs {ims}" if ls != ims else "affines differ by up to %.3g" % float(np.abs(la - ia).max())
        raise InputError(
            label_path,
            f"label map on another grid than its image {image_path} ({what}): resample it onto the image's grid",
        )


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` whose failures are one-line :class:`InputError` s naming the file.

    Args:
        keys: the keys to load (images and label maps), as for ``LoadImaged``.
        label_keys: which of ``keys`` are label maps (integer values; on the grid of the first loaded image key).
        check_grid: label maps must lie on that image's grid (shape and affine).
        kwargs: ``LoadImaged``'s (``ensure_channel_first``, ``image_only``, ``dtype``, ...).
    """

    def __init__(self, keys, label_keys: Sequence[str] = LABEL_KEYS, check_grid: bool = True, **kwargs):
        super().__init__(keys, **kwargs)
        self.label_keys = set([label_keys] if isinstance(label_keys, str) else label_keys)
        self.check_grid = check_grid

    def __call__(self, data, reader=None):
        d = dict(data)
        paths = {k: str(d[k]) for k in self.key_iterator(d) if _is_path(d[k])}
        for k, p in paths.items():
            if not os.path.exists(p):
                what = "label map" if k in self.label_keys else "file or folder"
                raise InputError(p, f"{what} does not exist")
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            try:
                out = self._loader(d[key], reader)
            except Exception as e:  # noqa: BLE001 - every reader failed: the file's own error, one line
                if key not in paths:
                    raise
                raise _read_error(paths[key], e) from e
            if self._loader.image_only:
                d[key] = out
            else:  # MONAI Label: (image, metadata)
                d[key] = out[0]
                d[meta_key or f"{key}_{meta_key_postfix}"] = out[1]
        ref = next((k for k in paths if k not in self.label_keys), None)
        for k, p in paths.items():
            check_volume(d[k], p, label=k in self.label_keys)
            if self.check_grid and ref is not None and k in self.label_keys:
                check_same_grid(d[k], p, d[ref], paths[ref])
        return d


def _failure(errors: list[InputError], n: int, what: str) -> Exception:
    if len(errors) == 1:
        return errors[0]
    lines = "\n".join(f"  {e}" for e in errors)
    return BatchFailure(f"{len(errors)} of {n} case(s) have unusable input ({what}):\n{lines}")


def check_items(
    items: Sequence[dict],
    image_keys: Sequence[str] = IMAGE_KEYS,
    label_keys: Sequence[str] = LABEL_KEYS,
    same_grid: bool = True,
    what: str = "nothing was run",
) -> list[dict]:
    """Load every file of every datalist item once (:class:`CheckedLoadImaged`) before a route starts; returns
    ``items``.

    ``same_grid``: label maps must lie on their image's grid (segmentation training and evaluation); else they need
    only overlap it (:func:`fvae_ct.io.load_labels` resamples them). Every bad case is reported: one is raised as its
    :class:`InputError`, several as a :class:`BatchFailure` listing one line each.
    """
    from .io import load_labels

    items = list(items)
    errors: list[InputError] = []
    for it in items:
        if not isinstance(it, dict):
            it = {"image": it}
        keys = [k for k in (*image_keys, *label_keys) if _is_path(it.get(k))]
        try:
            loader = CheckedLoadImaged(keys, label_keys=label_keys, check_grid=same_grid, image_only=True)
            d = loader({k: it[k] for k in keys})
            img_key = next((k for k in keys if k not in label_keys), None)
            if not same_grid and img_key is not None:
                img = d[img_key]
                for k in keys:
                    if k in label_keys:
                        load_labels(it[k], _affine(img), _spatial_shape(img)[0])
        except InputError as e:
            log.error("%s", e)
            errors.append(e)
    if errors:
        raise _failure(errors, len(items), what)
    return items


def read_checkpoint(path, what: str = "checkpoint", map_location="cpu") -> dict:
    """A ``torch.save`` checkpoint read with ``weights_only``; a missing or unreadable one is an :class:`InputError`
    naming it (``what``: what writes it, for the message)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(p, f"{what} does not exist")
    try:
        return torch.load(str(p), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch / pickle / zip errors of a truncated or foreign file
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise InputError(p, f"cannot read the {what}, truncated or not a checkpoint? ({msg})") from e


def image_datalist(input_path) -> list[dict]:
    """``[{"image": path}]`` of a NIfTI file, a DICOM series folder, a folder of those, or a datalist JSON (what
    :func:`fvae_ct.cases.discover_cases` accepts: the inputs of the recon route; a JSON is read by
    :func:`fvae_ct.datalist.read_datalist`, sections :data:`~fvae_ct.datalist.CASE_SECTIONS`, with its errors)."""
    from .cases import discover_cases

    return [{"image": c.path} for c in discover_cases(input_path)]


def install_one_line_errors(prog: str = "fvae-ct") -> None:
    """Print an fvae-ct error (or a missing file) behind an uncaught exception as one line ``<prog>: <Error>:
    <file>: <problem>`` on stderr, without the traceback (exit status 1 as before). Other exceptions, and all with
    ``FVAE_TRACEBACK=1``, keep Python's traceback."""
    previous = sys.excepthook
    if getattr(previous, "_fvae_one_line", False):
        return

    def hook(tp, value, tb):
        cause = user_error(value) if isinstance(value, Exception) else None
        if cause is None or os.environ.get("FVAE_TRACEBACK", "").strip() not in ("", "0"):
            return previous(tp, value, tb)
        sys.stderr.flush()
        print(f"{prog}: {type(cause).__name__}: {cause}", file=sys.stderr, flush=True)

    hook.__dict__["_fvae_one_line"] = True
    sys.excepthook = hook
