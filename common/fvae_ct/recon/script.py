"""The float32 arithmetic of the paper's Wan reconstruction scripts (``arithmetic: script``, set by configs/paper.yaml).

qic999/Foundation-VAE ``Reconstruction/Wan/recon_ct_window_wan2.1.py`` (and ``_wan2.2.py``, the same steps) with the
official Wan VAE wrapper (``wan/modules/vae2_1.py``: ``scale = [mean, 1.0 / std]``) compute, per voxel ``h`` (HU) and
decoded value ``y``:

- input: ``np.clip(h, -1000, 1000) / 1000.0`` in float64, then ``.float()`` (ours: ``(h - lo) / (hi - lo) * 2 - 1`` in
  float32, which differs from it in the last bit for about half of the integer HU values);
- latent: ``(mu - mean) * (1 / std)`` to encode and ``z / (1 / std) + mean`` to decode (ours: ``(mu - mean) / std``
  and ``z * std + mean``);
- output: ``clamp(y, -1, 1) * 1000`` then ``astype(int16)``, truncation toward zero (ours: ``clamp((y + 1) / 2, 0, 1)
  * 2000 - 1000``, then the ``hu_rounding``).

The same numbers in exact arithmetic, not in float32: after truncation a few voxels per million differ by 1 HU. This
module gives the recon workflow the script's order of operations, so the paper preset can be checked voxel for voxel.
"""

from __future__ import annotations

import types

import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from ..errors import OptionError
from ..transforms import HU_ROUNDING
from ..vae import load
from ..vae.base import FrozenVAE

__all__ = ["ARITHMETICS", "SCRIPT_WINDOW", "ScriptHUScaled", "check_arithmetic", "script_latents", "load_vae"]

#: ``ours`` (the project's window scaling and latent normalisation) or ``script`` (the paper's Wan scripts)
ARITHMETICS = ("ours", "script")
#: the HU window and the VAE input range the scripts hard-code
SCRIPT_WINDOW, SCRIPT_RANGE = (-1000.0, 1000.0), (-1.0, 1.0)


def check_arithmetic(arithmetic: str) -> str:
    if arithmetic not in ARITHMETICS:
        raise OptionError(f"arithmetic {arithmetic!r}: give one of {', '.join(ARITHMETICS)}")
    return arithmetic


def _as_meta(data: torch.Tensor, ref) -> torch.Tensor:
    if isinstance(ref, MetaTensor):
        return MetaTensor(data, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return data


class ScriptHUScaled(MapTransform, InvertibleTransform):
    """HU ``[C, X, Y, Z]`` -> ``float32(clip(h, -1000, 1000) / 1000)`` computed in float64, in [-1, 1]; the inverse is
    ``clamp(y, -1, 1) * 1000`` in the data's dtype, made integer by ``rounding`` (``truncate``: the script's
    ``astype(int16)``)."""

    def __init__(self, keys, rounding: str = "truncate", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if rounding not in HU_ROUNDING:
            raise OptionError(f"hu_rounding {rounding!r}: give one of {', '.join(HU_ROUNDING)}")
        self.rounding = rounding

    def __call__(self, data):
        d = dict(data)
        lo, hi = SCRIPT_WINDOW
        for key in self.key_iterator(d):
            h = torch.as_tensor(d[key]).to(torch.float64)
            d[key] = _as_meta((h.clamp(lo, hi) / 1000.0).to(torch.float32), d[key])
            self.push_transform(d, key)
        return d

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            self.pop_transform(d, key)
            v = torch.as_tensor(d[key]).clamp(-1.0, 1.0) * 1000.0
            d[key] = _as_meta(torch.trunc(v) if self.rounding == "truncate" else torch.round(v), d[key])
        return d


def _script_normalize(self, z: torch.Tensor) -> torch.Tensor:
    return (z - self.z_shift) * (1.0 / self.z_std)


def _script_denormalize(self, z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 / self.z_std) + self.z_shift


def script_latents(network: FrozenVAE) -> FrozenVAE:
    """``network`` (a Wan 2.1 / 2.2 VAE) normalising its latents in the official wrapper's order (see the module
    docstring); changed in place and returned. Other VAEs have no such script here: :class:`OptionError`."""
    from ..vae.wan import WanVAE

    if not isinstance(network, WanVAE):
        raise OptionError(
            f"arithmetic 'script': the paper's scripts reproduced here are those of Wan 2.1 / 2.2; {network.name} "
            "has none: use arithmetic ours"
        )
    network.normalize = types.MethodType(_script_normalize, network)
    network.denormalize = types.MethodType(_script_denormalize, network)
    return network


def load_vae(name: str, weights=None, device="cpu", dtype="float32", options: dict | None = None, arithmetic="ours"):
    """:func:`fvae_ct.vae.load` (the bundle's ``network_def``), with the script's latent arithmetic when
    ``arithmetic`` is ``script``."""
    check_arithmetic(arithmetic)
    network = load(name, weights, device, dtype, options=options)
    return script_latents(network) if arithmetic == "script" else network
