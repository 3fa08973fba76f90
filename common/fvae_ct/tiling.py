"""Memory-bounded execution of a volume-to-volume function: the one tiling helper of the project.

The volume ``x: [B, C, D, H, W]`` is cut into windows of ``depth_window`` slices x ``tile_size``^2 pixels
with overlaps, each window goes through ``fn`` on its own, and the outputs are blended back with a
raised-cosine, gaussian or flat weight, using MONAI's :func:`monai.inferers.sliding_window_inference`. Peak
activation memory is that of one window, whatever the number of slices; only the input and output
volumes themselves grow with the volume.

Measured on real CT with TAEF2 (512x512 slices): tiles of 256 with 96 voxels of overlap and cosine
blending land within 0.05 dB PSNR of the untiled result (65 dB agreement between the two outputs);
MONAI's gaussian map with 64 voxels of overlap was 0.2 dB off (54 dB agreement).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from monai.inferers import sliding_window_inference

from .errors import OptionError

__all__ = ["TilingConfig", "windowed_apply", "depth_window_starts", "shifted_depth_apply"]


def _whole(option: str, value) -> int:
    """``value`` as an integer (``8``, ``8.0``, ``"8"``), else an :class:`OptionError` naming ``option``."""
    try:
        n = int(value)
        ok = not isinstance(value, bool) and float(value) == n
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OptionError(f"{option} {value!r}: give a whole number of voxels")
    return n


@dataclass
class TilingConfig:
    """Knobs of :func:`windowed_apply` (all sizes in voxels of the array given to the VAE).

    - ``tile_size``: edge of an x-y tile; ``None`` = whole slice.
    - ``tile_overlap``: overlap between neighbouring x-y tiles.
    - ``depth_window``: slices per window for video VAEs; ``None`` = whole volume. Image autoencoders
      treat slices independently and use ``slice_batch`` instead.
    - ``depth_overlap``: overlap between depth windows (video VAEs).
    - ``depth_last``: ``"shift"`` (default: the last depth window is moved back to end at the last slice, so
      every window is full) or ``"pad"`` (the paper's protocol: non-overlapping windows from slice 0, the last
      one padded to ``depth_window`` by repeating its last slice, and cropped; needs ``depth_overlap`` 0).
    - ``slice_batch``: slices per forward pass for image autoencoders.
    - ``blend``: ``"cosine"`` (default: raised-cosine cross-fade over the overlap, ~0 weight at tile
      borders), ``"gaussian"`` (MONAI's gaussian importance map) or ``"constant"`` (plain average).
    """

    tile_size: int | None = None
    tile_overlap: int = 96
    depth_window: int | None = None
    depth_overlap: int = 4
    slice_batch: int = 4
    blend: str = "cosine"
    depth_last: str = "shift"

    def __post_init__(self):
        for k in ("tile_size", "depth_window", "tile_overlap", "depth_overlap", "slice_batch"):
            v = getattr(self, k)
            if v is not None or k not in ("tile_size", "depth_window"):
                setattr(self, k, _whole(k, v))
        for k in ("tile_size", "depth_window"):
            v = getattr(self, k)
            if v is not None and int(v) < 1:
                raise OptionError(f"{k} must be a positive number of voxels or None, got {v}")
        if self.slice_batch < 1:
            raise OptionError(f"slice_batch must be >= 1, got {self.slice_batch}")
        if self.tile_overlap < 0 or self.depth_overlap < 0:
            raise OptionError("tile_overlap and depth_overlap must be >= 0")
        if self.tile_size is not None and self.tile_overlap >= self.tile_size:
            raise OptionError(f"tile_overlap ({self.tile_overlap}) must be smaller than tile_size ({self.tile_size})")
        if self.depth_window is not None and self.depth_overlap >= self.depth_window:
            raise OptionError(
                f"depth_overlap ({self.depth_overlap}) must be smaller than depth_window ({self.depth_window})"
            )
        if self.depth_last not in ("shift", "pad"):
            raise OptionError(f"depth_last must be 'shift' or 'pad', got {self.depth_last!r}")
        if self.depth_last == "pad" and self.depth_overlap != 0:
            raise OptionError(
                f"depth_last 'pad' takes non-overlapping windows: give depth_overlap 0, not {self.depth_overlap}"
            )
        if self.blend not in ("cosine", "gaussian", "constant"):
            raise OptionError(f"blend must be 'cosine', 'gaussian' or 'constant', got {self.blend!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def auto_tile_size(vae, h: int, w: int, free_gib: float, safety: float = 0.6) -> int | None:
    """The x-y tile edge for a VAE on a device with ``free_gib`` free: ``None`` (whole slices) when its estimated working
    memory fits ``safety * free_gib``, else the largest multiple of 64 that fits (at least 128). ``None`` too for a VAE
    without an estimate.

    ``vae``: a frozen VAE, whose backend declares ``working_memory`` (:class:`fvae_ct.vae.base.FrozenVAE`), or that
    estimate itself, ``(a, b)`` for ``a + b * h * w`` GiB (``None``: unknown). The estimates are CPU-measured peak RSS;
    a GPU adds cuDNN workspaces, hence the safety factor.
    """
    estimate = vae if vae is None or isinstance(vae, tuple) else getattr(vae, "working_memory", None)
    if estimate is None:
        return None
    a, b = estimate
    budget = safety * free_gib
    if a + b * h * w <= budget:
        return None
    edge = math.sqrt(max(budget - a, 0.0) / b) if b > 0 else max(h, w)
    return max(128, int(edge // 64) * 64)


def _window(size: int, window: int | None, overlap: int) -> tuple[int, float]:
    """(roi edge, overlap fraction) for one axis; a window >= the axis means one window, no overlap."""
    if window is None or window >= size:
        return size, 0.0
    return window, overlap / window


def ramp_weights(roi: tuple[int, ...], overlaps: tuple[int, ...]) -> torch.Tensor:
    """Separable blending weights for one window: 1 inside, a raised-cosine ramp to ~0 across each overlap band.

    Tile borders, where zero padding distorts a convolutional network most, get almost no weight; where
    two windows overlap their weights sum to about 1 (a smooth cross-fade).
    """
    w = torch.ones(roi, dtype=torch.float32)
    for axis, (n, ov) in enumerate(zip(roi, overlaps)):
        if ov <= 0 or n <= 1:
            continue
        i = torch.arange(n, dtype=torch.float32)
        edge = torch.clamp(torch.minimum(i + 0.5, n - i - 0.5) / ov, max=1.0)
        r = torch.sin(edge * torch.pi / 2) ** 2
        shape = [1] * len(roi)
        shape[axis] = n
        w = w * r.view(shape)
    return w


def windowed_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    depth_window: int | None,
    depth_overlap: int,
    tile_size: int | None,
    tile_overlap: int,
    blend: str = "cosine",
    progress: bool = False,
) -> torch.Tensor:
    """Apply a shape-preserving ``fn`` to ``x: [B, C, D, H, W]`` window by window and blend the results.

    ``fn`` receives windows ``[B, C, d, h, w]`` (d <= depth_window, h, w <= tile_size) and must return the
    same shape. Windows run one at a time. Returns a tensor of ``x``'s shape on ``x``'s device.
    """
    if x.ndim != 5:
        raise ValueError(f"expected x of shape [B, C, D, H, W], got {tuple(x.shape)}")
    _, _, d, h, w = x.shape
    rd, od = _window(d, depth_window, depth_overlap)
    rh, oh = _window(h, tile_size, tile_overlap)
    rw, ow = _window(w, tile_size, tile_overlap)
    if (rd, rh, rw) == (d, h, w):
        return fn(x)
    weights = None
    if blend == "cosine":
        weights = ramp_weights((rd, rh, rw), tuple(int(round(o * r)) for o, r in zip((od, oh, ow), (rd, rh, rw))))
        weights = weights.to(x.device)
    out = sliding_window_inference(
        x,
        roi_size=(rd, rh, rw),
        sw_batch_size=1,
        predictor=fn,
        overlap=(od, oh, ow),
        mode="constant" if blend == "cosine" else blend,
        sigma_scale=0.25,
        padding_mode="replicate",
        progress=progress,
        roi_weight_map=weights,
    )
    assert isinstance(out, torch.Tensor)  # a tensor-valued fn gives a tensor (not a tuple or dict)
    return out


def padded_depth_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: int) -> torch.Tensor:
    """``fn`` on non-overlapping depth windows ``[k * window, (k + 1) * window)`` of ``x: [B, C, D, H, W]``, each
    run on its own (a causal video VAE restarts its chain in every window); the last window is padded to ``window``
    slices by repeating its last slice and cropped back. The reconstruction script of the paper's protocol."""
    out = []
    for a in range(0, x.shape[2], window):
        v = x[:, :, a : a + window]
        n = v.shape[2]
        if n < window:
            v = torch.cat([v, v[:, :, -1:].expand(-1, -1, window - n, -1, -1)], dim=2)
        out.append(fn(v)[:, :, :n])
    return torch.cat(out, dim=2)


def depth_window_starts(depth: int, window: int, overlap: int, offset: int = 0) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of depth windows with stride ``window - overlap`` whose grid is shifted by ``offset``
    (0 <= offset < stride): windows cut by the volume's ends are shorter; together they cover ``0 .. depth``."""
    if window >= depth:
        return [(0, depth)]
    stride = window - overlap
    first = offset - stride * math.ceil(offset / stride) if offset else 0
    out = []
    for s in range(first, depth, stride):
        a, b = max(s, 0), min(s + window, depth)
        if b > a:
            out.append((a, b))
        if b >= depth:
            break
    return out


def shifted_depth_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: int | None, overlap: int, offset: int = 0
) -> torch.Tensor:
    """``fn`` on depth windows of ``x: [B, C, D, H, W]`` (grid shifted by ``offset``, see
    :func:`depth_window_starts`), blended with a raised-cosine ramp over ``overlap`` at window edges inside the volume
    (full weight at the volume's own ends). For iterative samplers that move the window grid from step to step, so
    that window edges, where a depth-coupled model sees least context, never stay on the same slices."""
    d = x.shape[2]
    if window is None or window >= d:
        return fn(x)
    acc: torch.Tensor | None = None
    wsum: torch.Tensor | None = None
    for a, b in depth_window_starts(d, int(window), int(overlap), int(offset)):
        y = fn(x[:, :, a:b])
        n = b - a
        i = torch.arange(n, dtype=torch.float32, device=x.device)
        w = torch.ones(n, device=x.device)
        if overlap > 0:
            if a > 0:
                w = w * torch.sin(torch.clamp((i + 0.5) / overlap, max=1.0) * math.pi / 2) ** 2
            if b < d:
                w = w * torch.sin(torch.clamp((n - i - 0.5) / overlap, max=1.0) * math.pi / 2) ** 2
        w = w.view(1, 1, n, 1, 1).to(y.dtype)
        if acc is None or wsum is None:
            acc = y.new_zeros((*y.shape[:2], d, *y.shape[3:]))
            wsum = y.new_zeros((1, 1, d, 1, 1))
        acc[:, :, a:b] += y * w
        wsum[:, :, a:b] += w
    assert acc is not None and wsum is not None  # window < d: at least one window
    return acc / wsum
