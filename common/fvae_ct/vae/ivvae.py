"""IV-VAE behind the frozen-VAE interface: the released checkpoints (the variant read from their shapes), the
published latent scale / shift, grey slices as RGB frames. The network itself: :mod:`fvae_ct.vae.ivvae_net`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import assets
from ..errors import WeightsError
from ..tiling import TilingConfig
from .base import FrozenVAE
from .ivvae_net import IVVAENet

__all__ = ["IVVAENet", "IVVAE", "IVVAE_VARIANTS"]

#: (z_dim, dim) -> (latent scale, latent shift), the constants published with the official code.
IVVAE_VARIANTS = {
    (4, 64): (1.3196, 0.1250),
    (8, 64): (1.0940, -0.0322),
    (16, 64): (0.9697, -0.1553),
    (16, 96): (0.7619, -0.0483),
}


def _load_state(path: Path) -> dict:
    state = assets.load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def _variant_in_folder(weights, z_dim: int | None, dim: int | None):
    """For a folder and an open variant: the one ``ivvae_z<z>_dim<d>.pth`` in it that fits ``z_dim`` / ``dim`` (the
    default z16 dim64 when it is among several); ``weights`` unchanged otherwise. Several that fit: an error listing
    them (name the variant, e.g. ``ivvae_z16_dim96``)."""
    if weights is None or not Path(weights).is_dir() or (z_dim is not None and dim is not None):
        return weights
    found = []
    for f in sorted(Path(weights).glob("ivvae_z*_dim*.pth")):
        m = re.fullmatch(r"ivvae_z(\d+)_dim(\d+)\.pth", f.name)
        if m and (z_dim or int(m.group(1))) == int(m.group(1)) and (dim or int(m.group(2))) == int(m.group(2)):
            found.append(f)
    if len(found) == 1:
        return found[0]
    default = Path(weights) / f"ivvae_z{z_dim or 16}_dim{dim or 64}.pth"
    if len(found) > 1 and default not in found:
        raise WeightsError(
            f"{weights}: holds several IV-VAE checkpoints ({', '.join(f.name for f in found)}): name the variant, "
            "e.g. --vae ivvae_z16_dim96"
        )
    return weights


class IVVAE(FrozenVAE):
    """IV-VAE behind the frozen-VAE interface: grey slices -> RGB frames in [-1, 1], depth = time.

    Args:
        z_dim, dim: the variant (4/64, 8/64, 16/64, 16/96); read from the checkpoint when ``None``.
        weights: checkpoint file, or a folder holding ``ivvae_z{z}_dim{d}.pth``; ``None``: the named asset
            (``$FVAE_ASSETS/weights/ivvae/``, the cache, or ModelScope). ``model``: a ready :class:`IVVAENet`.
        latent_scale, latent_shift: override the published constants (needed for other variants).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (the official inference dtype) parameters and compute.
    """

    spatial_factor = 8
    depth_factor = 4
    input_range = (-1.0, 1.0)
    working_memory = (0.0, 2.1e-5)  # make bench-video at 512^2

    def __init__(
        self,
        z_dim: int | None = None,
        dim: int | None = None,
        weights=None,
        model: IVVAENet | None = None,
        latent_scale: float | None = None,
        latent_shift: float | None = None,
        dtype: torch.dtype = torch.float32,
        tiling: TilingConfig | None = None,
        scale_factor: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(tiling=tiling, scale_factor=scale_factor)
        if model is None:
            weights = _variant_in_folder(weights, z_dim, dim)
            path = assets.weights_file(f"ivvae_z{z_dim or 16}_dim{dim or 64}", weights, assets.IVVAE_PAGE)
            state = _load_state(path)
            try:
                found = (
                    int(state["conv2.conv_2d.weight"].shape[1]),
                    int(state["encoder.conv1.conv_2d.weight"].shape[0]),
                )
            except KeyError as e:
                raise WeightsError(f"{path}: not an IV-VAE checkpoint (no {e.args[0]})") from e
            if found != (z_dim or found[0], dim or found[1]):
                raise WeightsError(f"{path}: holds IV-VAE z{found[0]} dim{found[1]}, not z{z_dim} dim{dim}")
            try:
                model = IVVAENet(*found)
                model.load_state_dict(state, strict=True)
            except ValueError as e:  # odd widths: no IV-VAE
                raise WeightsError(f"{path}: holds z{found[0]} dim{found[1]}, which is no IV-VAE ({e})") from e
            except RuntimeError as e:
                raise WeightsError(f"{path}: does not fit IV-VAE z{found[0]} dim{found[1]}: {e}") from e
        key = (model.z_dim, model.dim)
        if latent_scale is None or latent_shift is None:
            if key not in IVVAE_VARIANTS:
                raise WeightsError(
                    f"IV-VAE z{key[0]} dim{key[1]} has no published latent scale/shift: give "
                    "latent_scale and latent_shift"
                )
            latent_scale = IVVAE_VARIANTS[key][0] if latent_scale is None else latent_scale
            latent_shift = IVVAE_VARIANTS[key][1] if latent_shift is None else latent_shift
        self.name = name or f"ivvae_z{key[0]}_dim{key[1]}"
        self.latent_channels = model.z_dim
        self.latent_scale, self.latent_shift = float(latent_scale), float(latent_shift)
        self.dtype = dtype
        self.model = model.to(dtype)
        self.freeze()

    def _encode_aligned(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.model.posterior_mean(x.expand(-1, 3, -1, -1, -1).to(self.dtype)).float()
        return self.latent_scale * (mean - self.latent_shift)

    def _decode_aligned(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.latent_scale + self.latent_shift
        return self.model.decode(z.to(self.dtype)).float().mean(1, keepdim=True)
