"""Reproducible weights for parity checks against reference implementations.

:func:`keyed_weights` gives every parameter values drawn from a generator seeded by its *name*, so two
implementations of one architecture (ours and the official code) get identical weights whatever order they
create their modules in. ``tools/check_official_parity.py`` records the official outputs for such weights
in ``tests/fixtures/official_outputs.json``; the tests recompute them with our modules.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

__all__ = ["keyed_weights", "probe", "probe_input"]


def keyed_weights(net: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for ``net``: gains ~1 +- 0.2, biases ~ +-0.05, matrices / kernels ~ N(0, 1 / fan_in),
    scalars in [0.05, 0.5]; each tensor from a generator seeded by ``seed`` and the parameter's name."""
    out = {}
    for name, ref in net.state_dict().items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        shape = ref.shape
        if ref.numel() == 1:
            v = 0.05 + 0.45 * torch.rand(shape, generator=g)
        elif name.endswith("gamma") or (name.endswith("weight") and ref.ndim == 1):
            v = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            v = 0.05 * torch.randn(shape, generator=g)
        else:
            v = torch.randn(shape, generator=g) / (ref.numel() / shape[0]) ** 0.5
        out[name] = v.to(ref.dtype)
    return out


def probe_input(shape: tuple[int, ...], lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    """A reproducible uniform random tensor in [lo, hi)."""
    return lo + (hi - lo) * torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def probe(t: torch.Tensor, n: int = 64) -> dict:
    """Shape, mean, std and ``n`` evenly spaced values of ``t`` (what the output fixtures record)."""
    flat = t.detach().double().flatten()
    idx = torch.linspace(0, flat.numel() - 1, n).round().long()
    return {
        "shape": list(t.shape),
        "mean": flat.mean().item(),
        "std": flat.std().item(),
        "values": [float(f"{v:.7g}") for v in flat[idx].tolist()],
    }
