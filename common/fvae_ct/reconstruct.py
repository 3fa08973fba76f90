"""A CT volume through the frozen VAE and back to HU: the step the recon workflow and the segmentation bundle's
``online`` view share.

``VAEReconInferer`` runs ``vae.reconstruct`` with the tiling knobs; :func:`reconstruct_hu` wraps it in an invertible
preprocessing chain (HU window -> VAE range -> axial slices, and back); :class:`VAEReconstructd` is the same as a MONAI
dictionary transform. ``RECON_SUFFIX`` names the files the recon workflow writes and the segmentation bundle reads.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from .tiling import TilingConfig, auto_tile_size
from .transforms import DEFAULT_HU_WINDOW, recon_preprocessing
from .vae.base import FrozenVAE

__all__ = ["RECON_SUFFIX", "VAEReconInferer", "VAEReconstructd", "reconstruct_hu"]

log = logging.getLogger("fvae_ct")

#: ``<case><RECON_SUFFIX>``: the reconstruction of a case, as written by the recon workflow
RECON_SUFFIX = "_recon.nii.gz"


class VAEReconInferer(Inferer):
    """MONAI ``Inferer``: ``inferer(x, vae)`` = ``vae.reconstruct(x)`` with the tiling knobs of this object.

    ``x: [B, 1, D, H, W]`` in the VAE's input range -> same shape and range. ``tile_size="auto"``: whole slices on
    the CPU; on a GPU the tile edge :func:`fvae_ct.tiling.auto_tile_size` picks from the free GPU memory (whole
    slices when they fit), decided per call and kept in ``self.tiling``.
    """

    def __init__(
        self,
        tile_size: int | None = None,
        tile_overlap: int = 96,
        depth_window: int | None = None,
        depth_overlap: int = 4,
        slice_batch: int = 4,
        blend: str = "cosine",
        progress: bool = False,
        depth_last: str = "shift",
    ):
        super().__init__()
        self.auto = tile_size == "auto"
        tile_size = None if self.auto else tile_size
        self.tiling = TilingConfig(tile_size, tile_overlap, depth_window, depth_overlap, slice_batch, blend, depth_last)
        self.progress = progress

    # MONAI's Inferer takes any network callable; this one needs a FrozenVAE
    def __call__(self, inputs: torch.Tensor, network: FrozenVAE, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        if self.auto and network.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(network.device)
            h, w = inputs.shape[-2:]
            tile = auto_tile_size(network, h, w, free / 2**30)
            overlap = min(self.tiling.tile_overlap, tile // 2) if tile else self.tiling.tile_overlap
            self.tiling = replace(self.tiling, tile_size=tile, tile_overlap=overlap)
            log.info(
                "%s: %s (%.1f GiB free on %s)",
                network.name,
                f"tiles of {tile}" if tile else "whole slices",
                free / 2**30,
                network.device,
            )
        return network.reconstruct(inputs, tiling=self.tiling, progress=self.progress)


def reconstruct_hu(image: MetaTensor, network: FrozenVAE, preprocessing, inferer: VAEReconInferer) -> MetaTensor:
    """HU ``MetaTensor [1, X, Y, Z]`` -> reconstructed HU ``[1, X, Y, Z]`` (integer values, float dtype).

    ``preprocessing``: an invertible chain such as :func:`fvae_ct.transforms.recon_preprocessing` for this network
    (``d["image"]`` HU -> ``[1, D, H, W]`` in the VAE's range); its inverse puts the reconstruction back on the input's
    grid and makes it integer HU.
    """
    x = preprocessing({"image": image})["image"]
    y = inferer(x.as_tensor()[None].to(network.device), network)[0].cpu()
    pred = MetaTensor(y, meta=dict(x.meta), applied_operations=list(x.applied_operations))
    out = preprocessing.inverse({"image": pred})["image"]
    return MetaTensor(out.as_tensor(), meta=dict(image.meta))


class VAEReconstructd(MapTransform):
    """The frozen VAE as a MONAI dictionary transform: ``d[output_key] = reconstruction of d[key]`` (HU).

    For the ``online`` reconstruction view of segmentation training (GPU users). ``d[key]`` is an HU
    ``MetaTensor [1, X, Y, Z]``; the output has the same shape, affine and meta.
    """

    def __init__(
        self,
        keys,
        network: FrozenVAE,
        output_key: str = "image_recon",
        hu_window=DEFAULT_HU_WINDOW,
        working_spacing: float | None = None,
        inferer: VAEReconInferer | None = None,
    ):
        super().__init__(keys)
        self.network = network
        self.output_key = output_key
        self.inferer = inferer or VAEReconInferer()
        self.preprocessing = recon_preprocessing(
            "image", hu_window, network.input_range, working_spacing, check_hu=False
        )

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key])
            d[self.output_key] = reconstruct_hu(img, self.network, self.preprocessing, self.inferer)
        return d
