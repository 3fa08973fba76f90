"""Closed-form denoisers of Gaussian latent priors: the references the sampler and the learning demo are measured
against.

- :class:`GaussianDepthDenoiser`: the optimal noise prediction for a prior that is Gaussian along depth (covariance
  ``cov(i, j)`` of slice positions, e.g. :func:`ar1` or :func:`sq_exp`; unit variance; every channel and pixel
  independent), computed on whatever window it is given and with one timestep per slice, as a network trained on
  windows would be at best. It tests long-volume sampling: its whole-volume samples follow the prior.
- :class:`GaussianPriorDenoiser`: no learning at all: the optimal denoiser if the latents were Gaussian with a
  given mean and variance per channel (or per channel x depth position), independent across voxels. The baseline a
  trained denoiser must beat.
- :func:`depth_statistics`: per-slice variance, lag-k autocorrelation along depth and seam ratios of samples.

Noise prediction of a Gaussian prior ``x ~ N(mu, S)`` observed as ``y = sqrt(a) x + sqrt(1 - a) eps`` (per-slice
``a``): ``x_hat = mu + (S^-1 + diag(a / (1 - a)))^-1 diag(sqrt(a) / (1 - a)) (y - sqrt(a) mu)``,
``eps_hat = (y - sqrt(a) x_hat) / sqrt(1 - a)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["ar1", "sq_exp", "GaussianDepthDenoiser", "GaussianPriorDenoiser", "depth_statistics"]


def ar1(rho: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Covariance of a unit-variance AR(1) process along depth: ``rho ** |i - j|`` (Markov)."""
    return lambda i: rho ** (i[:, None] - i[None]).abs()


def sq_exp(length: float, nugget: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """A smooth, non-Markov covariance: ``exp(-(i - j)^2 / (2 length^2))`` (+ ``nugget`` on the diagonal)."""
    return lambda i: torch.exp(-0.5 * ((i[:, None] - i[None]) / length) ** 2) + nugget * torch.eye(len(i)).to(i)


def _schedule(alphas_cumprod: torch.Tensor | None) -> torch.Tensor:
    """The given ``alphas_cumprod``, or the bundle's DDPM schedule's."""
    if alphas_cumprod is not None:
        return alphas_cumprod
    from .diffusion import make_scheduler

    return make_scheduler().alphas_cumprod


class GaussianDepthDenoiser(torch.nn.Module):
    """``forward(x [B, C, d, h, w], t, context=None, context_mask=None) -> eps_hat`` for the prior ``N(0, cov)`` along
    depth; ``t``: ``[B]`` (one timestep per window) or ``[B * d]`` (one per slice, slice-major per sample; 0 = a
    given, nearly clean slice). ``alphas_cumprod``: the training schedule's (default: the bundle's DDPM)."""

    def __init__(self, cov: Callable[[torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # samplers read the device from a parameter
        self.alphas = _schedule(alphas_cumprod).double()
        self.cov = cov
        self._cache: dict = {}

    def matrix(self, t_row: Sequence[int]) -> torch.Tensor:
        """``[d, d]`` map from the noisy window to ``eps_hat`` for per-slice timesteps ``t_row``."""
        key = tuple(int(v) for v in t_row)
        if key not in self._cache:
            d = len(key)
            a = self.alphas[list(key)]
            s = self.cov(torch.arange(d, dtype=torch.float64))
            q = torch.linalg.inv(s) + torch.diag(a / (1 - a))
            post = torch.linalg.solve(q, torch.diag(a.sqrt() / (1 - a)))  # x_hat = post @ y
            eye = torch.eye(d, dtype=torch.float64)
            self._cache[key] = (eye - a.sqrt()[:, None] * post) / (1 - a).sqrt()[:, None]
        return self._cache[key]

    def forward(self, x, t, context=None, context_mask=None):
        b, d = x.shape[0], x.shape[2]
        t = torch.as_tensor(t).reshape(-1)
        rows = t.reshape(b, d) if t.numel() == b * d and d > 1 else t.reshape(-1, 1).expand(b, d)
        out = torch.empty_like(x)
        for i in range(b):
            out[i] = torch.einsum("ij,cjhw->cihw", self.matrix(rows[i].tolist()), x[i].double()).to(x.dtype)
        return out


class GaussianPriorDenoiser(torch.nn.Module):
    """The optimal denoiser of independent Gaussian latents with mean ``mean`` and variance ``var`` per channel
    (``[C]``) or per channel x depth position (``[C, d]``, windows of exactly ``d`` slices):
    ``forward(x [B, C(+K), d, h, w], t [B] or [B * d], ...) -> eps_hat [B, C, d, h, w]`` (extra mask channels and the
    text are ignored)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # samplers read the device from a parameter
        self.register_buffer("alphas", _schedule(alphas_cumprod).float())
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("var", torch.as_tensor(var, dtype=torch.float32))

    def forward(self, x, t, context=None, context_mask=None):
        c, b, d = self.mean.shape[0], x.shape[0], x.shape[2]
        x = x[:, :c]
        shape = (1, c, 1, 1, 1) if self.mean.ndim == 1 else (1, c, self.mean.shape[1], 1, 1)
        mu, var = self.mean.view(shape), self.var.view(shape)
        t = torch.as_tensor(t, device=x.device).reshape(-1).long()
        a = self.alphas[t].view(b, 1, d, 1, 1) if t.numel() == b * d and d > 1 else self.alphas[t].view(b, 1, 1, 1, 1)
        x_hat = mu + a.sqrt() * var / (a * var + 1 - a) * (x - a.sqrt() * mu)
        return (x - a.sqrt() * x_hat) / (1 - a).sqrt()


def depth_statistics(samples: torch.Tensor, lags: Sequence[int] = (1, 4, 8), seams: Sequence[int] = ()) -> dict:
    """Statistics along depth of zero-mean samples ``[N, d, h, w]`` (all seeds and channels stacked on N).

    Returns ``var`` (mean per-slice second moment), ``var_per_slice`` ``[d]``, ``ac<k>`` (lag-k autocorrelation:
    ``mean(z[k:] z[:-k]) / mean(z^2)``), and for ``seams`` (slice indices ``s`` where a window's generated slices start
    or a blend band lies: the gap ``s - 1 -> s``) ``seam_ratio`` (mean ``|z[s] - z[s - 1]|`` over the seam gaps
    divided by the mean over gaps at least 2 away from any seam; ``step`` and ``seam_step``: the mean over all gaps and
    over the seam gaps) and ``band_var_ratio`` (per-slice variance of slices ``s - 1, s`` over the others)."""
    z = samples.double()
    m2 = (z**2).mean((0, 2, 3))
    out = {"var": float(m2.mean()), "var_per_slice": m2}
    for k in lags:
        out[f"ac{k}"] = float((z[:, k:] * z[:, :-k]).mean() / (z**2).mean())
    if seams:
        d = z.shape[1]
        gaps = (z[:, 1:] - z[:, :-1]).abs().mean((0, 2, 3))  # gap g = slices g -> g + 1
        seam_gaps = sorted({s - 1 for s in seams if 0 < s < d})
        far = [g for g in range(1, d - 2) if all(abs(g - s) >= 2 for s in seam_gaps)]
        band = sorted({j for s in seam_gaps for j in (s, s + 1)})
        rest = [j for j in range(d) if j not in band]
        out["seam_ratio"] = float(gaps[seam_gaps].mean() / gaps[far].mean())
        out["step"], out["seam_step"] = float(gaps.mean()), float(gaps[seam_gaps].mean())
        out["band_var_ratio"] = float(m2[band].mean() / m2[rest].mean())
    return out
