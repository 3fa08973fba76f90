"""Workflows of the fvae_aug_seg bundle: datalists, reconstruction-view mixing and surface metrics
(``workflow``), synthetic lesion sets (``lesions``) and the ablation runner (``ablation``)."""

from .._lazy import lazy_submodules
from .workflow import *  # noqa: F401,F403
from .workflow import __all__

__getattr__ = lazy_submodules(__name__)
