"""diffusers' other causal video VAEs (CogVideoX, HunyuanVideo, LTX-Video): depth is time.

Each runs on clips ``[B, 3, T, H, W]`` in [-1, 1] with ``T = 1 + k * temporal_factor`` (the base class pads
by replicating the last slice and crops back). Latents are the posterior mode normalised with the model's
own constants: ``(z - latents_mean) * scaling_factor / latents_std`` where the model has per-channel
statistics (LTX-Video), else ``(z - shift_factor) * scaling_factor`` (CogVideoX 1.15258426, HunyuanVideo
0.476986) — the convention of the corresponding diffusers pipelines.
"""

from __future__ import annotations

import torch

from ..tiling import TilingConfig
from .diffusers_adapter import DiffusersVAE, from_pretrained

__all__ = ["DiffusersVideoVAE", "VIDEO_VAES"]

#: name -> (diffusers class, default hub id with a ``vae`` subfolder, licence of the weights)
VIDEO_VAES = {
    "cogvideox": ("AutoencoderKLCogVideoX", "THUDM/CogVideoX-2b", "Apache-2.0 (CogVideoX-2b)"),
    "hunyuanvideo": (
        "AutoencoderKLHunyuanVideo",
        "hunyuanvideo-community/HunyuanVideo",
        "Tencent Hunyuan Community License",
    ),
    "ltx-video": ("AutoencoderKLLTXVideo", "Lightricks/LTX-Video", "LTX-Video open weights licence (model card)"),
}


class DiffusersVideoVAE(DiffusersVAE):
    """A diffusers causal video VAE behind the frozen-VAE interface (``model`` instance or ``weights`` to load)."""

    def __init__(
        self,
        name: str,
        model=None,
        weights: str | None = None,
        dtype: torch.dtype = torch.float32,
        tiling: TilingConfig | None = None,
        scale_factor: float = 1.0,
    ):
        super().__init__(tiling=tiling, scale_factor=scale_factor)
        import diffusers

        cls_name, hub_id, _ = VIDEO_VAES[name]
        if model is None:
            model = from_pretrained(getattr(diffusers, cls_name), weights or hub_id, dtype)
        self.name, self.dtype = name, dtype
        self.model = model if model.dtype == dtype else model.to(dtype)
        cfg, attrs, buffers = model.config, vars(model), dict(model.named_buffers())
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = int(
            attrs.get("spatial_compression_ratio")
            or cfg.get("spatial_compression_ratio")
            or 2 ** (len(cfg.block_out_channels) - 1)
        )
        self.depth_factor = int(attrs.get("temporal_compression_ratio") or cfg.get("temporal_compression_ratio"))
        mean = buffers.get("latents_mean", cfg.get("latents_mean"))
        std = buffers.get("latents_std", cfg.get("latents_std"))
        # (z - shift) * scaling / std, as (z - shift) / (std / scaling)
        scaling = float(cfg.scaling_factor)
        self.set_latent_stats(
            mean if mean is not None else float(cfg.get("shift_factor") or 0.0),
            torch.as_tensor(std, dtype=torch.float32) / scaling if std is not None else 1.0 / scaling,
        )
        self.freeze()
