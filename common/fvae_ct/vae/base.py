"""The frozen-VAE interface every backend implements.

Tensor layout everywhere: MONAI channel-first volumes ``x: [B, 1, D, H, W]`` float32 in the backend's
``input_range`` (after the HU window), ``D`` = axial slices. Latents ``z: [B, C, d, h, w]`` with
``h = ceil(H / spatial_factor)``, ``w = ceil(W / spatial_factor)``; ``d = D`` for image autoencoders
(``depth_factor == 1``) and ``d = 1 + ceil((D - 1) / 4)`` for causal video VAEs (``depth_factor == 4``).

Backends implement ``_encode_aligned`` / ``_decode_aligned`` on inputs whose H, W are multiples of
``spatial_factor`` and whose depth is valid (1 + 4k for causal video VAEs); this class pads (by
replication) and crops, batches slices, and tiles ``reconstruct`` through :mod:`fvae_ct.tiling`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..tiling import TilingConfig, padded_depth_apply, windowed_apply

__all__ = ["FrozenVAE"]


class FrozenVAE(nn.Module, ABC):
    """A pretrained autoencoder, frozen and in eval mode, applied to grey CT volumes.

    Attributes set by subclasses: ``name``, ``latent_channels``, ``spatial_factor`` (8 or 16),
    ``depth_factor`` (1 for image AEs, 4 for causal video VAEs), ``input_range`` ((0, 1) or (-1, 1)).
    ``scale_factor`` multiplies latents in :meth:`encode_stage_2_inputs` (MONAI's LatentDiffusionInferer).
    ``working_memory``: what one reconstruct call needs in fp32, ``(a, b)`` for ``a + b * h * w`` GiB with slices of
    ``h x w`` pixels (a few slices; the video VAEs stream in chunks, so it grows little with depth), measured by each
    backend; ``None`` = unknown. :func:`fvae_ct.tiling.auto_tile_size` picks tiles from it.
    """

    name: str = "?"
    working_memory: tuple[float, float] | None = None
    latent_channels: int
    spatial_factor: int
    depth_factor: int
    input_range: tuple[float, float]

    def __init__(self, tiling: TilingConfig | None = None, scale_factor: float = 1.0):
        super().__init__()
        self.tiling = tiling or TilingConfig()
        self.scale_factor = float(scale_factor)

    # ---- frozen -------------------------------------------------------------------------------------
    def freeze(self) -> FrozenVAE:
        """Turn every parameter off and switch to eval mode (call at the end of a subclass ``__init__``)."""
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} ({self.name}) is a frozen foundation VAE and refuses to train")
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise RuntimeError(f"{type(self).__name__} ({self.name}) is frozen: its parameters never require grad")
        return super().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ---- backend hooks ------------------------------------------------------------------------------
    @abstractmethod
    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, D, H, W]`` aligned (H, W multiples of spatial_factor; valid D) -> ``[B, C, d, h, w]``."""

    @abstractmethod
    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, d, h, w]`` -> ``[B, 1, D, H, W]`` in ``input_range`` (channels already averaged)."""

    # ---- shapes -------------------------------------------------------------------------------------
    def aligned_depth(self, depth: int) -> int:
        """Smallest valid depth >= ``depth``: any for image AEs, 1 + 4k for causal video VAEs."""
        if self.depth_factor == 1:
            return depth
        return 1 + self.depth_factor * math.ceil((depth - 1) / self.depth_factor)

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent ``(d, h, w)`` for an input ``(D, H, W)``."""
        d, h, w = shape
        s = self.spatial_factor
        return ((self.aligned_depth(d) - 1) // self.depth_factor + 1, math.ceil(h / s), math.ceil(w / s))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Replicate-pad the last slice / last rows / last columns up to a valid, aligned shape."""
        _, _, d, h, w = x.shape
        s = self.spatial_factor
        pd, ph, pw = self.aligned_depth(d) - d, (-h) % s, (-w) % s
        if pd or ph or pw:
            x = F.pad(x, (0, pw, 0, ph, 0, pd), mode="replicate")
        return x

    @staticmethod
    def _check(x: torch.Tensor, what: str = "x") -> None:
        if x.ndim != 5:
            raise ValueError(f"{what} must be [B, C, D, H, W], got shape {tuple(x.shape)}")

    # ---- public interface ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (posterior mode) of ``x: [B, 1, D, H, W]`` in ``input_range``.

        Inputs that are not aligned are padded by replication; see :meth:`latent_shape`.
        """
        self._check(x)
        if x.shape[1] != 1:
            raise ValueError(f"expected one grey channel, got x with {x.shape[1]} channels")
        return self._encode_aligned(self._pad(x.to(self.device, torch.float32)))

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [B, C, d, h, w]`` -> ``[B, 1, D', H', W']`` in ``input_range`` at the aligned (padded) size."""
        self._check(z, "z")
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name} expects {self.latent_channels} latent channels, got {z.shape[1]}")
        return self._decode_aligned(z.to(self.device, torch.float32))

    def _reconstruct_window(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[2:]
        lo, hi = self.input_range
        y = self._decode_aligned(self._encode_aligned(self._pad(x)))
        return y[:, :, :d, :h, :w].clamp(lo, hi)

    def _split(self):
        """Optional: ``(enc_local, enc_global, dec_global, dec_local)`` for exact x-y tiling.

        Models with whole-image operations (GroupNorm statistics, attention) at their coarsest level give
        different results on tiles than on the whole slice. Backends that can split themselves into a
        heavy, local full-resolution part and a cheap, global low-resolution part return the four pieces
        (each ``[B, C, D, H, W] -> [B, C', D, H', W']``); ``reconstruct`` then tiles only the local parts and
        runs the global ones on the whole (small) low-resolution map. ``None``: tile the whole model.
        """
        return None

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, tiling: TilingConfig | None = None, progress: bool = False) -> torch.Tensor:
        """``decode(encode(x))`` cropped to ``x``'s shape and clamped to ``input_range``, memory-bounded.

        Image autoencoders (independent slices) run ``slice_batch`` slices at a time straight into the
        output; video VAEs run ``depth_window`` slices at a time, blended over ``depth_overlap``. Within a
        block, ``tile_size`` tiles x-y (see :class:`~fvae_ct.tiling.TilingConfig`). Besides one block's
        activations, memory holds the input, the output and, for video VAEs, MONAI's blending buffers.
        """
        self._check(x)
        t = tiling or self.tiling
        if self.device.type == "cuda" and x.device.type == "cpu":  # page-locked, asynchronous host -> GPU copy
            x = x.to(torch.float32).pin_memory().to(self.device, non_blocking=True)
        x = x.to(self.device, torch.float32)
        if self.depth_factor == 1:
            out = torch.empty_like(x)
            n = t.slice_batch
            for i in tqdm(
                range(0, x.shape[2], n), desc=f"{self.name} slices", unit="batch", disable=not progress, leave=False
            ):
                out[:, :, i : i + n] = self._reconstruct_block(x[:, :, i : i + n], t)
            return out
        if t.depth_last == "pad" and t.depth_window is not None:
            return padded_depth_apply(lambda v: self._reconstruct_block(v, t), x, int(t.depth_window))
        return windowed_apply(
            lambda v: self._reconstruct_block(v, t), x, t.depth_window, t.depth_overlap, None, 0, t.blend, progress
        )

    def _reconstruct_block(self, x: torch.Tensor, t: TilingConfig) -> torch.Tensor:
        """Reconstruct one depth block, tiled in x-y when ``t.tile_size`` is set."""
        if t.tile_size is None:
            return self._reconstruct_window(x)
        parts = self._split()
        if parts is None:
            return windowed_apply(self._reconstruct_window, x, None, 0, t.tile_size, t.tile_overlap, t.blend)
        enc_local, enc_global, dec_global, dec_local = parts
        s = self.spatial_factor
        tile = max(s, s * round(t.tile_size / s))  # tiles and overlaps on the latent grid
        ov = min(s * round(t.tile_overlap / s), tile - s)
        d, h, w = x.shape[2:]
        feats = windowed_apply(enc_local, self._pad(x), None, 0, tile, ov, t.blend)
        hidden = dec_global(enc_global(feats))
        y = windowed_apply(dec_local, hidden, None, 0, tile // s, ov // s, t.blend)
        lo, hi = self.input_range
        return y[:, :, :d, :h, :w].clamp(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    # ---- MONAI LatentDiffusionInferer hooks ----------------------------------------------------------
    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x) * self.scale_factor

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z / self.scale_factor)

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, latent_channels={self.latent_channels}, spatial_factor={self.spatial_factor}, "
            f"depth_factor={self.depth_factor}, input_range={self.input_range}"
        )
