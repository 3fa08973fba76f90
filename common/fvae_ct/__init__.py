"""fvae-ct: frozen natural-image/video foundation VAEs as one interface for 3D CT.

Shared core (what at least two bundles use): ``vae`` (frozen-VAE interface, backends, registry), ``io``,
``tiling``, ``transforms``, ``metrics``, ``assets``, ``figures``, ``handlers``, ``bundle``. One subpackage per bundle's
workflows: ``recon`` (fvae_recon), ``aug_seg`` (fvae_aug_seg), ``ldm`` (fvae_ldm). ``cli`` is the ``fvae``
command. Submodules load on first use, so ``import fvae_ct`` in a bundle config is cheap.
"""

from ._lazy import lazy_submodules

__version__ = "0.2.0"

__getattr__ = lazy_submodules(__name__)
