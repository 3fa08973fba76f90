"""Workflows of the fvae_recon bundle: reconstruction (``workflow``, with ``inputs``, ``preprocessing``, ``script``,
``summary``), the boundary-vs-noise analysis (``analysis``, ``tables``, ``analysis_figure``, ``denoisers`` and the
measures of ``boundary``, ``masks``, ``edges``, ``noise``) and the VAE comparison (``compare``).

``VAEReconInferer``, ``VAEReconstructd``, ``reconstruct_hu`` and ``RECON_SUFFIX`` live in the core
(:mod:`fvae_ct.reconstruct`, shared with fvae_aug_seg) and are re-exported here."""

from .._lazy import lazy_submodules
from ..reconstruct import RECON_SUFFIX, VAEReconInferer, VAEReconstructd, reconstruct_hu
from .inputs import datalist
from .preprocessing import recon_chain
from .workflow import BatchFailure, ReconWorkflow

__all__ = [
    "RECON_SUFFIX",
    "BatchFailure",
    "ReconWorkflow",
    "VAEReconInferer",
    "VAEReconstructd",
    "reconstruct_hu",
    "datalist",
    "recon_chain",
]

__getattr__ = lazy_submodules(__name__)
