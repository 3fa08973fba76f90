"""The identity "autoencoder": a control that measures what the pipeline alone (window, resampling,
rounding, geometry) does to a volume. Its latent is the input itself (1 channel, factors 1)."""

from __future__ import annotations

import torch

from ..tiling import TilingConfig
from .base import FrozenVAE

__all__ = ["IdentityVAE"]


class IdentityVAE(FrozenVAE):
    """``encode(x) = x``, ``decode(z) = z``; input range (0, 1). Reconstruction error = pipeline error."""

    name = "identity"
    latent_channels = 1
    spatial_factor = 1
    depth_factor = 1
    input_range = (0.0, 1.0)

    def __init__(self, tiling: TilingConfig | None = None, scale_factor: float = 1.0):
        super().__init__(tiling=tiling, scale_factor=scale_factor)
        self.freeze()

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        return z.clone()
