"""LeanVAE behind the frozen-VAE interface: the released checkpoints (architecture from their ``args``), the official
latent normalisation, grey slices as RGB frames. The network itself: :mod:`fvae_ct.vae.leanvae_net`.
"""

from __future__ import annotations

import os

import torch

from .. import assets
from ..errors import WeightsError
from ..tiling import TilingConfig
from .base import FrozenVAE
from .leanvae_net import LeanVAENet, haar, inverse_haar

__all__ = ["LeanVAENet", "LeanVAE", "LEANVAE_CONFIGS", "haar", "inverse_haar"]

#: the official latent normalisation by latent width: ``norm_param`` of the LeanVAE repository's Latte training
#: configs (generation/Latte, ``vae.encode(x).mul_(norm_param)``): 0.7744 for dim4, 1.0 for dim16
LEANVAE_NORM_PARAM = {4: 0.7744, 16: 1.0}

#: Released configurations (the official defaults; only the latent width differs).
LEANVAE_CONFIGS = {
    f"dim{d}": dict(
        embedding_dim=512,
        latent_dim=d,
        ista_iter_num=2,
        ista_layer_num=2,
        l_dim=128,
        h_dim=384,
        sep_num_layer=2,
        fusion_num_layer=4,
    )
    for d in (4, 16)
}


def load_leanvae_checkpoint(path: str | os.PathLike) -> LeanVAENet:
    """Build the network from a checkpoint's ``args`` and load its ``state_dict`` strictly.

    State dicts in the training engine's naming (the model's keys under ``autoencoder.``, loss modules beside
    them) are accepted too: the ``autoencoder.`` entries are taken."""
    ckpt = assets.load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{path}: not a LeanVAE checkpoint (expected a dict with 'args' and 'state_dict')")
    args = ckpt.get("args")
    if not isinstance(args, dict):
        raise WeightsError(f"{path}: the checkpoint has no 'args' describing the architecture")
    state = ckpt["state_dict"]
    if any(k.startswith("autoencoder.") for k in state):
        state = {k[len("autoencoder.") :]: v for k, v in state.items() if k.startswith("autoencoder.")}
    names = (
        "embedding_dim",
        "latent_dim",
        "ista_iter_num",
        "ista_layer_num",
        "l_dim",
        "h_dim",
        "sep_num_layer",
        "fusion_num_layer",
    )
    missing = [k for k in names if k not in args]
    if missing:
        raise WeightsError(f"{path}: the checkpoint's args lack {missing}")
    try:
        net = LeanVAENet(**{k: int(args[k]) for k in names})
    except (TypeError, ValueError) as e:  # args that are not whole numbers, or do not make a LeanVAE
        raise WeightsError(f"{path}: the checkpoint's args do not describe a LeanVAE ({e})") from e
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit the LeanVAE architecture of its args: {e}") from e
    return net


class LeanVAE(FrozenVAE):
    """LeanVAE behind the frozen-VAE interface: grey slices -> RGB frames in [-0.5, 0.5], depth = time.

    Args:
        variant: ``"dim4"`` or ``"dim16"`` (latent channels), used to find the checkpoint.
        weights: checkpoint file, or a folder holding ``LeanVAE-{variant}.ckpt``; ``None``: the named asset
            (``$FVAE_ASSETS/weights/leanvae/``, the cache, or Hugging Face). ``model``: a ready :class:`LeanVAENet`.
        chunk: latent frames per streamed chunk (exact; bounds memory for long volumes), ``None`` = one pass.
        scale_factor: latent multiplier for diffusion (``encode_stage_2_inputs``); ``None``: the official
            :data:`LEANVAE_NORM_PARAM` of the checkpoint's width (the paper's CT diffusion uses 1.52 with dim16:
            fvae_ldm ``configs/paper.yaml`` fixes it there).
        dtype: parameter and compute dtype (fp32, bf16 or fp16).
    """

    spatial_factor = 8
    depth_factor = 4
    input_range = (-0.5, 0.5)
    working_memory = (0.0, 2.3e-6)  # make bench-video at 512^2

    def __init__(
        self,
        variant: str = "dim16",
        weights=None,
        model: LeanVAENet | None = None,
        chunk: int | None = 4,
        dtype: torch.dtype = torch.float32,
        tiling: TilingConfig | None = None,
        scale_factor: float | None = None,
        name: str | None = None,
    ):
        super().__init__(tiling=tiling)
        if model is None:
            model = load_leanvae_checkpoint(assets.weights_file(f"leanvae_{variant}", weights, assets.LEANVAE_PAGE))
        if scale_factor is None:  # the official latent normalisation of this width, when it has one
            scale_factor = LEANVAE_NORM_PARAM.get(model.latent_dim, 1.0)
        self.scale_factor = float(scale_factor)
        self.name = name or f"leanvae_dim{model.latent_dim}"
        self.latent_channels = model.latent_dim
        self.chunk, self.dtype = chunk, dtype
        self.model = model.to(dtype)
        self.freeze()

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x.expand(-1, 3, -1, -1, -1).to(self.dtype), self.chunk).float()

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z.to(self.dtype), self.chunk).float().mean(1, keepdim=True)
