"""Any VAE with encode/decode behind the frozen-VAE interface, imported from the user's code.

For models whose licence forbids re-implementation (VideoVAE+: CC BY-NC-ND) or that live in research
repositories (WF-VAE, CV-VAE): give the dotted path of the class or factory (``target``), its keyword
arguments, and optionally a local clone (``repo``) that is put on ``sys.path``. Nothing is copied.

The wrapped model sees ``[B, 3, T, H, W]`` clips (``layout="video"``, depth = time) or ``[N, 3, H, W]`` slices
(``layout="image"``) in ``input_range``. ``encode`` may return a tensor, a tuple (first item), a diffusers
output with ``latent_dist`` (its mode is taken), or a distribution with ``mode()``/``mean``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from ..errors import OptionError, WeightsError
from ..tiling import TilingConfig
from .base import FrozenVAE

__all__ = ["ExternalVAE", "import_target"]


def import_target(target: str, repo: str | None = None):
    """The object at dotted path ``target`` (``package.module.Name``), with ``repo`` on ``sys.path``."""
    if repo is not None:
        if not Path(repo).is_dir():
            raise WeightsError(f"{repo}: the local clone of the model's repository does not exist")
        if str(repo) not in sys.path:
            sys.path.insert(0, str(repo))
    module, _, name = str(target).rpartition(".")
    if not module:
        raise WeightsError(f"target must be a dotted path 'package.module.Name', got {target!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        where = f" (searched {repo} and the installed packages)" if repo else ""
        raise WeightsError(f"cannot import {target}{where}: {type(e).__name__}: {e}") from e


def _latent(out) -> torch.Tensor:
    """The tensor inside a model's output (tensor, tuple, diffusers output, or a distribution: its mode)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "latent_dist"):
        out = out.latent_dist
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out
    if callable(getattr(out, "mode", None)):
        return out.mode()
    for attr in ("mean", "sample"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    raise WeightsError(f"cannot find a tensor in the model's output of type {type(out).__name__}")


def _positive_int(option: str, value) -> int:
    """``value`` as a positive integer, else an :class:`OptionError` naming ``option``."""
    try:
        n = int(value)
        ok = not isinstance(value, bool) and float(value) == n and n >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OptionError(f"{option} {value!r}: give a positive whole number")
    return n


def _value_range(value) -> tuple[float, float]:
    """The ``input_range`` option ``[low, high]``, ``low < high``, else an :class:`OptionError`."""
    lo: float | None
    hi: float | None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or hi is None or not lo < hi:
        raise OptionError(f"input_range {value!r}: give [low, high] with low < high, e.g. [-1, 1]")
    return lo, hi


class ExternalVAE(FrozenVAE):
    """A user-provided VAE class (dotted path + kwargs), frozen, behind :class:`FrozenVAE`."""

    def __init__(
        self,
        target: str,
        kwargs: dict | None = None,
        repo: str | None = None,
        name: str = "external",
        layout: str = "video",
        latent_channels: int = 4,
        spatial_factor: int = 8,
        depth_factor: int = 4,
        input_range=(-1.0, 1.0),
        encode_fn: str = "encode",
        decode_fn: str = "decode",
        tiling: TilingConfig | None = None,
        scale_factor: float = 1.0,
    ):
        super().__init__(tiling=tiling, scale_factor=scale_factor)
        if layout not in ("video", "image"):
            raise OptionError(f"layout {layout!r}: give 'video' (clips, depth = time) or 'image' (single slices)")
        sizes = {
            k: _positive_int(k, v)
            for k, v in (
                ("latent_channels", latent_channels),
                ("spatial_factor", spatial_factor),
                ("depth_factor", depth_factor),
            )
        }
        input_range = _value_range(input_range)
        factory = import_target(target, repo)
        self.model = factory(**(kwargs or {}))
        if not hasattr(self.model, encode_fn) or not hasattr(self.model, decode_fn):
            raise WeightsError(f"{target} has no {encode_fn}/{decode_fn} methods")
        self.name, self.layout = name, layout
        self.latent_channels, self.spatial_factor = sizes["latent_channels"], sizes["spatial_factor"]
        self.depth_factor = 1 if layout == "image" else sizes["depth_factor"]
        self.input_range = input_range
        self._enc, self._dec = getattr(self.model, encode_fn), getattr(self.model, decode_fn)
        if isinstance(self.model, torch.nn.Module):
            self.freeze()

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x.expand(-1, 3, -1, -1, -1)
        if self.layout == "video":
            return _latent(self._enc(rgb)).float()
        b, c, d, h, w = rgb.shape
        z = _latent(self._enc(rgb.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))).float()
        return z.reshape(b, d, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        if self.layout == "video":
            return _latent(self._dec(z)).float().mean(1, keepdim=True)
        b, c, d, h, w = z.shape
        y = _latent(self._dec(z.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))).float()
        return y.reshape(b, d, *y.shape[1:]).permute(0, 2, 1, 3, 4).mean(1, keepdim=True)
