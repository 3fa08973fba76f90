"""The IV-VAE network (Wu et al., "Improved Video VAE for Latent Video Diffusion Model", CVPR 2025): own implementation.

The modules below carry the parameter names and shapes of the official implementation
(github.com/ali-vilab/iv-vae, ``models/vae3d.py``, MIT licence), so the released checkpoints
``ivvae_z4_dim64.pth``, ``ivvae_z8_dim64.pth``, ``ivvae_z16_dim64.pth`` and ``ivvae_z16_dim96.pth``
(ModelScope ``wpy1999/iv-vae``) load with ``strict=True``; ``tests/fixtures/ivvae_keys.json`` holds their key
layout, taken from the official code.

Architecture. Keyframe-based temporal compression: every feature map has two halves of equal width, a 2D
branch (per-frame convolutions, the keyframe / image prior) and a 3D branch (group-causal 3D convolutions,
the temporal compression); most convolutions read both halves. A clip of ``1 + 4k`` frames is streamed as
its first frame, then groups of 4 frames (:class:`~fvae_ct.vae.streaming.CausalStream`). A group-causal
convolution is a plain 3x3x3 convolution inside a group whose left neighbour is the last frame of the
previous group and whose right neighbour is zero; a lone frame is its own left neighbour. Two temporal
downsamplings turn each group of 4 into one latent frame; the decoder mirrors this and assembles each
group from the 2D branch (its first frame, the keyframe) and the 3D branch (the other three).

Layouts: clips ``[B, 3, T, H, W]`` in [-1, 1], ``T = 1 + 4k``, ``H, W`` multiples of 8. Latent
``[B, z, 1 + k, H/8, W/8]`` = ``scale * (posterior mean - shift)`` with the published per-variant
``scale`` / ``shift``: channels ``[:z/2]`` from the 2D branch, ``[z/2:]`` from the 3D branch. The posterior
mean is used (the official ``encode`` draws a sample), so encoding is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import CausalStream, per_frame

__all__ = ["IVVAENet"]


class GroupCausalConv3d(nn.Conv3d):
    """3D convolution with group-causal time padding (kernel 3 in time, padding 1) or none (kernel 1).

    ``x: [B, C, T, H, W]``, ``T`` a multiple of ``group`` (or 1); ``prev: [B, C, 1, H, W]`` is the last
    input frame of the previous chunk, needed when ``T > 1``.
    """

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, group: int = 1):
        super().__init__(cin, cout, kernel, padding=0)
        if (kernel, padding) not in ((1, 0), (3, 1)):
            raise ValueError(
                f"GroupCausalConv3d supports kernel 1 / padding 0 and kernel 3 / padding 1, got "
                f"{kernel} / {padding}"
            )
        self.pad, self.group = padding, group

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        if self.pad == 0:
            return super().forward(x)
        p = self.pad
        x = F.pad(x, (p, p, p, p))
        b, c, t, h, w = x.shape
        zero = x.new_zeros(b, c, 1, h, w)
        if t == 1:
            return super().forward(torch.cat([x, x, zero], 2))
        g = self.group
        if t % g:
            raise ValueError(f"group-causal convolution: {t} frames is not a multiple of the group size {g}")
        if prev is None:
            raise ValueError("group-causal convolution of several frames needs the previous chunk's last frame")
        n = t // g
        groups = x.unflatten(2, (n, g))  # [B, C, n, g, H, W]
        left = torch.cat([F.pad(prev, (p, p, p, p)), groups[:, :, :-1, -1]], 2).unsqueeze(3)
        padded = torch.cat([left, groups, zero.unsqueeze(2).expand(-1, -1, n, -1, -1, -1)], 3)
        y = super().forward(padded.transpose(1, 2).flatten(0, 1))  # [(B n), C', g, H', W']
        return y.unflatten(0, (b, n)).transpose(1, 2).flatten(2, 3)


class TwinConv(nn.Module):
    """Both branches read all ``cin`` channels: ``conv_2d`` per frame, ``conv_3d`` group-causal; outputs
    ``[2D (cout), 3D (cout)]``. Temporal kernels (3) exchange their last input frame with ``stream``."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, group: int = 1):
        super().__init__()
        self.conv_2d = nn.Conv2d(cin, cout, kernel, padding=padding)
        self.conv_3d = GroupCausalConv3d(cin, cout, kernel, padding, group)

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        prev = None
        if stream is not None and self.conv_3d.pad:
            prev = stream.exchange(x[:, :, -1:])
        return torch.cat([per_frame(self.conv_2d, x), self.conv_3d(x, prev)], 1)


