"""Workflows of the fvae_ldm bundle: diffusion parts (``diffusion``: text encoder, mask latents, schedulers, training
batches; ``sampling``: guided sampling and long volumes), the conditions (``conditioning``), the latent cache and the
training data (``latent_cache``), the denoiser and its checkpoints (``denoiser``, ``record``), generation (``generate``)
and the evaluation of generated volumes (``evaluate``; its metrics in ``fvd`` and ``generation_metrics``).
"""

from .._lazy import lazy_submodules
from .conditioning import *  # noqa: F401,F403
from .conditioning import __all__ as _conditioning_all
from .denoiser import *  # noqa: F401,F403
from .denoiser import __all__ as _denoiser_all
from .diffusion import *  # noqa: F401,F403
from .diffusion import __all__ as _diffusion_all
from .evaluate import *  # noqa: F401,F403
from .evaluate import __all__ as _evaluate_all
from .generate import *  # noqa: F401,F403
from .generate import __all__ as _generate_all
from .latent_cache import *  # noqa: F401,F403
from .latent_cache import __all__ as _latent_cache_all
from .record import *  # noqa: F401,F403
from .record import __all__ as _record_all
from .sampling import *  # noqa: F401,F403
from .sampling import __all__ as _sampling_all

__all__ = [
    *_diffusion_all,
    *_sampling_all,
    *_conditioning_all,
    *_latent_cache_all,
    *_denoiser_all,
    *_record_all,
    *_generate_all,
    *_evaluate_all,
]

__getattr__ = lazy_submodules(__name__)
