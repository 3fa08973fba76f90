"""Networks: 3D consistency across slices and the pseudo-3D latent denoiser."""

from .consistency import DepthConv, PseudoThreeDUNet, SliceConsistencyAttention, SliceDepthConv, depth_position_encoding

__all__ = ["DepthConv", "PseudoThreeDUNet", "SliceConsistencyAttention", "depth_position_encoding"]
