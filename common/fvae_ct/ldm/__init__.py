"""Workflows of the fvae_ldm bundle: diffusion parts (``diffusion``: text encoder, mask latents, schedulers, training
batches; ``sampling``: guided sampling and long volumes) and the prepare / train / generate / evaluate workflows (``workflow``).
"""

from .._lazy import lazy_submodules
from .diffusion import *  # noqa: F401,F403
from .diffusion import __all__ as _diffusion_all
from .sampling import *  # noqa: F401,F403
from .sampling import __all__ as _sampling_all
from .workflow import *  # noqa: F401,F403
from .workflow import __all__ as _workflow_all

__all__ = [*_diffusion_all, *_sampling_all, *_workflow_all]

__getattr__ = lazy_submodules(__name__)
