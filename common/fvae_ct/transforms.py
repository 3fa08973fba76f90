"""MONAI dictionary transforms between a CT file and the frozen VAE, each with an exact inverse.

The one place for the HU window. The forward chain (:func:`recon_preprocessing`) is

    LoadCTd -> HUWindowd -> InPlaneResampled -> AxialSlicesd

``[1, X, Y, Z]`` HU on the file's grid -> ``[1, D, H, W]`` in the VAE's ``input_range``, axial slices
first, optionally resampled in-plane to a working spacing. ``Compose.inverse`` walks back: axes to the
file order, the original in-plane grid, HU restored by rounding. Only the voxel array is changed: the
``MetaTensor``'s affine stays that of the input file, so outputs keep the input's spacing, orientation
and affine.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, MapTransform

from .errors import OptionError
from .io import axial_axis, load_ct, spacing_of

__all__ = [
    "DEFAULT_HU_WINDOW",
    "LoadCTd",
    "HUWindowd",
    "InPlaneResampled",
    "AxialSlicesd",
    "recon_preprocessing",
    "hu_to_unit",
    "unit_to_hu",
    "hu_window_of",
    "working_spacing_of",
    "to_slices",
    "from_slices",
]

#: The convention of MAISI, MedVAE, CT-CLIP and the paper's code.
DEFAULT_HU_WINDOW = (-1000.0, 1000.0)


def hu_to_unit(hu, window=DEFAULT_HU_WINDOW):
    """HU clipped to ``window`` and scaled to [0, 1] (the metrics scale). Works on tensors and arrays."""
    lo, hi = float(window[0]), float(window[1])
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(lo, hi) - lo) / (hi - lo)
    return (np.clip(hu, lo, hi) - lo) / (hi - lo)


#: how reconstructed HU become integers: ``round`` (ours: to the nearest) or ``truncate`` (toward zero, the paper's
#: ``astype(int16)``)
HU_ROUNDING = ("round", "truncate")


def _one_of(option: str, value, allowed) -> str:
    """``value`` if it is one of ``allowed``, else an :class:`OptionError` naming ``option``, the value and them."""
    if value not in allowed:
        raise OptionError(f"{option} {value!r}: give one of {', '.join(allowed)}")
    return value


def hu_window_of(window) -> tuple[float, float]:
    """``(low, high)`` HU of a ``hu_window`` option ``[low, high]``, ``low < high``; else an :class:`OptionError`."""
    lo: float | None
    hi: float | None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or hi is None or not lo < hi:
        shown = list(window) if isinstance(window, (list, tuple)) else window
        raise OptionError(f"hu_window {shown!r}: give [low, high] in HU with low < high, e.g. [-1000, 1000]")
    return lo, hi


def working_spacing_of(value) -> float | None:
    """The in-plane ``working_spacing`` option in mm (> 0), ``None`` for none (``None``, ``""``, ``"none"``); else an
    :class:`OptionError`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        mm = float(value)
    except (TypeError, ValueError):
        mm = float("nan")
    if not mm > 0 or mm == float("inf"):
        raise OptionError(f"working_spacing {value!r}: give a positive in-plane spacing in mm, or none")
    return mm


def unit_to_hu(u, window=DEFAULT_HU_WINDOW, rounding: str = "round"):
    """Inverse of :func:`hu_to_unit` on [0, 1], made integer HU by ``rounding`` (values stay float)."""
    _one_of("hu_rounding", rounding, HU_ROUNDING)
    lo, hi = float(window[0]), float(window[1])
    v = u * (hi - lo) + lo
    if isinstance(v, torch.Tensor):
        return torch.round(v) if rounding == "round" else torch.trunc(v)
    return np.round(v) if rounding == "round" else np.trunc(v)


