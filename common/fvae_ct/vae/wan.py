"""Wan 2.1 / Wan 2.2 video VAEs (diffusers ``AutoencoderKLWan``): depth is time.

The volume's axial slices are the frames of a clip (grey replicated to RGB, range [-1, 1]). The Wan VAEs
are causal with 4x temporal compression: a clip needs 1 + 4k frames, so the base class pads by
replicating the last slice and crops back. Latents are the posterior mode, normalised with the config's
``latents_mean`` / ``latents_std`` (``(z - mean) / std``), the convention of the Wan diffusion pipelines.
Wan 2.2 (z 48) patchifies 2x2 before its 8x encoder: spatial factor 16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import WeightsError
from ..tiling import TilingConfig
from .diffusers_adapter import DiffusersVAE, from_pretrained
from .wan_checkpoint import WAN_FILES, is_single_file, load_single_file

__all__ = ["WanVAE", "WAN_HUB_IDS"]

#: working memory of one reconstruct call (see :attr:`fvae_ct.vae.base.FrozenVAE.working_memory`): peak RSS on the CPU
#: at 128^2 and 256^2 (Wan 2.1: 0.51 / 1.67 GiB, Wan 2.2: 0.59 / 1.55 GiB for 5 slices)
WORKING_MEMORY = {"wan2.1": (0.12, 2.4e-5), "wan2.2": (0.27, 2.0e-5)}
#: diffusers repositories holding the official weights (``subfolder="vae"``).
WAN_HUB_IDS = {"wan2.1": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.2": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}


def _read_config(config) -> dict | None:
    """A diffusers config given as a dict, a ``config.json`` or the folder holding it."""
    if config is None or isinstance(config, dict):
        return config
    p = Path(config)
    p = p / "config.json" if p.is_dir() else p
    try:
        return {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError) as e:
        raise WeightsError(f"{p}: cannot read the Wan VAE config ({e})") from e


class WanVAE(DiffusersVAE):
    """Wan 2.1 / 2.2 behind the frozen-VAE interface.

    Args:
        model: an ``AutoencoderKLWan`` instance (tests pass tiny random ones), or ``None`` with ``weights``.
        weights: Wan's original single file (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``, or a ``.safetensors``
            of the same tensors; loaded offline, see :mod:`fvae_ct.vae.wan_checkpoint`), a local diffusers folder,
            or a hub id for ``from_pretrained`` (``subfolder="vae"``).
        config: with a single file, the diffusers config it fits (a dict, or a ``config.json`` / its folder);
            default the official one of ``name``.
        dtype: parameter dtype (fp32 default).
        decode_dtype: e.g. ``torch.bfloat16`` to decode under autocast on GPU; ``None`` = ``dtype``.
    """

    depth_factor = 4

    def __init__(
        self,
        model=None,
        weights: str | os.PathLike | None = None,
        name: str = "wan2.1",
        dtype: torch.dtype = torch.float32,
        decode_dtype: torch.dtype | None = None,
        tiling: TilingConfig | None = None,
        scale_factor: float = 1.0,
        config: dict | str | os.PathLike | None = None,
    ):
        super().__init__(tiling=tiling, scale_factor=scale_factor)
        if model is None:
            if weights is None:
                raise WeightsError(
                    f"{name}: give `weights` ({WAN_FILES.get(name, 'the original .pth')}, a local diffusers folder "
                    f"or hub id {WAN_HUB_IDS.get(name)})"
                )
            if is_single_file(weights):
                model = load_single_file(name, weights, dtype, _read_config(config))
            else:
                from diffusers import AutoencoderKLWan

                model = from_pretrained(AutoencoderKLWan, weights, dtype)
        self.name = name
        self.model = model if model.dtype == dtype else model.to(dtype)
        cfg = model.config
        self.latent_channels = int(cfg.z_dim)
        patch = int(cfg.patch_size or 1)
        self.spatial_factor = int(2 ** (len(cfg.dim_mult) - 1)) * patch
        self.depth_factor = int(2 ** sum(bool(t) for t in cfg.temperal_downsample))
        if self.depth_factor != 4:
            raise WeightsError(
                f"{weights or name}: the model's temporal downsampling factor is {self.depth_factor}; diffusers' Wan "
                "encoder runs 1 + 4k frame chunks, so only 4 is supported"
            )
        self.dtype = dtype
        self.decode_dtype = decode_dtype
        self.working_memory = WORKING_MEMORY.get(name)
        self.set_latent_stats(cfg.latents_mean, cfg.latents_std)
        self.freeze()
