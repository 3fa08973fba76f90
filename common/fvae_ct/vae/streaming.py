"""Exact chunk-by-chunk execution of causal video VAEs (IV-VAE, LeanVAE).

Both models only look back in time, so a clip can go through them a few frames at a time: each causal
temporal convolution keeps the last frames it saw in the previous chunk and uses them as its left context
in the next one. The result equals a whole-clip pass while memory holds one chunk's activations.
"""

from __future__ import annotations

import torch

__all__ = ["CausalStream", "per_frame"]


class CausalStream:
    """Left context of every causal temporal convolution of one encode or decode pass.

    Call :meth:`next_chunk` before each chunk. Inside a chunk, each causal convolution calls
    :meth:`exchange` once, always in the same order: it hands over the frames it must remember and gets back
    those it stored in the previous chunk (``None`` in the first chunk).
    """

    def __init__(self) -> None:
        self._frames: list[torch.Tensor] = []
        self._slot = 0
        self.chunk = -1

    @property
    def first(self) -> bool:
        """True while the first chunk (the clip's first frame group) runs."""
        return self.chunk == 0

    def next_chunk(self) -> None:
        self.chunk += 1
        self._slot = 0

    def peek(self) -> torch.Tensor | None:
        """What the next :meth:`exchange` will return (``None`` in the first chunk)."""
        if self.chunk < 0:
            raise RuntimeError("CausalStream.next_chunk() must be called before the first chunk")
        if self.first:
            return None
        if self._slot >= len(self._frames):
            raise RuntimeError("a chunk made more causal calls than the first one: the streaming order is broken")
        return self._frames[self._slot]

    def exchange(self, keep: torch.Tensor) -> torch.Tensor | None:
        """Store ``keep`` for this call site's next chunk; return what it stored in the previous one."""
        prev = self.peek()
        keep = keep.detach().clone()
        if self.first:
            self._frames.append(keep)
            return None
        self._frames[self._slot] = keep
        self._slot += 1
        return prev

    def prepend(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``x: [B, C, T, ...]`` with the ``n`` frames that precede it in the clip in front (zeros before the
        clip's start); the last ``n`` frames of the result are kept for the next chunk."""
        prev = self.peek()
        if prev is None:
            prev = x.new_zeros(*x.shape[:2], n, *x.shape[3:])
        y = torch.cat([prev, x], 2)
        self.exchange(y[:, :, -n:])
        return y


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module ``fn`` to every frame of ``x: [B, C, T, H, W]`` (frames batched)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)
