"""Sampling of the fvae_ldm denoiser: classifier-free guidance, DDIM / rectified flow, and long volumes.

Latents ``z: [B, C, d, h, w]`` (scaled). A volume longer than the model's depth window is generated in one of three
ways (``long_volume``), compared with an exact depth-coupled denoiser in ``tests/test_ldm_seams.py`` and the LDM
README:

- ``chain`` (default): windows one after another; each window after the first takes the last ``depth_overlap``
  slices of the one before as given (clean, timestep 0 on those slices) and generates the rest conditioned on them,
  starting from the noise level's mean given them. Long-range correlation carries along the chain;
- ``blend``: all windows at every step, predictions blended with a cosine cross-fade (``depth_shift``: the window
  grid moves every step). Every window sees only itself, so correlations longer than a window are lost;
- ``official``: the paper's two passes of image-space windows (:mod:`fvae_ct.ldm.long_volume`; the workflow runs
  it, one window per call with ``previous`` re-injected).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import RFlowScheduler

from ..errors import OptionError
from ..options import parse_bool
from ..tiling import TilingConfig, shifted_depth_apply
from .diffusion import make_scheduler, null_text
from .long_volume import chain_windows, reinject

__all__ = ["LONG_VOLUME", "SamplingInferer", "guided_prediction", "sample_latents"]

#: the long-volume modes, the default first
LONG_VOLUME = ("chain", "blend", "official")


class SamplingInferer(Inferer):
    """Inference: ``inferer(z_shape, network, mask=..., context=..., context_mask=...)`` -> generated latents
    ``[B, C, d, h, w]`` (scaled) by :func:`sample_latents`: DDIM (``ddpm``) or rectified flow, classifier-free
    guidance, long volumes by ``long_volume`` (module docstring; ``depth_overlap=None``: half the window).
    ``z_shape``: a shape or a tensor of that shape. ``record``: the checkpoint's training record; ``chain`` warns once
    when it shows the model was not trained with clean context slices (``p_context``)."""

    def __init__(
        self,
        scheduler: str = "ddpm",
        steps: int = 20,
        guidance: float = 2.0,
        seed: int = 0,
        depth_window: int | None = 16,
        depth_overlap: int | None = None,
        progress: bool = True,
        depth_shift: bool = True,
        eta: float = 0.0,
        ddim_spacing: str = "ldm",
        long_volume: str = "chain",
        record: dict | None = None,
    ):
        super().__init__()
        if long_volume not in LONG_VOLUME:
            raise OptionError(f"long_volume must be one of {', '.join(LONG_VOLUME)}, got {long_volume!r}")
        self.long_volume = long_volume
        if depth_overlap is None:  # half the window
            depth_overlap = int(depth_window) // 2 if depth_window else 0
        TilingConfig(depth_window=depth_window, depth_overlap=depth_overlap)  # the same checks as everywhere
        if long_volume == "chain" and depth_window and int(depth_overlap) < 1:
            raise OptionError(
                "long_volume chain conditions each window on the previous one: depth_overlap must be >= 1"
            )
        self.scheduler = make_scheduler(scheduler, sampler=True, ddim_spacing=ddim_spacing)
        n = self.scheduler.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= n:
            raise OptionError(f"steps must be an integer in 1 .. {n} (the training timesteps), got {steps!r}")
        if float(eta) and scheduler == "rflow":
            raise OptionError(f"eta applies to DDIM sampling (scheduler ddpm), not to rectified flow: got eta {eta!r}")
        if long_volume == "official" and scheduler == "rflow":
            raise OptionError(
                "long_volume official re-injects the previous window's last latent the DDIM way: it needs scheduler "
                "ddpm, got rflow (or use long_volume chain / blend)"
            )
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.depth_window, self.depth_overlap, self.progress = depth_window, depth_overlap, progress
        self.depth_shift = parse_bool(depth_shift, "depth_shift")
        self.eta = float(eta)
        self.untrained_context = long_volume == "chain" and record is not None and not record.get("p_context")
        self._warned = False

    def __call__(
        self, inputs, network, *args, mask=None, context=None, context_mask=None, previous=None, seed_offset=0, **kw
    ):
        """``previous``: a latent slice to re-inject into the first one (``long_volume: official``); ``seed_offset``:
        added to the seed (one window of several)."""
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        windowed = self.depth_window is not None and int(self.depth_window) < shape[2]
        if windowed and self.untrained_context and getattr(network, "mode", "none") != "none" and not self._warned:
            self._warned = True
            logging.getLogger("fvae_ct").warning(
                "long_volume chain gives each window the last slices of the one before as clean context, and this "
                "checkpoint was trained without such windows (its record has no p_context > 0): retrain stage 3d with "
                "p_context > 0 (train.yaml's default), or pass --long_volume blend"
            )
        return sample_latents(
            network,
            self.scheduler,
            shape,
            mask,
            context,
            context_mask,
            self.guidance,
            self.steps,
            self.seed + int(seed_offset),
            self.depth_window,
            self.depth_overlap,
            progress=self.progress,
            depth_shift=self.depth_shift,
            eta=self.eta,
            previous=previous,
            long_volume="blend" if self.long_volume == "official" else self.long_volume,
        )


def guided_prediction(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor | None,
    context: torch.Tensor | None,
    context_mask: torch.Tensor | None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Classifier-free guidance: ``u + g * (c - u)`` with c conditional and u both conditions dropped. ``t``: ``[B]``
    or one timestep per slice, ``[B * d]`` slice-major per sample."""
    xin = torch.cat([x, mask], 1) if mask is not None else x
    cond = model(xin, t, context, context_mask)
    if guidance == 1.0 or (mask is None and context is None):  # u + 1 * (c - u) = c: no second pass
        return cond
    xu = torch.cat([x, torch.zeros_like(mask)], 1) if mask is not None else x
    if context is not None:
        uctx, umask = null_text(x.shape[0], context.shape[-1], x.device)
    else:
        uctx = umask = None
    unc = model(xu, t, uctx, umask)
    return unc + guidance * (cond - unc)


