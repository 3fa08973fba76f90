"""Tiny autoencoders of the TAESD family (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) as plain PyTorch modules.

Architecture (written from the description in the upstream README, not copied): the encoder is an
``nn.Sequential`` of 3x3 convolutions and residual blocks with three stride-2 convolutions (8x spatial
downsampling); the decoder mirrors it with nearest 2x upsampling and starts with a soft clamp
``tanh(z / 3) * 3``. State-dict keys are the ``nn.Sequential`` indices so the upstream ``.pth`` files load
with ``strict=True``. TAEF2 adds, in the three deepest blocks of encoder and decoder, a pre-branch
``x + pool(x)`` (1x1 conv 64->256, GroupNorm(4, 256), ReLU, 1x1 conv 256->64, no biases).

Images are ``[N, 3, H, W]`` RGB in [0, 1]; latents are ``[N, latent_channels, H/8, W/8]``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TAESDEncoder", "TAESDDecoder", "TAESDBlock", "SoftClamp"]


def _conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``tanh(x / limit) * limit``: keeps latents inside (-limit, limit) smoothly."""

    def __init__(self, limit: float = 3.0):
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.limit) * self.limit


class TAESDBlock(nn.Module):
    """Residual block: three 3x3 convs (ReLU between), 1x1 skip when widths differ, ReLU after the sum.

    ``pool_width`` > 0 adds the TAEF2 pre-branch ``x = x + pool(x)`` before the block.
    """

    def __init__(self, n_in: int, n_out: int, pool_width: int = 0, pool_groups: int = 4):
        super().__init__()
        if pool_width:
            self.pool: nn.Module | None = nn.Sequential(
                nn.Conv2d(n_in, pool_width, 1, bias=False),
                nn.GroupNorm(pool_groups, pool_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(pool_width, n_in, 1, bias=False),
            )
        else:
            self.pool = None
        self.conv = nn.Sequential(
            _conv3x3(n_in, n_out),
            nn.ReLU(inplace=True),
            _conv3x3(n_out, n_out),
            nn.ReLU(inplace=True),
            _conv3x3(n_out, n_out),
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDEncoder(nn.Sequential):
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, latent_channels, H/8, W/8]``.

    Args:
        latent_channels: 4 (TAESD/TAESDXL), 16 (TAESD3/TAEF1) or 32 (TAEF2).
        width: feature width of every block (64 upstream).
        pool_width: width of the GroupNorm pre-branch in the three deepest blocks (256 for TAEF2, 0 = none).
    """

    def __init__(self, latent_channels: int = 32, width: int = 64, pool_width: int = 0):
        w = width

        def deep() -> TAESDBlock:
            return TAESDBlock(w, w, pool_width=pool_width)

        super().__init__(
            _conv3x3(3, w),
            TAESDBlock(w, w),
            _conv3x3(w, w, stride=2, bias=False),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            _conv3x3(w, w, stride=2, bias=False),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            _conv3x3(w, w, stride=2, bias=False),
            deep(),
            deep(),
            deep(),
            _conv3x3(w, latent_channels),
        )


class TAESDDecoder(nn.Sequential):
    """``[N, latent_channels, h, w]`` -> ``[N, 3, 8h, 8w]``, roughly in [0, 1] (not clamped here)."""

    def __init__(self, latent_channels: int = 32, width: int = 64, pool_width: int = 0):
        w = width

        def deep() -> TAESDBlock:
            return TAESDBlock(w, w, pool_width=pool_width)

        super().__init__(
            SoftClamp(3.0),
            _conv3x3(latent_channels, w),
            nn.ReLU(inplace=True),
            deep(),
            deep(),
            deep(),
            nn.Upsample(scale_factor=2),
            _conv3x3(w, w, bias=False),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            nn.Upsample(scale_factor=2),
            _conv3x3(w, w, bias=False),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            TAESDBlock(w, w),
            nn.Upsample(scale_factor=2),
            _conv3x3(w, w, bias=False),
            TAESDBlock(w, w),
            _conv3x3(w, 3),
        )
