"""fvae-ct: frozen natural-image/video foundation VAEs as one interface for 3D CT."""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    """Submodules load on first use (``fvae_ct.seg.build_datalists`` in a bundle config after ``import fvae_ct``)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        raise AttributeError(f"module 'fvae_ct' has no attribute {name!r}") from e
