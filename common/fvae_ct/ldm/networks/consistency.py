"""3D consistency across axial slices for a 2D latent denoiser.

:class:`SliceConsistencyAttention` is multi-head self-attention along the depth axis at every (h, w)
position of a feature map ``[B, C, D, H, W]``, with a sinusoidal depth position encoding, a zero-initialised
output projection (so the block starts as the identity) and a residual connection.
:class:`DepthConv` is the seed's variant: an identity-initialised 1D convolution across slices.
:class:`PseudoThreeDUNet` runs MONAI's 2D ``DiffusionModelUNet`` on every latent slice and inserts these
blocks after chosen resolution levels (``mode="conv_every"``: a depth convolution after every 3x3 convolution
of the UNet, as the paper's official code does); ``mode="none"`` disables every 3D part (the ablation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from ...errors import OptionError, WeightsError

__all__ = ["SliceConsistencyAttention", "DepthConv", "SliceDepthConv", "PseudoThreeDUNet", "depth_position_encoding"]


def depth_position_encoding(depth: int, channels: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal encoding ``[depth, channels]`` of slice positions 0 .. depth-1 (any depth, no table)."""
    pos = torch.arange(depth, device=device, dtype=torch.float32)[:, None]
    half = channels // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    pe = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], 1)
    if pe.shape[1] < channels:
        pe = torch.cat([pe, torch.zeros(depth, channels - pe.shape[1], device=device)], 1)
    return pe.to(dtype)


class SliceConsistencyAttention(nn.Module):
    """Self-attention across slices: ``[B, C, D, H, W] -> [B, C, D, H, W]``, the identity at initialisation.

    Args:
        channels: feature channels C.
        num_heads: attention heads (C must be divisible by it).
        norm_groups: GroupNorm groups on the input of the attention.
    """

    def __init__(self, channels: int, num_heads: int = 4, norm_groups: int = 8):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.norm = nn.GroupNorm(min(norm_groups, channels), channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        t = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        t = t + depth_position_encoding(d, c, x.device, t.dtype)[None]
        a, _ = self.attn(t, t, t, need_weights=False)
        a = self.proj(a).reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)
        return x + a