def _step(scheduler, out, t, z, t_next, eta, gen):
    """One sampler step from timestep ``t`` (``t_next``: the next one, rectified flow only)."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.step(out, int(t), z, t_next)[0]
    return (scheduler.step(out, int(t), z, eta=eta, generator=gen) if eta else scheduler.step(out, int(t), z))[0]


def _chain_window(model, scheduler, ts, z, mask, cond, known, eta, gen, bar):
    """One window of ``long_volume: chain``: ``z [B, C, n, h, w]`` noise, the first ``k = known.shape[2]`` slices given
    (clean, timestep 0 on them; DDIM: as the forward process has them at t = 0). DDIM shifts the start of the other
    slices by ``sqrt(a_T) (x0_given - x0_none)``: the model's clean estimates at T from a zero input, with and without
    the given slices, i.e. the part of the first noise level's mean that the given slices explain (the schedule's
    last alpha_cumprod is not 0: that much of the signal is still there at T). Rectified flow ends at pure noise and
    needs no shift."""
    k, n = (0 if known is None else known.shape[2]), z.shape[2]
    rflow = isinstance(scheduler, RFlowScheduler)

    def per_slice(t, given=k):  # [B * n], slice-major per sample: timestep 0 on the given slices
        row = torch.full((n,), int(t), dtype=torch.long, device=z.device)
        row[:given] = 0
        return row.repeat(z.shape[0])

    def predict(v, t, given=k):
        return guided_prediction(model, v, per_slice(t, given), mask, *cond)

    if k:
        given = known if rflow else scheduler.alphas_cumprod[0].to(z).sqrt() * known
        z = z.clone()
        z[:, :, :k] = given
        if not rflow:
            a_t = scheduler.alphas_cumprod[int(ts[0])].to(z)
            v = torch.zeros_like(z)
            x0_none = -(1 - a_t).sqrt() * predict(v, ts[0], 0) / a_t.sqrt()
            v[:, :, :k] = given
            x0_given = (v - (1 - a_t).sqrt() * predict(v, ts[0])) / a_t.sqrt()
            z[:, :, k:] += a_t.sqrt() * (x0_given - x0_none)[:, :, k:]
    for i, t in enumerate(ts):
        z = _step(scheduler, predict(z, t), t, z, int(ts[i + 1]) if i + 1 < len(ts) else None, eta, gen)
        if k:
            z[:, :, :k] = given
        bar.update()
    return z


@torch.no_grad()
def sample_latents(
    model,
    scheduler,
    shape: Sequence[int],
    mask: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    guidance: float = 1.0,
    steps: int = 20,
    seed: int = 0,
    depth_window: int | None = None,
    depth_overlap: int = 4,
    progress: bool = False,
    depth_shift: bool = True,
    eta: float = 0.0,
    previous: torch.Tensor | None = None,
    long_volume: str = "chain",
) -> torch.Tensor:
    """Generate latents ``[1, C, d, h, w]`` (scaled) from noise ``randn(shape)`` seeded by ``seed``, with CFG.

    Volumes deeper than ``depth_window`` (``None``: one window): ``long_volume`` ``chain`` (windows one after another,
    each conditioned on the last ``depth_overlap`` slices of the one before: :func:`_chain_window`; the model takes one
    timestep per slice, ``[B * d]``, as :class:`fvae_ct.ldm.networks.PseudoThreeDUNet` does) or ``blend`` (at
    every step the blend of the predictions of overlapping windows, :func:`fvae_ct.tiling.shifted_depth_apply`, from
    the same current sample; ``depth_shift``: the grid moves from step to step by ``frac(i * 0.618) * stride``).
    ``eta``: DDIM stochasticity (0 deterministic, our default; 1 the paper's), its noise from a generator seeded by
    ``seed``. ``previous [1, C, 1, h, w]`` (DDIM, one window): re-injected into the first latent slice before the first
    step and after every step, the official way (:func:`fvae_ct.ldm.long_volume.reinject` with
    ``alpha_cumprod[T - 1]``, then ``alpha_cumprod[index]`` for DDIM step index ``S - 1 .. 0``).
    """
    from tqdm.auto import tqdm

    if long_volume not in ("chain", "blend"):
        raise OptionError(f"sample_latents: long_volume must be 'chain' or 'blend', got {long_volume!r}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(tuple(shape), generator=g).to(device)
    c, d = z.shape[1], z.shape[2]
    rflow = isinstance(scheduler, RFlowScheduler)
    if eta and rflow:
        raise ValueError("eta applies to DDIM sampling (scheduler ddpm), not to rectified flow")
    step_gen = torch.Generator(device=device).manual_seed(int(seed) + 1) if eta else None
    if rflow:
        scheduler.set_timesteps(steps, device=device, input_img_size_numel=int(torch.tensor(shape[2:]).prod()))
    else:
        scheduler.set_timesteps(steps, device=device)
    ts = list(scheduler.timesteps)
    windowed = depth_window is not None and int(depth_window) < d
    if long_volume == "chain" and windowed:
        if previous is not None:
            raise ValueError("re-injecting a previous latent belongs to long_volume official, not chain")
        wins = chain_windows(d, int(depth_window), int(depth_overlap))
        out = torch.empty_like(z)
        with tqdm(total=len(ts) * len(wins), desc="denoising (chain)", disable=not progress) as bar:
            for a, b, k in wins:
                m = None if mask is None else mask[:, :, a:b]
                known = out[:, :, a : a + k] if k else None
                w = _chain_window(
                    model, scheduler, ts, z[:, :, a:b], m, (context, context_mask, guidance), known, eta, step_gen, bar
                )
                out[:, :, a + k : b] = w[:, :, k:]
        return out
    if previous is not None:
        if rflow:
            raise ValueError("re-injecting a previous latent is the official DDIM procedure (scheduler ddpm)")
        ac, inject_gen = scheduler.alphas_cumprod, torch.Generator().manual_seed(int(seed) + 2)
        z = reinject(z, previous, ac[-1], inject_gen)
    for i, t in enumerate(tqdm(ts, desc="denoising", disable=not progress)):
        tt = torch.full((z.shape[0],), int(t), device=device, dtype=torch.long)

        def predict(v, tt=tt):  # v = latent (+ mask) window
            x, m = (v[:, :c], v[:, c:]) if mask is not None else (v, None)
            return guided_prediction(model, x, tt, m, context, context_mask, guidance)

        full = torch.cat([z, mask], 1) if mask is not None else z
        stride = max(1, int(depth_window or 1) - int(depth_overlap))
        offset = int((i * 0.6180339887498949) % 1.0 * stride) if depth_shift else 0
        eps = shifted_depth_apply(predict, full, depth_window, depth_overlap, offset)
        z = _step(scheduler, eps, t, z, int(ts[i + 1]) if i + 1 < len(ts) else None, eta, step_gen)
        if previous is not None:  # the DDIM step index into the 1000-step table, as the official code does
            z = reinject(z, previous, ac[len(ts) - 1 - i], inject_gen)
    return z
