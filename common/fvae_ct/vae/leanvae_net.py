"""The LeanVAE network (Cheng et al., "LeanVAE: An Ultra-Efficient Reconstruction VAE for Video Diffusion Models", 2025):
own implementation.

The modules below carry the parameter names and shapes of the official implementation
(github.com/westlake-repl/LeanVAE, MIT licence; checkpoints ``LeanVAE-dim4.ckpt`` / ``LeanVAE-dim16.ckpt`` on
Hugging Face ``Yumic/LeanVAE``, model card licence MIT), so the released state dicts load with
``strict=True``; ``tests/fixtures/leanvae_keys.json`` holds their key layout, taken from the official code.
A checkpoint is ``{"args": {...}, "state_dict": {...}}``; the architecture is read from ``args``.

Architecture. A Haar wavelet transform splits the clip into a low band (3 channels) and high bands (9 for the
first frame, 21 for the following frame pairs); each goes through a linear patch embedding (4x4 pixels of the
half-resolution bands, 2 frames for the video bands: 8x spatial, 4x temporal compression in total), a few
token-mixing layers (causal depthwise 3x3x3 convolution + gated MLP) per band, then joint layers on both.
The latent is a learned linear projection of the joint features (the ``phi`` of an unrolled ISTA bottleneck;
deterministic), decoded by the unrolled ISTA iterations, the mirrored layers and the inverse transform.
The first frame is coded as an image, every further group of 4 frames as a clip; everything is causal in
time, so clips are streamed a few latent frames at a time (:class:`~fvae_ct.vae.streaming.CausalStream`),
exactly equal to a whole-clip pass.

Layouts: clips ``[B, 3, T, H, W]`` in [-0.5, 0.5] (the official inference range), ``T = 1 + 4k``, ``H, W``
multiples of 8; latents ``[B, d, 1 + k, H/8, W/8]``, ``d`` = 4 or 16, unnormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import CausalStream

__all__ = ["LeanVAENet", "haar", "inverse_haar"]


# ---- Haar wavelet transform -------------------------------------------------------------------------
def haar(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Unnormalised Haar analysis of ``x: [B, C, ...]`` along ``axes`` (even lengths), the first axis most
    significant in the band order: ``[B, 2^n * C, ...halved]``, channel = band * C + c, each band the
    sum (low) or difference (high) of the pairs. Equals the official transform with its rescaling."""
    bands = x.unsqueeze(1)  # [B, 1, C, ...]
    for ax in axes:
        a = ax + 1 if ax >= 0 else ax
        even, odd = bands.unflatten(a, (-1, 2)).unbind(a + 1 if a >= 0 else a)
        bands = torch.stack([even + odd, even - odd], 2).flatten(1, 2)
    return bands.flatten(1, 2)


def inverse_haar(y: torch.Tensor, axes: tuple[int, ...], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`haar` (``channels`` = C of the original)."""
    bands = y.unflatten(1, (-1, channels))
    for ax in reversed(axes):
        a = ax + 1 if ax >= 0 else ax
        low, high = bands.unflatten(1, (-1, 2)).unbind(2)
        even, odd = (low + high) / 2, (low - high) / 2
        if a >= 0:
            bands = torch.stack([even, odd], a + 1).flatten(a, a + 1)
        else:
            bands = torch.stack([even, odd], a).flatten(a - 1, a)
    return bands.squeeze(1)


_IMAGE_AXES = (-1, -2)  # [B, C, H, W]: width, then height (the official band order)
_VIDEO_AXES = (2, 3, 4)  # [B, C, T, H, W]: time, height, width


# ---- token layers (tokens ``[B, T, H, W, C]``) --------------------------------------------------------
class CausalDepthConv(nn.Module):
    """Depthwise 3x3x3 convolution, zero padded in space, causal in time (two frames of left context)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ds_conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        x = F.pad(x.permute(0, 4, 1, 2, 3), (1, 1, 1, 1))  # [B, C, T, H, W]
        if stream is None:
            x = F.pad(x, (0, 0, 0, 0, 2, 0))
        else:
            x = stream.prepend(x, 2)
        return self.ds_conv(x).permute(0, 2, 3, 4, 1)


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def _mlp(dim: int) -> nn.Sequential:
    inner = int(4 * (2 / 3) * dim)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, 2 * inner, bias=False),
        _GEGLU(),
        nn.Dropout(0.0),
        nn.Linear(inner, dim, bias=False),
    )


