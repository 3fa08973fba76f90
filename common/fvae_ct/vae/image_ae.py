"""Image autoencoders applied slice by slice (depth factor 1): the TAESD family, TAEF2 by default.

Each axial slice becomes an RGB image (grey replicated to 3 channels) in [0, 1]; output channels are
averaged back to grey. Slices run in batches of ``tiling.slice_batch`` in channels-last memory format
(about twice as fast as the default format for these 3x3 convolutions on CPU).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..tiling import TilingConfig
from .base import FrozenVAE
from .taesd import TAESDDecoder, TAESDEncoder

__all__ = ["TAESDVAE", "load_state_dict_checked"]

#: working memory of one reconstruct call per model (:attr:`fvae_ct.vae.base.FrozenVAE.working_memory`; make bench at
#: 512^2)
WORKING_MEMORY = {"taef2": (0.0, 3.0e-6)}


def load_state_dict_checked(module: torch.nn.Module, path: str | Path, what: str) -> None:
    """Load a ``.pth`` / ``.safetensors`` state dict into ``module`` strictly, with an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {what} weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickle refused by weights_only, ...
        raise WeightsError(f"{path}: cannot read {what} weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: {what} weights must be a state dict, got {type(sd).__name__}")
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:6]
        raise WeightsError(
            f"{path}: {what} weights do not fit the {type(module).__name__} architecture "
            f"(wrong model or variant?):\n" + "\n".join(first)
        ) from e


class TAESDVAE(FrozenVAE):
    """A TAESD-family image autoencoder behind the frozen-VAE interface.

    Args:
        encoder_weights, decoder_weights: state-dict files (``.pth`` or ``.safetensors``); ``None`` keeps
            the random initialisation (tests only).
        latent_channels: 4, 16 or 32 (TAEF2).
        pool_width: 256 for TAEF2's GroupNorm pre-branch, 0 for the other family members.
        width: block width (64 upstream; tests use smaller).
        autocast_dtype: e.g. ``torch.bfloat16``: weights stay fp32, the convolutions run under autocast (TAEF2 on
            the sample series: -0.05 dB, ``bench/bench_gpu.py --bf16-check-cpu``); ``None``: fp32.
    """

    spatial_factor = 8
    depth_factor = 1
    input_range = (0.0, 1.0)

    def __init__(
        self,
        encoder_weights: str | Path | None = None,
        decoder_weights: str | Path | None = None,
        latent_channels: int = 32,
        pool_width: int = 256,
        width: int = 64,
        name: str = "taef2",
        tiling: TilingConfig | None = None,
        scale_factor: float = 1.0,
        channels_last: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__(tiling=tiling, scale_factor=scale_factor)
        self.name = name
        self.working_memory = WORKING_MEMORY.get(name)
        self.autocast_dtype = autocast_dtype
        self.latent_channels = latent_channels
        self.encoder = TAESDEncoder(latent_channels, width=width, pool_width=pool_width)
        self.decoder = TAESDDecoder(latent_channels, width=width, pool_width=pool_width)
        if encoder_weights is not None:
            load_state_dict_checked(self.encoder, encoder_weights, f"{name} encoder")
        if decoder_weights is not None:
            load_state_dict_checked(self.decoder, decoder_weights, f"{name} decoder")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # torch's stubs omit memory_format
        self.freeze()

    def _slices(self, fn, v: torch.Tensor) -> torch.Tensor:
        """Run ``fn`` on ``v: [B, C, D, H, W]`` as batches of 2D slices; returns ``[B, C', D, H', W']``."""
        b, c, d, h, w = v.shape
        flat = v.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        n = self.tiling.slice_batch
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.autocast_dtype is not None:
            ctx = torch.autocast(device_type=v.device.type, dtype=self.autocast_dtype)
        with ctx:
            parts = [
                fn(flat[i : i + n].contiguous(memory_format=self.memory_format)) for i in range(0, flat.shape[0], n)
            ]
        out = torch.cat(parts).float()
        return out.reshape(b, d, *out.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def _split(self):
        """Encoder: full-resolution layers (local) | the GroupNorm-pool blocks + latent conv at 1/8 (global).
        Decoder: soft clamp, conv and the GroupNorm-pool blocks at 1/8 (global) | upsampling layers (local)."""
        enc, dec = list(self.encoder.children()), list(self.decoder.children())
        has_pool = [getattr(m, "pool", None) is not None for m in enc]
        e = has_pool.index(True) if any(has_pool) else len(enc)
        has_pool = [getattr(m, "pool", None) is not None for m in dec]
        k = len(has_pool) - has_pool[::-1].index(True) if any(has_pool) else 0
        enc_local, enc_global = nn.Sequential(*enc[:e]), nn.Sequential(*enc[e:])
        dec_global, dec_local = nn.Sequential(*dec[:k]), nn.Sequential(*dec[k:])
        return (
            lambda v: self._slices(lambda s: enc_local(s.expand(-1, 3, -1, -1)), v),
            lambda v: self._slices(enc_global, v),
            lambda v: self._slices(dec_global, v),
            lambda v: self._slices(lambda s: dec_local(s).mean(1, keepdim=True), v),
        )

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        return self._slices(lambda s: self.encoder(s.expand(-1, 3, -1, -1)), x)

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        return self._slices(lambda s: self.decoder(s).mean(1, keepdim=True), z)
