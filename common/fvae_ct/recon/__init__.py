"""Workflows of the fvae_recon bundle: reconstruction (``workflow``), the boundary-vs-noise analysis
(``analysis``, ``denoisers``, ``boundary``) and the VAE comparison (``compare``)."""

from .._lazy import lazy_submodules
from .workflow import RECON_SUFFIX, BatchFailure, ReconWorkflow, VAEReconInferer, VAEReconstructd, reconstruct_hu

__all__ = ["RECON_SUFFIX", "BatchFailure", "ReconWorkflow", "VAEReconInferer", "VAEReconstructd", "reconstruct_hu"]

__getattr__ = lazy_submodules(__name__)
