"""The latent cache of the fvae_ldm bundle (prepare.yaml) and the training data read from it (train.yaml).

Cache files ``<cache_dir>/<case>.pt`` hold ``latent [C, d, h, w]`` (unscaled frozen-VAE latents of the CT
in upright axial-slice layout), ``mask [K, d, h, w]``, ``text [T, E]``, ``text_mask [T]``; ``latent_stats.json``
holds ``scale_factor`` (1 / std of all latents, or a fixed number) and what produced them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..batch import BatchRunner, failure_message
from ..datalist import read_datalist
from ..errors import BatchFailure, InputError, OptionError
from ..io import Case, atomic_write, case_name, load_ct, load_labels, write_text_atomic
from ..options import parse_bool
from ..transforms import recon_preprocessing, to_slices
from .conditioning import read_report, text_encoder_record, vae_mask_input
from .diffusion import FrozenTextEncoder, onehot_mask_latent

__all__ = [
    "MASK_ENCODINGS",
    "prepare_latents",
    "body_masked",
    "cached_latents",
    "LatentCacheDataset",
    "collate_latents",
]

log = logging.getLogger("fvae_ct")

#: prepare.yaml's ``mask_encoding`` values
MASK_ENCODINGS = ("onehot", "vae")


def _labels_on_grid(path: str, image) -> np.ndarray:
    """Label map resampled to the CT's grid ``[X, Y, Z]`` (nearest)."""
    return load_labels(path, np.asarray(image.affine), image.shape[1:])


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
    """Encode every case of ``datalist`` (JSON list of ``{"image", "label", "report"}``, or an MSD-style dict's
    ``training``: :func:`fvae_ct.datalist.read_datalist`) into the cache.

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
    if mask_encoding not in MASK_ENCODINGS:
        raise OptionError(f"mask_encoding must be one of {', '.join(MASK_ENCODINGS)}, got {mask_encoding!r}")
    body_mask = parse_bool(body_mask, "body_mask")
    skip_existing = parse_bool(skip_existing, "skip_existing")
    if scale_factor is not None and not float(scale_factor) > 0:
        raise OptionError(f"scale_factor must be a positive number or null, got {scale_factor!r}")
    p = Path(datalist)
    # a list, or an MSD-style dict's "training"; paths absolute; a missing listed file fails as its case
    items = read_datalist(p, ("training",), ("image",), check_files=False)
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