class TokenMixer(nn.Module):
    """``n`` x (causal depthwise conv, gated MLP), each with a residual connection or (``residual=False``,
    the ISTA proximal layers) without."""

    def __init__(self, n: int, dim: int, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.dconv_layer = nn.Sequential(*[CausalDepthConv(dim) for _ in range(n)])
        self.ffd_layer = nn.Sequential(*[_mlp(dim) for _ in range(n)])

    def forward(self, x: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        for conv, mlp in zip(self.dconv_layer, self.ffd_layer):
            x = x + conv(x, stream) if self.residual else conv(x, stream)
            x = x + mlp(x) if self.residual else mlp(x)
        return x


class _Patch(nn.Module):
    """``[B, C, T*pt, H*ph, W*pw]`` <-> tokens ``[B, T, H, W, C*pt*ph*pw]`` (channel-major patch vector)."""

    def __init__(self, pt: int, ph: int, pw: int, inverse: bool = False, channels: int = 0):
        super().__init__()
        self.p, self.inverse, self.channels = (pt, ph, pw), inverse, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.p
        if not self.inverse:
            b, c, t, h, w = x.shape
            x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
            return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)
        b, t, h, w, _ = x.shape
        x = x.reshape(b, t, h, w, self.channels, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, self.channels, t * pt, h * ph, w * pw)


class _Bands(nn.Module):
    """Patch embeddings (encoder) or un-embeddings (decoder) of the low and high wavelet bands, image and video,
    and the token mixers of each band and of both together."""

    image_low_proj: nn.Module  # registered by name below
    image_high_proj: nn.Module
    video_low_proj: nn.Module
    video_high_proj: nn.Module

    def __init__(self, l_dim: int, h_dim: int, sep_num_layer: int, fusion_num_layer: int, decode: bool):
        super().__init__()
        self.l_dim = l_dim
        self.low_layer = TokenMixer(sep_num_layer, l_dim)
        self.high_layer = TokenMixer(sep_num_layer, h_dim)
        self.fusion_layer = TokenMixer(fusion_num_layer, l_dim + h_dim)
        for kind, (pt, nhigh) in {"video": (2, 7), "image": (1, 3)}.items():
            for band, width, ch in (("low", l_dim, 3), ("high", h_dim, 3 * nhigh)):
                n = ch * pt * 16
                if decode:
                    proj = nn.Sequential(nn.Linear(width, n), _Patch(pt, 4, 4, inverse=True, channels=ch))
                else:
                    proj = nn.Sequential(_Patch(pt, 4, 4), nn.Linear(n, width))
                self.add_module(f"{kind}_{band}_proj", proj)


class Encoder(_Bands):
    def __init__(self, l_dim: int, h_dim: int, sep_num_layer: int, fusion_num_layer: int):
        super().__init__(l_dim, h_dim, sep_num_layer, fusion_num_layer, decode=False)

    def forward(self, x: torch.Tensor, stream: CausalStream | None, with_image: bool) -> torch.Tensor:
        """Clip chunk ``[B, 3, T, H, W]`` (the first frame is an image when ``with_image``) -> tokens."""
        lows, highs = [], []
        if with_image:
            w = haar(x[:, :, 0], _IMAGE_AXES).unsqueeze(2)
            lows.append(self.image_low_proj(w[:, :3]))
            highs.append(self.image_high_proj(w[:, 3:]))
            x = x[:, :, 1:]
        if x.shape[2]:
            w = haar(x, _VIDEO_AXES)
            lows.append(self.video_low_proj(w[:, :3]))
            highs.append(self.video_high_proj(w[:, 3:]))
        low = self.low_layer(torch.cat(lows, 1), stream)
        high = self.high_layer(torch.cat(highs, 1), stream)
        return self.fusion_layer(torch.cat([low, high], -1), stream)


class Decoder(_Bands):
    def __init__(self, l_dim: int, h_dim: int, sep_num_layer: int, fusion_num_layer: int):
        super().__init__(l_dim, h_dim, sep_num_layer, fusion_num_layer, decode=True)

    def forward(self, p: torch.Tensor, stream: CausalStream | None, with_image: bool) -> torch.Tensor:
        """Tokens -> clip chunk ``[B, 3, T, H, W]`` (first token frame decoded as an image when ``with_image``)."""
        p = self.fusion_layer(p, stream)
        low = self.low_layer(p[..., : self.l_dim], stream)
        high = self.high_layer(p[..., self.l_dim :], stream)
        out = []
        if with_image:
            w = torch.cat([self.image_low_proj(low[:, :1]), self.image_high_proj(high[:, :1])], 1)
            out.append(inverse_haar(w[:, :, 0], _IMAGE_AXES).unsqueeze(2))
            low, high = low[:, 1:], high[:, 1:]
        if low.shape[1]:
            w = torch.cat([self.video_low_proj(low), self.video_high_proj(high)], 1)
            out.append(inverse_haar(w, _VIDEO_AXES))
        return torch.cat(out, 2)


class UnrolledISTA(nn.Module):
    """The latent bottleneck: ``phi`` projects features to the latent; decoding starts from ``Q`` and runs
    ``iter_num`` gradient + learned proximal (soft-threshold) steps."""

    def __init__(self, points_num: int, out_num: int, iter_num: int, layer_num: int):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(out_num, points_num) / points_num**0.5)
        self.Q = nn.Parameter(self.phi.detach().t().clone())
        self.forward_l = nn.ModuleList([TokenMixer(layer_num, points_num, residual=False) for _ in range(iter_num)])
        self.backward_l = nn.ModuleList([TokenMixer(layer_num, points_num, residual=False) for _ in range(iter_num)])
        self.weights = nn.ParameterList([nn.Parameter(torch.tensor(1.0)) for _ in range(iter_num)])
        self.threshold = nn.ParameterList([nn.Parameter(torch.tensor([0.01])) for _ in range(iter_num)])

    def sample(self, p: torch.Tensor) -> torch.Tensor:
        """Features ``[..., points_num]`` -> latent ``[..., out_num]`` (deterministic)."""
        return p @ self.phi.t()

    def recon(self, y: torch.Tensor, stream: CausalStream | None = None) -> torch.Tensor:
        r = y @ self.Q.t()
        for fwd, bwd, step, thr in zip(self.forward_l, self.backward_l, self.weights, self.threshold):
            r_grad = r - step * ((r @ self.phi.t() - y) @ self.phi)
            u = fwd(r_grad, stream)
            u = torch.sign(u) * F.relu(u.abs() - thr)
            r = r_grad + bwd(u, stream)
        return r


