"""Depth layouts of long-volume sampling: ``long_volume: chain`` (:func:`chain_windows`; the loop is in
:func:`fvae_ct.ldm.sample_latents`) and the official long-volume generation (``long_volume: official``;
``inference_CT_Gen_3d.py`` of the paper's code).

The official procedure: volumes are generated in image-space windows of ``window`` slices (65 = 17 LeanVAE latents),
each sampled, decoded and placed on its own:
1. pass 1: windows ``[0, 65), [65, 130), ...``, the last one right-aligned to the volume's end (it overlaps its
   predecessor; only its last ``D mod 65`` slices are kept). Window ``i > 0`` starts from fresh noise, but its first
   latent slice is the previous window's last latent (``re-injection``), noised before the first step with
   ``alpha_cumprod[T - 1]`` and after every DDIM step with ``alpha_cumprod[index]``, where ``index`` is the DDIM step
   index (``S - 1 .. 0``) looked up in the 1000-step table, as the official code does (not the step's timestep:
   from the first step on the slice is nearly clean). The last window gets the last non-last window's latent.
2. pass 2: the same on the volume from slice ``offset`` (32) on, with fresh noise;
3. fusion: around each pass-1 boundary ``b = 64 i + 1`` (the official ``compute_fusion_boundaries`` with latent
   length 16; the real pass-1 seams lie at ``65 i``), slices ``[b - 16, b + 16)`` are replaced by pass 2's (a hard
   swap, skipped where pass 2 does not cover them).
Everything depth-specific is here; the caller gives ``generate(start, stop, previous) -> (slices, last_latent)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import OptionError

__all__ = ["reinject", "pass_windows", "fusion_boundaries", "fuse", "official_long_volume", "chain_windows"]


def reinject(z: torch.Tensor, previous: torch.Tensor, alpha_cumprod: torch.Tensor, generator) -> torch.Tensor:
    """``z [B, C, d, h, w]`` with its first latent slice replaced by ``sqrt(a) previous + sqrt(1 - a) noise``
    (``previous [B, C, 1, h, w]``, ``a`` a scalar alpha_cumprod, noise from ``generator``)."""
    noise = torch.randn(previous.shape, generator=generator, device=generator.device).to(z.device, z.dtype)
    a = alpha_cumprod.to(z.device, z.dtype)
    z = z.clone()
    z[:, :, : previous.shape[2]] = a.sqrt() * previous.to(z.dtype) + (1 - a).sqrt() * noise
    return z


def pass_windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """``(start, stop, keep)`` of each window of one pass over ``n`` slices: slices ``[start, stop)`` are generated
    and the last ``keep`` of them placed (all but the right-aligned last window keep everything)."""
    if n <= window:
        return [(0, n, n)]
    iters = -(-n // window)
    out = [(i * window, (i + 1) * window, window) for i in range(iters - 1)]
    return out + [(n - window, n, n % window or window)]


def fusion_boundaries(iters: int, latent_length: int = 16, ratio: int = 4) -> list[int]:
    """The official seam positions ``i * latent_length * ratio + 1``, ``i = 1 .. iters - 1`` (65, 129, 193, ...)."""
    return [i * latent_length * ratio + 1 for i in range(1, iters)]


def fuse(vol1: torch.Tensor, vol2: torch.Tensor, boundaries, offset: int = 32, width: int = 16) -> torch.Tensor:
    """``vol1 [D, ...]`` with ``[b - width, b + width)`` around each boundary replaced by ``vol2`` (which starts at
    slice ``offset``), where ``vol2`` covers the whole range."""
    out = vol1.clone()
    for b in sorted(boundaries):
        lo, hi = max(0, b - width), min(b + width, vol1.shape[0])
        if lo - offset >= 0 and hi - offset <= vol2.shape[0]:
            out[lo:hi] = vol2[lo - offset : hi - offset]
    return out


def official_long_volume(
    generate: Callable[[int, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    depth: int,
    window: int = 65,
    offset: int | None = None,
    width: int = 16,
    latent_length: int = 16,
    ratio: int = 4,
) -> torch.Tensor:
    """A volume ``[depth, ...]`` by the official two-pass procedure (module docstring). ``generate(start, stop,
    previous)`` samples and decodes slices ``[start, stop)`` (``previous``: the latent slice to re-inject, or
    ``None``) and returns ``(slices [stop - start, ...], its last latent slice)``."""
    offset = window // 2 if offset is None else offset

    def one_pass(first: int) -> tuple[torch.Tensor, int]:
        n = depth - first
        wins = pass_windows(n, window)
        parts, previous = [], None
        for i, (start, stop, keep) in enumerate(wins):
            slices, last = generate(first + start, first + stop, previous)
            parts.append(slices[-keep:])
            if i < len(wins) - 1:
                previous = last
        return torch.cat(parts, 0), len(wins)

    vol1, iters = one_pass(0)
    if iters == 1 or depth - offset <= 0:
        return vol1
    vol2, _ = one_pass(offset)
    return fuse(vol1, vol2, fusion_boundaries(iters, latent_length, ratio), offset, width)


def chain_windows(depth: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """``(start, stop, known)`` of the windows of ``long_volume: chain``: the first window ``[0, window)`` has no known
    slices; each next one starts ``overlap`` slices before the previous one's end, whose slices it takes as given
    (``known = overlap``), and the last one is right-aligned to the volume's end (more known slices)."""
    if window >= depth:
        return [(0, depth, 0)]
    if not 0 < overlap < window:
        raise OptionError(
            f"depth_overlap must be in 1 .. depth_window - 1 ({window - 1}) for long_volume chain, got {overlap}"
        )
    out, end = [(0, window, 0)], window
    while end < depth:
        start = min(end - overlap, depth - window)
        out.append((start, start + window, end - start))
        end = start + window
    return out