class DepthConv(nn.Module):
    """Identity-initialised convolution across slices (kernel ``k`` along depth, 1x1 in-plane)."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[:, :, kernel // 2, 0, 0] = torch.eye(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SliceDepthConv(nn.Module):
    """:class:`DepthConv` on slice features ``[B*D, C, H, W]`` inside the 2D UNet; D is read from ``frames[0]``,
    a list shared with the :class:`PseudoThreeDUNet` that owns it (set at every forward; a deep copy of the whole
    model, such as the EMA copy, gets its own shared list)."""

    def __init__(self, channels: int, frames: list, kernel: int = 3):
        super().__init__()
        self.depth = DepthConv(channels, kernel)
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.frames[0]
        bd, c, h, w = x.shape
        v = x.reshape(bd // d, d, c, h, w).permute(0, 2, 1, 3, 4)
        return self.depth(v).permute(0, 2, 1, 3, 4).reshape(bd, c, h, w)


class PseudoThreeDUNet(nn.Module):
    """A 2D ``DiffusionModelUNet`` applied to latent slices, with 3D consistency blocks between its levels.

    ``forward(x [B, C, D, H, W], timesteps [B] (or [B * D]: one per slice, slice-major per sample), context [B, T, E]
    or None, context_mask [B, T] or None)``
    -> ``[B, C_out, D, H, W]``.
    The UNet sees ``B * D`` slices (timesteps and context repeated per slice); after the down blocks at
    ``levels`` (indices into ``unet.down_blocks``), after the middle block, and after the matching up
    blocks, the feature map is viewed as ``[B, C, D, h, w]`` and passed through the 3D blocks. The wrapper
    runs the UNet's own blocks in the UNet's order (no hooks, so copies such as an EMA model work).

    Args:
        unet: a MONAI ``DiffusionModelUNet`` with ``spatial_dims=2``.
        prior_skip: ``alphas_cumprod`` of the DDPM schedule, or ``None``: with it the output is
            ``sqrt(1 - alphas_cumprod[t]) x[:, :C_out] + UNet(...)`` (epsilon prediction around the unit-Gaussian prior).
        levels: resolution levels that get 3D blocks.
        mode: ``"attention"`` (SliceConsistencyAttention), ``"conv"`` (DepthConv, the seed's variant),
            ``"both"``, ``"conv_every"`` (a :class:`SliceDepthConv` after every 3x3 convolution of the UNet: the
            input conv, both convs of every ResBlock, the down/up-samplers and the output conv; ``levels`` is not
            used), or ``"none"`` (no 3D part: the 2D stage / the ablation).
    """

    MODES = ("attention", "conv", "both", "conv_every", "none")

    def __init__(
        self,
        unet: nn.Module,
        levels: Sequence[int] = (1, 2),
        mode: str = "attention",
        num_heads: int = 4,
        prior_skip: torch.Tensor | None = None,
    ):
        super().__init__()
        if mode not in self.MODES:
            raise OptionError(f"consistency must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.unet = unet
        # epsilon prediction = sqrt(1 - alpha_cumprod[t]) x_t (the optimal one for unit-Gaussian latents) + the UNet's
        # output: the zero-initialised output layer starts at that prior instead of at 0 noise. Not a weight (the
        # state dict is the same); the checkpoint's record says whether a model was trained with it.
        self.register_buffer("prior_skip", None if prior_skip is None else prior_skip.float(), persistent=False)
        self.mode = mode
        self.levels = tuple(int(i) for i in levels)
        chans = list(unet.block_out_channels)
        self.blocks3d = nn.ModuleDict()
        self._frames = [1]
        if mode == "conv_every":
            self._insert_depth_convs()
            return
        if mode == "none":
            return
        n = len(chans)
        for lvl in self.levels:
            if not 0 <= lvl < n:
                raise OptionError(
                    f"consistency_levels must be in 0 .. {n - 1} (the UNet's levels), got {list(self.levels)}"
                )
        if mode in ("attention", "both"):
            odd = {chans[lvl] for lvl in {*self.levels, n - 1} if chans[lvl] % min(num_heads, chans[lvl])}
            if odd:
                raise OptionError(
                    f"consistency {mode!r} attends with {num_heads} heads: unet_channels {chans} at the consistency "
                    f"levels (and the last) must be multiples of {num_heads}, got {sorted(odd)}"
                )
        names = {
            **{f"down{lvl}": chans[lvl] for lvl in self.levels},
            "mid": chans[-1],
            **{f"up{lvl}": chans[lvl] for lvl in self.levels},
        }
        for name, ch in names.items():
            parts = []
            if mode in ("conv", "both"):
                parts.append(DepthConv(ch))
            if mode in ("attention", "both"):
                parts.append(SliceConsistencyAttention(ch, num_heads=min(num_heads, ch)))
            self.blocks3d[name] = nn.Sequential(*parts)

    def _mix(self, name: str, h: torch.Tensor, d: int) -> torch.Tensor:
        """Apply the 3D block ``name`` (if any) to slice features ``[B*D, C, h, w]``."""
        if name not in self.blocks3d:
            return h
        bd, c, hh, ww = h.shape
        v = h.reshape(bd // d, d, c, hh, ww).permute(0, 2, 1, 3, 4)
        return self.blocks3d[name](v).permute(0, 2, 1, 3, 4).reshape(bd, c, hh, ww)

    def _insert_depth_convs(self) -> None:
        """Append a :class:`SliceDepthConv` to every MONAI ``Convolution`` whose 2D conv is 3x3 (state-dict keys of
        the 2D UNet stay as they are; the new ones end in ``.depth.*``)."""
        targets = [
            (name[: -len(".conv")], m.out_channels)
            for name, m in self.unet.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and name.endswith(".conv")
        ]
        for parent_name, ch in targets:
            parent = self.unet.get_submodule(parent_name)
            if not isinstance(parent, nn.Sequential):
                raise TypeError(f"{parent_name} is not a MONAI Convolution (nn.Sequential): cannot add a depth conv")
            parent.add_module("depth", SliceDepthConv(ch, self._frames))

    def parameters_3d(self):
        """Parameters of the 3D blocks only (stage 3d trains these, the 2D UNet stays frozen)."""
        inner = [p for m in self.unet.modules() if isinstance(m, SliceDepthConv) for p in m.parameters()]
        return iter(list(self.blocks3d.parameters()) + inner)

    def freeze_2d(self) -> None:
        """Stage 3d: freeze the 2D UNet's own weights, keep the 3D parts trainable."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.parameters_3d():
            p.requires_grad_(True)

    def load_unet_2d(self, state_dict: dict) -> None:
        """Load a 2D UNet state dict (a stage-2d checkpoint); only the depth convs inside the UNet may be missing."""
        missing, unexpected = self.unet.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if ".depth." not in k]
        if missing or unexpected:
            raise WeightsError(
                f"the stage-2d UNet weights do not fit this network (give stage 3d the stage-2d architecture): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context_mask [B, T]`` (1 = token, 0 = padding, padding on the right): samples with the same number
        of tokens run together with the padding cut off, so padded tokens are never attended to."""
        out = self._masked(x, timesteps, context, context_mask)
        if self.prior_skip is None:
            return out
        b, c, d = out.shape[:3]
        a = self.prior_skip[timesteps.reshape(-1).long()]
        a = a.view(b, 1, d, 1, 1) if a.numel() == b * d and d > 1 else a.view(b, 1, 1, 1, 1)
        return out + (1 - a).sqrt().to(out.dtype) * x[:, :c]

    def _masked(self, x, timesteps, context, context_mask) -> torch.Tensor:
        if context is not None and context_mask is not None and not bool(context_mask.all()):
            lengths = context_mask.sum(1)
            out = None
            for n in torch.unique(lengths).tolist():
                rows = torch.nonzero(lengths == n).flatten()
                if not bool(context_mask[rows, :n].all()):
                    raise ValueError("context_mask must mark the first tokens (padding on the right)")
                t = timesteps.reshape(x.shape[0], -1)[rows].reshape(-1) if timesteps.numel() > 1 else timesteps
                y = self._forward(x[rows], t, context[rows, :n])
                if out is None:
                    out = y.new_zeros((x.shape[0], *y.shape[1:]))
                out[rows] = y
            return out
        return self._forward(x, timesteps, context)

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """MONAI's DiffusionModelUNet forward on the ``B * D`` slices, with the 3D blocks between its levels."""
        b, c, d, h, w = x.shape
        u = self.unet
        self._frames[0] = d
        xs = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        t = timesteps.reshape(-1).repeat_interleave(d) if timesteps.numel() == b else timesteps.reshape(-1)
        ctx = context.repeat_interleave(d, 0) if context is not None else None
        emb = u.time_embed(get_timestep_embedding(t, u.block_out_channels[0]).to(xs.dtype))
        hs = u.conv_in(xs)
        skips = [hs]
        for i, block in enumerate(u.down_blocks):
            hs, res = block(hidden_states=hs, temb=emb, context=ctx)
            hs = self._mix(f"down{i}", hs, d)
            skips.extend(res)
        hs = self._mix("mid", u.middle_block(hidden_states=hs, temb=emb, context=ctx), d)
        n = len(u.up_blocks)
        for j, block in enumerate(u.up_blocks):
            k = -len(block.resnets)
            res, skips = skips[k:], skips[:k]
            hs = block(hidden_states=hs, res_hidden_states_list=res, temb=emb, context=ctx)
            hs = self._mix(f"up{n - 1 - j}", hs, d)
        y = u.out(hs)
        return y.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)
