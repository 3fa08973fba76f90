"""The one adapter for diffusers' video autoencoders (Wan and the others of :mod:`fvae_ct.vae.diffusers_video`).

Grey CT slices become the RGB frames of a clip (the grey channel replicated), the latent is the posterior mode
normalised per channel as ``(z - shift) / std``, and the decoded RGB clip goes back to grey as the mean of its
channels. Subclasses build ``self.model`` and call :meth:`DiffusersVAE.set_latent_stats`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .base import FrozenVAE

__all__ = ["DiffusersVAE", "from_pretrained"]


def from_pretrained(cls, weights: str | os.PathLike, dtype: torch.dtype):
    """``cls.from_pretrained`` (a diffusers autoencoder class) on a local folder (with or without ``vae/``)
    or a hub id (``subfolder="vae"``)."""
    p = Path(weights)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if p.exists():
        if (p / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"
        elif not (p / "config.json").is_file():
            raise WeightsError(f"{p}: not a diffusers {cls.__name__} folder (no config.json or vae/config.json)")
    else:
        kwargs["subfolder"] = "vae"
    try:
        return cls.from_pretrained(str(weights), **kwargs)
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"{weights}: cannot load {cls.__name__} ({type(e).__name__}: {e}). Give a local diffusers folder "
            "(with config.json + diffusion_pytorch_model.safetensors, or a vae/ subfolder) or a hub id "
            "reachable from this machine."
        ) from e


class DiffusersVAE(FrozenVAE):
    """A diffusers autoencoder ``self.model`` (parameters in ``self.dtype``) on grey clips in [-1, 1].

    ``decode_dtype`` (e.g. ``torch.bfloat16``) decodes under autocast; ``None`` = ``dtype``.
    """

    input_range = (-1.0, 1.0)
    decode_dtype: torch.dtype | None = None
    model: Any  # the diffusers autoencoder (set by the subclass), in ``dtype``
    dtype: torch.dtype
    z_shift: torch.Tensor  # buffers of set_latent_stats
    z_std: torch.Tensor

    def set_latent_stats(self, shift, std) -> None:
        """Per-channel (or scalar) ``shift`` and ``std`` of the latent: ``normalize(z) = (z - shift) / std``."""
        c = self.latent_channels
        for name, v in (("z_shift", shift), ("z_std", std)):
            t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            if t.numel() == 1:
                t = t.expand(c).clone()
            if t.numel() != c:
                raise WeightsError(
                    f"{self.name}: the latent {name[2:]} has {t.numel()} entries for {c} latent channels"
                )
            self.register_buffer(name, t.view(1, c, 1, 1, 1), persistent=False)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.z_shift) / self.z_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.z_std + self.z_shift

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x.expand(-1, 3, -1, -1, -1).to(self.dtype)
        return self.normalize(self.model.encode(rgb).latent_dist.mode().float())

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        z = self.denormalize(z)
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.decode_dtype is not None and self.decode_dtype != self.dtype:
            ctx = torch.autocast(device_type=z.device.type, dtype=self.decode_dtype)
        with ctx:
            out = self.model.decode(z.to(self.dtype)).sample
        return out.float().mean(1, keepdim=True)