class LeanVAENet(nn.Module):
    """The LeanVAE network (official parameter names). Arguments as in the official ``args``."""

    def __init__(
        self,
        embedding_dim: int = 512,
        latent_dim: int = 16,
        ista_iter_num: int = 2,
        ista_layer_num: int = 2,
        l_dim: int = 128,
        h_dim: int = 384,
        sep_num_layer: int = 2,
        fusion_num_layer: int = 4,
    ):
        super().__init__()
        if embedding_dim != l_dim + h_dim:
            raise ValueError(f"LeanVAE needs embedding_dim = l_dim + h_dim, got {embedding_dim} != {l_dim} + {h_dim}")
        self.latent_dim = latent_dim
        self.latent_bottleneck = UnrolledISTA(embedding_dim, latent_dim, ista_iter_num, ista_layer_num)
        self.encoder = Encoder(l_dim, h_dim, sep_num_layer, fusion_num_layer)
        self.decoder = Decoder(l_dim, h_dim, sep_num_layer, fusion_num_layer)
        self.std_layer = nn.Linear(embedding_dim, latent_dim)  # posterior std head: training only

    def encode(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """``[B, 3, 1 + 4k, H, W]`` in [-0.5, 0.5] -> ``[B, d, 1 + k, H/8, W/8]``; streamed ``chunk`` latent
        frames at a time (``None``: in one pass)."""
        t = x.shape[2]
        if (t - 1) % 4:
            raise ValueError(f"LeanVAE encodes 1 + 4k frames, got {t}")
        n = 1 + (t - 1) // 4
        step = chunk or n
        stream, out = CausalStream(), []
        for i in range(0, n, step):
            stream.next_chunk()
            a, b = (0 if i == 0 else 1 + 4 * (i - 1)), 1 + 4 * (min(i + step, n) - 1)
            out.append(self.latent_bottleneck.sample(self.encoder(x[:, :, a:b], stream, with_image=i == 0)))
        return torch.cat(out, 1).permute(0, 4, 1, 2, 3)

    def decode(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """``[B, d, n, h, w]`` -> ``[B, 3, 1 + 4(n - 1), 8h, 8w]`` (about [-0.5, 0.5])."""
        z = z.permute(0, 2, 3, 4, 1)
        n = z.shape[1]
        step = chunk or n
        stream, out = CausalStream(), []
        for i in range(0, n, step):
            stream.next_chunk()
            p = self.latent_bottleneck.recon(z[:, i : i + step], stream)
            out.append(self.decoder(p, stream, with_image=i == 0))
        return torch.cat(out, 2)