class JointConv2d(nn.Module):
    """One per-frame 2D convolution over both branches (``conv``), optionally dilated."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation)

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        return per_frame(self.conv, x)


class TwinRMSNorm(nn.Module):
    """RMS norm of each branch (half of the channels) on its own, one learned gain (``gamma``) per channel."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = width**0.5
        self.gamma = nn.Parameter(torch.ones(2 * width, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.unflatten(1, (2, -1)), dim=2).flatten(1, 2)
        return x * self.scale * self.gamma


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, residual. ``x: [B, C, T, H, W]``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = _RMSNorm2d(width)
        self.to_qkv = nn.Conv2d(width, 3 * width, 1)
        self.proj = nn.Conv2d(width, width, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return self.proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + per_frame(self._frame, x)


class _RMSNorm2d(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.scale = width**0.5
        self.gamma = nn.Parameter(torch.ones(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class TwinAttention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.Attention_2d = SpatialAttention(width)
        self.Attention_3d = SpatialAttention(width)

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        return torch.cat([self.Attention_2d(x[:, : self.width]), self.Attention_3d(x[:, self.width :])], 1)


class TwinResBlock(nn.Module):
    """Residual block on both branches (``cin`` -> ``cout`` channels each); ``group=None``: 2D only."""

    def __init__(self, cin: int, cout: int, group: int | None = None):
        super().__init__()

        def conv(a, b, k):
            return TwinConv(2 * a, b, k, k // 2, group) if group else JointConv2d(2 * a, 2 * b, k)

        self.residual = nn.Sequential(
            TwinRMSNorm(cin),
            nn.SiLU(),
            conv(cin, cout, 3),
            TwinRMSNorm(cout),
            nn.SiLU(),
            nn.Dropout(0.0),
            conv(cout, cout, 3),
        )
        self.shortcut = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        return _run(self.residual, x, stream) + self.shortcut(x)


class Resample(nn.Module):
    """2x spatial down/up-sampling of each branch, optionally 2x in time on the 3D branch.

    ``down3d``: the 2D branch keeps every other frame, the 3D branch is merged pairwise by ``time_conv``.
    ``up3d`` (not in the first chunk): the 2D branch repeats each frame, ``time_conv`` splits each 3D frame
    in two. Upsampling halves the width.
    """

    def __init__(self, width: int, mode: str):
        super().__init__()
        self.width, self.mode = width, mode
        if mode.startswith("down"):

            def make():
                return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(width, width, 3, stride=2))

        else:

            def make():
                return nn.Sequential(
                    nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                    nn.Conv2d(width, width // 2, 3, padding=1),
                )

        self.resample_2d, self.resample_3d = make(), make()
        if mode == "down3d":
            self.time_conv = nn.Conv3d(width, width, (2, 1, 1), stride=(2, 1, 1))
        elif mode == "up3d":
            self.time_conv = nn.Conv3d(width, 2 * width, 1)

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        c = self.width
        if self.mode == "up3d" and stream is not None and not stream.first:
            x2 = x[:, :c].repeat_interleave(2, dim=2)
            x3 = self.time_conv(x[:, c:]).unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5).flatten(2, 3)
            x = torch.cat([x2, x3], 1)
        x = torch.cat([per_frame(self.resample_2d, x[:, :c]), per_frame(self.resample_3d, x[:, c:])], 1)
        t = x.shape[2]
        if self.mode == "down3d" and t > 1:
            x = torch.cat([x[:, :c, 0 : 2 * (t // 2) : 2], self.time_conv(x[:, c:])], 1)
        return x


class AtrousHead(nn.Module):
    """Encoder output: parallel 1x1, 3x3 and dilated (3, 6, 9, 12) 3x3 convolutions, fused by a 1x1."""

    RATES = (0, 1, 3, 6, 9, 12)

    def __init__(self, cin: int, z: int):
        super().__init__()
        self.z = z
        for r in self.RATES:
            k, d = (1, 1) if r == 0 else (3, r)
            setattr(self, f"PAC_{r}", JointConv2d(2 * cin, 2 * z, k, dilation=d))
        self.PAC_conv = JointConv2d(12 * z, 2 * z, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [getattr(self, f"PAC_{r}")(x) for r in self.RATES]
        z = self.z
        return self.PAC_conv(torch.cat([o[:, :z] for o in outs] + [o[:, z:] for o in outs], 1))


def _run(layers, x: torch.Tensor, stream: CausalStream | None) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, (TwinResBlock, TwinAttention, Resample, TwinConv, JointConv2d)):
            x = layer(x, stream)
        else:
            x = layer(x)
    return x


class Encoder(nn.Module):
    """One chunk ``[B, 3, T, H, W]`` (T = 1 or 4) -> ``[B, 2z, 1, H/8, W/8]`` (2D then 3D branch)."""

    def __init__(self, dim: int, z: int):
        super().__init__()
        d1, d2, d4 = dim, 2 * dim, 4 * dim
        self.conv1 = TwinConv(3, d1, 3, 1, group=4)
        self.downsamples = nn.Sequential(
            TwinResBlock(d1, d1, 4),
            TwinResBlock(d1, d1, 4),
            Resample(d1, "down2d"),
            TwinResBlock(d1, d2, 4),
            TwinResBlock(d2, d2, 4),
            Resample(d2, "down3d"),
            TwinResBlock(d2, d4, 2),
            TwinResBlock(d4, d4, 2),
            Resample(d4, "down3d"),
            TwinAttention(d4),
            TwinResBlock(d4, d4),
            TwinAttention(d4),
            TwinResBlock(d4, d4),
            TwinAttention(d4),
        )
        self.middle = nn.Sequential(TwinResBlock(d4, d4), TwinAttention(d4), TwinResBlock(d4, d4))
        self.head = nn.Sequential(TwinRMSNorm(d4), nn.SiLU(), AtrousHead(d4, z))

    def forward(self, x: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        x = _run(self.downsamples, self.conv1(x, stream), stream)
        return self.head(_run(self.middle, x, None))


class Decoder(nn.Module):
    """One latent frame ``[B, z, 1, h, w]`` -> 1 (first chunk) or 4 frames ``[B, 6, T, 8h, 8w]``:
    channels ``[:3]`` from the 2D (keyframe) branch, ``[3:]`` from the 3D branch."""

    def __init__(self, dim: int, zh: int):
        super().__init__()
        d1, d2, d4 = dim, 2 * dim, 4 * dim
        self.conv1 = JointConv2d(2 * zh, 2 * d4, 3)
        self.middle = nn.Sequential(TwinResBlock(d4, d4), TwinAttention(d4), TwinResBlock(d4, d4))
        self.upsamples = nn.Sequential(
            TwinResBlock(d4, d4),
            TwinAttention(d4),
            TwinResBlock(d4, d4),
            TwinAttention(d4),
            TwinResBlock(d4, d4),
            TwinAttention(d4),
            Resample(d4, "up3d"),
            TwinResBlock(d2, d4, 2),
            TwinResBlock(d4, d4, 2),
            TwinResBlock(d4, d4, 2),
            Resample(d4, "up3d"),
            TwinResBlock(d2, d2, 4),
            TwinResBlock(d2, d2, 4),
            TwinResBlock(d2, d2, 4),
            Resample(d2, "up2d"),
            TwinResBlock(d1, d1, 4),
            TwinResBlock(d1, d1, 4),
            TwinResBlock(d1, d1, 4),
        )
        self.head = nn.Sequential(TwinRMSNorm(d1), nn.SiLU(), TwinConv(2 * d1, 3, 3, 1, group=4))

    def forward(self, z: torch.Tensor, stream: CausalStream) -> torch.Tensor:
        x = _run(self.middle, self.conv1(z), None)
        return _run(self.head, _run(self.upsamples, x, stream), stream)


class IVVAENet(nn.Module):
    """The IV-VAE network (official parameter names). ``z_dim`` latent channels, base width ``dim``.

    :meth:`posterior_mean` / :meth:`decode` work on unnormalised latents; :class:`IVVAE` adds the
    published scale / shift.
    """

    def __init__(self, z_dim: int = 16, dim: int = 64):
        super().__init__()
        if z_dim % 2 or dim % 2:
            raise ValueError(f"IV-VAE needs even z_dim and dim, got {z_dim}, {dim}")
        self.z_dim, self.dim = z_dim, dim
        self.encoder = Encoder(dim, z_dim)
        self.conv1 = TwinConv(2 * z_dim, z_dim, 1)
        self.conv2 = TwinConv(z_dim, z_dim // 2, 1)
        self.decoder = Decoder(dim, z_dim // 2)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 1 + 4k, H, W]`` in [-1, 1] -> ``[B, z, 1 + k, H/8, W/8]`` (mean of the posterior)."""
        t = x.shape[2]
        if (t - 1) % 4:
            raise ValueError(f"IV-VAE encodes 1 + 4k frames, got {t}")
        stream, outs = CausalStream(), []
        for start in [0, *range(1, t, 4)]:
            stream.next_chunk()
            outs.append(self.encoder(x[:, :, start : start + (1 if start == 0 else 4)], stream))
        h = self.conv1(torch.cat(outs, 2))  # [2D: mean, logvar | 3D: mean, logvar], z/2 channels each
        zh = self.z_dim // 2
        return torch.cat([h[:, :zh], h[:, 2 * zh : 3 * zh]], 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, z, n, h, w]`` -> ``[B, 3, 1 + 4(n - 1), 8h, 8w]`` (about [-1, 1])."""
        x, stream, frames = self.conv2(z), CausalStream(), []
        for i in range(z.shape[2]):
            stream.next_chunk()
            out = self.decoder(x[:, :, i : i + 1], stream)
            frames.append(out[:, :3] if i == 0 else torch.cat([out[:, :3, :1], out[:, 3:, 1:]], 2))
        return torch.cat(frames, 2)
