"""fvae-ct: frozen natural-image/video foundation VAEs as one interface for 3D CT."""

__version__ = "0.1.0"