def _meta_like(data: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``data`` as a MetaTensor carrying ``ref``'s meta and applied operations (if ``ref`` has them)."""
    if isinstance(ref, MetaTensor):
        return MetaTensor(torch.as_tensor(data), meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return data


class LoadCTd(MapTransform):
    """Load ``d[key]`` (NIfTI path or DICOM series folder) with :func:`fvae_ct.io.load_ct` (validated)."""

    def __init__(self, keys: KeysCollection, check_hu: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.check_hu = check_hu

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if isinstance(path, (str, bytes, os.PathLike)):  # PathLike: anything with __fspath__
                d[key] = load_ct(os.fsdecode(path) if isinstance(path, bytes) else path, check_hu=self.check_hu)
        return d


class HUWindowd(MapTransform, InvertibleTransform):
    """Clip HU to ``window`` and scale linearly to ``out_range``; the inverse maps back and rounds to integer HU."""

    def __init__(
        self,
        keys: KeysCollection,
        window: Sequence[float] = DEFAULT_HU_WINDOW,
        out_range: Sequence[float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
        rounding: str = "round",
    ):
        super().__init__(keys, allow_missing_keys)
        self.window = hu_window_of(window)
        self.rounding = _one_of("hu_rounding", rounding, HU_ROUNDING)
        self.out_range = (float(out_range[0]), float(out_range[1]))

    def __call__(self, data):
        d = dict(data)
        a, b = self.out_range
        for key in self.key_iterator(d):
            u = hu_to_unit(d[key], self.window)
            d[key] = _meta_like(u * (b - a) + a, d[key])
            self.push_transform(d, key, extra_info={"window": self.window, "out_range": self.out_range})
        return d

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)["extra_info"]
            a, b = info["out_range"]
            u = ((d[key] - a) / (b - a)).clamp(0.0, 1.0)
            d[key] = _meta_like(unit_to_hu(u, info["window"], self.rounding), d[key])
        return d


#: how axial slices are given to the VAE: ``display`` (ours: upright, radiological orientation) or ``file`` (the
#: file's voxel order, as the paper's script does)
SLICE_ORIENTATIONS = ("display", "file")


class AxialSlicesd(MapTransform, InvertibleTransform):
    """``[C, X, Y, Z]`` -> ``[C, D, H, W]``: axial axis first, each slice in radiological display orientation.

    Rows run anterior -> posterior and columns patient right -> left (the orientation of a standard axial
    DICOM image), whatever the file's voxel order. Natural-image autoencoders have seen upright photos:
    presenting slices upright matters (TAEF2 on the 512x512 DICOM series: 39.64 dB upright vs 39.15 dB
    transposed). The axial direction keeps the file's order. Layout only: the affine in the meta is the
    input's, and the inverse restores the file's voxel order exactly.
    """

    def __init__(self, keys: KeysCollection, orientation: str = "display", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.orientation = _one_of("slice_orientation", orientation, SLICE_ORIENTATIONS)

    @staticmethod
    def layout(affine, orientation: str = "display") -> tuple[list[int], list[int]]:
        """(permutation of [C, X, Y, Z], dims of the permuted array to flip) for ``affine``; ``orientation``
        ``file``: the axial axis first, the in-plane axes in the file's voxel order, nothing flipped."""
        if orientation == "file":
            ax = axial_axis(affine)
            return [0, 1 + ax] + [1 + i for i in range(3) if i != ax], []
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
        world = {int(w): i for i, (w, _) in enumerate(ornt) if not np.isnan(w)}
        if sorted(world) != [0, 1, 2]:  # degenerate affine: axial axis first, file order otherwise
            ax = axial_axis(affine)
            return [0, 1 + ax] + [1 + i for i in range(3) if i != ax], []
        perm = [0, 1 + world[2], 1 + world[1], 1 + world[0]]
        flips = [dim for dim, w in ((2, 1), (3, 0)) if ornt[world[w], 1] > 0]  # RAS+ -> A..P rows, R..L cols
        return perm, flips

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            perm, flips = self.layout(d[key].affine, self.orientation)
            v = d[key].permute(*perm)
            d[key] = _meta_like((v.flip(flips) if flips else v).contiguous(), d[key])
            self.push_transform(d, key, extra_info={"perm": perm, "flips": flips})
        return d

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)["extra_info"]
            v = d[key].flip(info["flips"]) if info["flips"] else d[key]
            d[key] = _meta_like(v.permute(*np.argsort(info["perm"])).contiguous(), d[key])
        return d


class InPlaneResampled(MapTransform, InvertibleTransform):
    """Resample ``[C, X, Y, Z]`` in-plane to ``working_spacing`` mm (``None``: no-op); the inverse resamples back.

    Natural-image autoencoders reconstruct ~1 mm pixels much better than 1.5-3 mm ones. Downsampling
    uses area averaging (anti-aliased), upsampling bilinear; the axial axis is never resampled. The
    affine in the meta stays that of the original grid (the working grid is internal).
    """

    def __init__(self, keys: KeysCollection, working_spacing: float | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.working_spacing = working_spacing_of(working_spacing)

    @staticmethod
    def _resize(x: torch.Tensor, ax: int, size: Sequence[int]) -> torch.Tensor:
        """Resize the two non-axial axes of ``x: [C, X, Y, Z]`` to ``size``."""
        perm = [0, 1 + ax] + [1 + i for i in range(3) if i != ax]
        v = torch.as_tensor(x).permute(*perm)  # [C, D, a, b]
        mode = "area" if size[0] <= v.shape[2] and size[1] <= v.shape[3] else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        v = F.interpolate(v.transpose(0, 1), size=tuple(size), mode=mode, **kw).transpose(0, 1)
        return v.permute(*np.argsort(perm)).contiguous()

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            ax = axial_axis(x.affine)
            inplane = [i for i in range(3) if i != ax]
            orig = [int(x.shape[1 + i]) for i in inplane]
            if self.working_spacing is None:
                size = orig
            else:
                sp = spacing_of(x.affine)
                size = [max(1, int(round(n * sp[i] / self.working_spacing))) for n, i in zip(orig, inplane)]
            if size != orig:
                d[key] = _meta_like(self._resize(x, ax, size), x)
            self.push_transform(d, key, extra_info={"axial": ax, "orig": orig, "size": size})
        return d

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)["extra_info"]
            if list(info["size"]) != list(info["orig"]):
                d[key] = _meta_like(self._resize(d[key], info["axial"], info["orig"]), d[key])
        return d


def to_slices(vol: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray]:
    """``vol [X, Y, Z]`` (file order) -> ``([D, H, W]`` upright axial slices as given to the VAE, spacing in mm
    in that order). Same layout as :class:`AxialSlicesd`; a contiguous copy."""
    perm, flips = AxialSlicesd.layout(affine)
    perm = [p - 1 for p in perm[1:]]
    v = np.transpose(np.asarray(vol), perm)
    for dim in flips:
        v = np.flip(v, dim - 1)
    return np.ascontiguousarray(v), spacing_of(affine)[perm]


def from_slices(vol: np.ndarray, affine) -> np.ndarray:
    """Inverse of :func:`to_slices`: ``[D, H, W]`` slice layout back to the file's ``[X, Y, Z]`` voxel order."""
    perm, flips = AxialSlicesd.layout(affine)
    v = np.asarray(vol)
    for dim in flips:
        v = np.flip(v, dim - 1)
    return np.ascontiguousarray(np.transpose(v, np.argsort([p - 1 for p in perm[1:]])))


def recon_preprocessing(
    keys: KeysCollection = "image",
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    input_range: Sequence[float] = (0.0, 1.0),
    working_spacing: float | None = None,
    check_hu: bool = True,
    slice_orientation: str = "display",
    hu_rounding: str = "round",
) -> Compose:
    """File path -> ``[1, D, H, W]`` in the VAE's input range (see the module docstring); invertible.
    ``slice_orientation`` / ``hu_rounding``: see :data:`SLICE_ORIENTATIONS` / :data:`HU_ROUNDING`."""
    return Compose(
        [
            LoadCTd(keys, check_hu=check_hu),
            HUWindowd(keys, window=hu_window, out_range=input_range, rounding=hu_rounding),
            InPlaneResampled(keys, working_spacing=working_spacing),
            AxialSlicesd(keys, orientation=slice_orientation),
        ]
    )
