"""Metrics: reconstruction protocol (PSNR / SSIM / MSE)."""

from .recon import PROTOCOL, psnr, recon_metrics, ssim, ssim_unavailable

__all__ = ["PROTOCOL", "psnr", "recon_metrics", "ssim", "ssim_unavailable"]
