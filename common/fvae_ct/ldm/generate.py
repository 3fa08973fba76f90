"""Generation of the fvae_ldm bundle (inference.yaml): a mask NIfTI (+ report) -> a generated CT NIfTI in HU."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, OptionError
from ..figures import three_view
from ..io import case_name, read_labels, save_nifti_atomic
from ..transforms import from_slices, to_slices, unit_to_hu
from .conditioning import MINILM, read_report, vae_mask_input
from .diffusion import FrozenTextEncoder, onehot_mask_latent
from .long_volume import official_long_volume
from .sampling import SamplingInferer

__all__ = ["GenerateWorkflow"]


class GenerateWorkflow:
    """Mask NIfTI (+ report) -> generated CT NIfTI in HU on the mask's grid (+ a three-view PNG).

    Args:
        network: the trained denoiser; vae: the frozen VAE of the latent space; stats: latent_stats.json dict.
        inferer: a :class:`~fvae_ct.ldm.SamplingInferer` (scheduler, steps, guidance, seed, depth windows);
            ``None``: its defaults (DDIM 20 steps, guidance 2, 16-slice windows overlapping by 4).
        text_weights: a state dict for the text encoder's transformer, when the model file carries one (the
            official checkpoint's ``text_transformer.*``); the tokenizer and config come from the recorded encoder.
    """

    def __init__(
        self,
        network,
        vae,
        stats: dict,
        output_dir: str,
        inferer: SamplingInferer | None = None,
        text_encoder: str | None = None,
        hu_window=(-1000.0, 1000.0),
        multiple: int = 4,
        text_weights: dict | None = None,
    ):
        self.network, self.vae, self.stats = network.eval(), vae, stats
        self.output_dir = Path(output_dir)
        self.inferer = inferer or SamplingInferer()
        self.text_encoder = None
        if stats.get("text_dim"):
            rec = stats.get("text_encoder") or {"name": MINILM, "dim": stats["text_dim"], "max_length": 128}
            if text_encoder not in (None, "", "None") and str(text_encoder) != rec["name"]:
                raise OptionError(
                    f"text_encoder {text_encoder!r}: the model was trained with {rec['name']!r} ({rec['dim']}-d, "
                    f"{rec['max_length']} tokens; recorded in latent_stats.json): leave text_encoder unset, or give that one"
                )
            name = None if rec["name"] == MINILM else rec["name"]
            padding = rec.get("padding", "mask")
            self.text_encoder = FrozenTextEncoder(name, max_length=int(rec["max_length"]), padding=padding)
            if self.text_encoder.dim != int(rec["dim"]):
                raise OptionError(
                    f"text encoder {rec['name']!r} gives {self.text_encoder.dim}-d embeddings, the model was trained "
                    f"on {rec['dim']}-d ones"
                )
            if text_weights:  # the text transformer's weights stored with the model (the official checkpoint)
                bad = self.text_encoder.model.load_state_dict(text_weights, strict=False)
                missing = [k for k in bad.missing_keys if not k.endswith("position_ids")]
                if missing or bad.unexpected_keys:
                    raise OptionError(
                        f"the model's text weights do not fit {rec['name']!r}: missing {missing[:3]}, "
                        f"unexpected {bad.unexpected_keys[:3]}"
                    )
        self.hu_window = hu_window
        self.multiple = multiple

    def _mask_condition(self, lab: torch.Tensor, mask: str) -> tuple[torch.Tensor | None, tuple]:
        """Label slices ``[D, H, W]`` -> (the mask condition on the latent grid or ``None``, the latent shape)."""
        latent_shape = self.vae.latent_shape(tuple(lab.shape))
        if self.stats["mask_encoding"] == "onehot":
            cond = onehot_mask_latent(
                lab, self.stats["classes"], self.vae.spatial_factor, self.vae.depth_factor, latent_shape
            )[None]
        else:
            try:
                u = vae_mask_input(
                    lab, self.stats["mask_label_scale"], self.vae.input_range, self.stats.get("mask_gain") or 1.0
                )
            except ValueError as e:
                raise InputError(mask, str(e)) from None
            cond = self.vae.encode(u[None, None]) * float(self.stats["mask_scale_factor"])
        return cond, latent_shape

    def _generate(self, lab, mask, ctx, cmask, previous=None, seed_offset=0) -> tuple[torch.Tensor, torch.Tensor]:
        """Label slices ``[D, H, W]`` -> (decoded slices ``[D, H, W]`` in the VAE's range, the last latent slice)."""
        d, h, w = lab.shape
        cond, latent_shape = self._mask_condition(lab, mask)
        m = self.multiple
        ph, pw = (-latent_shape[1]) % m, (-latent_shape[2]) % m
        cond = F.pad(cond, (0, pw, 0, ph, 0, 0), mode="replicate") if cond is not None else None
        dev = next(self.network.parameters()).device
        z = self.inferer(
            (1, self.stats["latent_channels"], latent_shape[0], latent_shape[1] + ph, latent_shape[2] + pw),
            self.network,
            mask=cond.to(dev) if cond is not None else None,
            context=ctx.to(dev) if ctx is not None else None,
            context_mask=cmask.to(dev) if cmask is not None else None,
            previous=previous,
            seed_offset=seed_offset,
        )
        x = self.vae.decode(z[:, :, :, : latent_shape[1], : latent_shape[2]] / self.stats["scale_factor"])
        return x[0, 0, :d, :h, :w].cpu(), z[:, :, -1:]

    @torch.no_grad()
    def run(self, mask: str, report: str | None = None, name: str | None = None) -> Path:
        labels, affine = read_labels(mask)  # missing, unreadable, not 3D, NaN: one line naming the file
        lab = torch.from_numpy(to_slices(labels, affine)[0])  # [D, H, W]
        d, h, w = lab.shape
        ctx = cmask = None
        if self.text_encoder is not None:
            ctx, cmask = self.text_encoder.encode([read_report(report)])
        if getattr(self.inferer, "long_volume", "blend") == "official":
            # image-space windows of (window - 1) x depth factor + 1 slices (65 for 17 LeanVAE latents), two passes
            lw, f = int(self.inferer.depth_window), self.vae.depth_factor
            window = (lw - 1) * f + 1 if f > 1 else lw
            calls = itertools.count()  # every window draws its own noise (3 seeds: start, steps, re-injection)

            def generate(start, stop, previous):
                return self._generate(lab[start:stop], mask, ctx, cmask, previous, seed_offset=3 * next(calls))

            x = official_long_volume(generate, d, window, window // 2, window // 4, lw - 1, f)
        else:
            x = self._generate(lab, mask, ctx, cmask)[0]
        lo, hi = self.vae.input_range
        hu = unit_to_hu(((x - lo) / (hi - lo)).clamp(0, 1), self.hu_window)  # [D, H, W]
        vol = from_slices(hu.numpy(), affine).astype(np.int16)  # the mask's voxel order
        name = name or case_name(mask).replace("_seg", "") + "_generated"
        # the mask's header (qform / sform matrices and codes) is the output's: same grid, same geometry
        out = save_nifti_atomic(vol, affine, self.output_dir / f"{name}.nii.gz", like=str(mask), forbid=(str(mask),))
        three_view(
            vol,
            None,
            affine,
            self.output_dir / f"{name}.png",
            title=f"{name} (generated from the mask)",
            window=self.hu_window,
            labels=labels,
        )
        return out
