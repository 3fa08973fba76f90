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
from .base import FrozenVAE

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


class DiffusersVideoVAE(FrozenVAE):
    """A diffusers causal video VAE behind the frozen-VAE interface (``model`` instance or ``weights`` to load)."""

    input_range = (-1.0, 1.0)

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
            from .wan import _from_pretrained

            model = _from_pretrained(getattr(diffusers, cls_name), weights or hub_id, dtype)
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
        c = self.latent_channels
        self.register_buffer(
            "z_shift",
            (
                torch.as_tensor(mean, dtype=torch.float32)
                if mean is not None
                else torch.full((c,), float(cfg.get("shift_factor") or 0.0))
            ).view(1, c, 1, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "z_scale",
            (
                float(cfg.scaling_factor) / torch.as_tensor(std, dtype=torch.float32)
                if std is not None
                else torch.full((c,), float(cfg.scaling_factor))
            ).view(1, c, 1, 1, 1),
            persistent=False,
        )
        self.freeze()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.z_shift) * self.z_scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.z_scale + self.z_shift

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.encode(x.expand(-1, 3, -1, -1, -1).to(self.dtype)).latent_dist.mode()
        return self.normalize(z.float())

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.denormalize(z).to(self.dtype)).sample.float().mean(1, keepdim=True)
