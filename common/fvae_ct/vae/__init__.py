"""Registry of named frozen VAEs: ``load(name, ...)`` and ``list_vaes()``.

Every entry builds a :class:`~fvae_ct.vae.base.FrozenVAE`. ``weights`` overrides where the weights come
from (a file pair ``"enc.pth,dec.pth"`` or a folder for TAESD-family models; a local diffusers folder or
hub id for the Wan models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import assets
from ..errors import OptionError, UnknownVAEError, WeightsError
from ..tiling import TilingConfig
from .base import FrozenVAE
from .diffusers_video import VIDEO_VAES, DiffusersVideoVAE
from .external import ExternalVAE
from .identity import IdentityVAE
from .image_ae import TAESDVAE
from .ivvae import IVVAE, IVVAE_VARIANTS
from .leanvae import LEANVAE_CONFIGS, LeanVAE
from .wan import WAN_HUB_IDS, WanVAE

__all__ = [
    "FrozenVAE",
    "DiffusersVideoVAE",
    "ExternalVAE",
    "IdentityVAE",
    "IVVAE",
    "LeanVAE",
    "TAESDVAE",
    "WanVAE",
    "VAESpec",
    "REGISTRY",
    "load",
    "list_vaes",
    "register",
]


@dataclass(frozen=True)
class VAESpec:
    """What a user needs to know about a named VAE, and how to build it."""

    name: str
    kind: str
    weights: str
    source: str
    licence: str
    build: Callable[..., FrozenVAE]


REGISTRY: dict[str, VAESpec] = {}


def register(spec: VAESpec) -> VAESpec:
    REGISTRY[spec.name] = spec
    return spec


def _taef2(weights=None, dtype=torch.float32, **kw) -> FrozenVAE:
    if weights is None:
        enc, dec = assets.resolve("taef2_encoder", download=True), assets.resolve("taef2_decoder", download=True)
    else:
        parts = [Path(p) for p in str(weights).split(",")]
        if len(parts) == 1 and parts[0].is_dir():
            parts = [parts[0] / "taef2_encoder.pth", parts[0] / "taef2_decoder.pth"]
        if len(parts) != 2:
            raise WeightsError(
                f"{weights}: give the TAEF2 weights as 'encoder.pth,decoder.pth' or a folder holding "
                "taef2_encoder.pth and taef2_decoder.pth"
            )
        enc, dec = parts
    if dtype not in (torch.float32, torch.bfloat16):
        raise OptionError(f"vae_dtype {dtype}: taef2 runs in float32, or bfloat16 autocast (fp32 weights)")
    # bf16 autocast costs 0.05 dB on the sample series (below the 0.1 dB we allow): bench/bench_gpu.py --bf16-check-cpu
    auto = torch.bfloat16 if dtype == torch.bfloat16 else None
    return TAESDVAE(enc, dec, latent_channels=32, pool_width=256, name="taef2", autocast_dtype=auto, **kw)


def _wan(name: str):
    def build(weights=None, dtype=torch.float32, **kw) -> FrozenVAE:
        return WanVAE(weights=weights or WAN_HUB_IDS[name], name=name, dtype=dtype, **kw)

    return build


register(
    VAESpec(
        "taef2",
        "image AE, slice-wise, 32 latent ch, 8x",
        "taef2_encoder.pth + taef2_decoder.pth (2.7 MB each)",
        f"$FVAE_ASSETS/weights, ~/.cache/fvae_ct, or {assets.ASSETS['taef2_encoder'].url.rsplit('/', 1)[0]}/",
        "MIT (madebyollin/taesd)",
        _taef2,
    )
)
register(
    VAESpec(
        "wan2.1",
        "causal video VAE, depth=time, 16 latent ch, 8x spatial, 4x depth",
        "Wan2.1_VAE.pth (original single file, 508 MB) or a diffusers AutoencoderKLWan folder (vae/)",
        f"hub id {WAN_HUB_IDS['wan2.1']} (subfolder vae) or a local copy",
        "Apache-2.0 (Wan-AI)",
        _wan("wan2.1"),
    )
)
register(
    VAESpec(
        "wan2.2",
        "causal video VAE, depth=time, 48 latent ch, 16x spatial (2x2 patchify), 4x depth",
        "Wan2.2_VAE.pth (original single file, 2.8 GB) or a diffusers AutoencoderKLWan folder (vae/)",
        f"hub id {WAN_HUB_IDS['wan2.2']} (subfolder vae) or a local copy",
        "Apache-2.0 (Wan-AI)",
        _wan("wan2.2"),
    )
)


def _ivvae(z_dim: int | None, dim: int | None):
    def build(weights=None, dtype=torch.float32, **kw) -> FrozenVAE:
        return IVVAE(z_dim, dim, weights=weights, dtype=dtype, name="ivvae" if z_dim is None else None, **kw)

    return build


_IVVAE_SRC = f"$FVAE_ASSETS/weights/ivvae/, ~/.cache/fvae_ct, or ModelScope wpy1999/iv-vae ({assets.IVVAE_PAGE})"
register(
    VAESpec(
        "ivvae",
        "IV-VAE causal video VAE (own implementation), depth=time, 8x spatial, 4x depth; variant read from "
        "the checkpoint (default z16 dim64)",
        "ivvae_z{4,8,16}_dim{64,96}.pth (official, strict)",
        _IVVAE_SRC,
        "MIT (ali-vilab/iv-vae)",
        _ivvae(None, None),
    )
)
for (_z, _d), (_s, _t) in IVVAE_VARIANTS.items():
    register(
        VAESpec(
            f"ivvae_z{_z}_dim{_d}",
            f"IV-VAE, {_z} latent ch, width {_d}, latent = {_s} * (mean - {_t})",
            f"ivvae_z{_z}_dim{_d}.pth",
            _IVVAE_SRC,
            "MIT (ali-vilab/iv-vae)",
            _ivvae(_z, _d),
        )
    )


def _leanvae(variant: str, name: str):
    def build(weights=None, dtype=torch.float32, **kw) -> FrozenVAE:
        return LeanVAE(variant, weights=weights, dtype=dtype, name=name, **kw)

    return build


_LEAN_SRC = f"$FVAE_ASSETS/weights/leanvae/, ~/.cache/fvae_ct, or Hugging Face Yumic/LeanVAE ({assets.LEANVAE_PAGE})"
register(
    VAESpec(
        "leanvae",
        "LeanVAE causal video VAE (own implementation), depth=time, 8x spatial, 4x depth, input [-0.5, 0.5]; "
        "architecture read from the checkpoint (default dim16)",
        "LeanVAE-dim{4,16}.ckpt (official, strict, 159 MB)",
        _LEAN_SRC,
        "MIT (westlake-repl/LeanVAE code, Yumic/LeanVAE weights)",
        _leanvae("dim16", "leanvae"),
    )
)
for _v, _c in LEANVAE_CONFIGS.items():
    register(
        VAESpec(
            f"leanvae_{_v}",
            f"LeanVAE, {_c['latent_dim']} latent ch",
            f"LeanVAE-{_v}.ckpt",
            _LEAN_SRC,
            "MIT (westlake-repl/LeanVAE code, Yumic/LeanVAE weights)",
            _leanvae(_v, f"leanvae_{_v}"),
        )
    )


def _video(name: str):
    def build(weights=None, dtype=torch.float32, **kw) -> FrozenVAE:
        return DiffusersVideoVAE(name, weights=weights, dtype=dtype, **kw)

    return build


for _name, (_cls, _hub, _lic) in VIDEO_VAES.items():
    register(
        VAESpec(
            _name,
            f"causal video VAE, depth=time (diffusers {_cls})",
            f"diffusers {_cls} folder (vae/)",
            f"hub id {_hub} (subfolder vae) or a local copy",
            _lic,
            _video(_name),
        )
    )


def _external(name: str):
    def build(weights=None, dtype=torch.float32, target=None, **kw) -> FrozenVAE:
        if target is None:
            raise WeightsError(
                f"{name}: give target='package.module.Class' (and repo='<local clone>', kwargs={{...}}, "
                "latent_channels, spatial_factor, depth_factor, input_range, layout)"
            )
        return ExternalVAE(target, name=name, repo=weights if weights else kw.pop("repo", None), **kw)

    return build


register(
    VAESpec(
        "external",
        "any VAE class with encode/decode from your own code (dotted path + kwargs): WF-VAE, CV-VAE ...",
        "whatever the class loads",
        "your local clone (weights=<repo path>, target=<module.Class>)",
        "that of the code you point to",
        _external("external"),
    )
)
register(
    VAESpec(
        "videovae_plus",
        "VideoVAE+ through the official code (not re-implemented: CC BY-NC-ND)",
        "the official checkpoint, loaded by the official class",
        "a local clone of the official repository",
        "CC BY-NC-ND 4.0 (VideoVAE+)",
        _external("videovae_plus"),
    )
)
register(
    VAESpec(
        "identity",
        "control: encode = decode = identity (measures the pipeline alone)",
        "none",
        "built in",
        "Apache-2.0 (fvae-ct)",
        lambda weights=None, dtype=torch.float32, **kw: IdentityVAE(**kw),
    )
)


def load(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tiling: TilingConfig | dict | None = None,
    options: dict | None = None,
    **kwargs,
) -> FrozenVAE:
    """Build the named frozen VAE on ``device``. Unknown names raise an error listing the valid ones.

    Further constructor arguments come as keywords or, from bundle configs, as the dict ``options``
    (``--vae_kwargs``), e.g. ``target`` / ``kwargs`` / ``latent_channels`` for ``external``.
    """
    kwargs = {**(options or {}), **kwargs}
    if name not in REGISTRY:
        raise UnknownVAEError(f"unknown VAE '{name}'; valid names: {', '.join(sorted(REGISTRY))}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise OptionError(f"vae_dtype {dtype!r}: not a torch dtype (float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise OptionError(
            f"device {device}: no CUDA GPU is available here (torch.cuda.is_available() is False); use --device cpu"
        )
    if isinstance(tiling, dict):
        tiling = TilingConfig(**tiling)
    vae = REGISTRY[name].build(weights=weights, dtype=dtype, tiling=tiling, **kwargs)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # slice batches and tiles have fixed shapes: cuDNN picks its fastest
    return vae.to(device)


def list_vaes() -> list[dict[str, str]]:
    """One dict per registered VAE: name, kind, weights, source, licence."""
    return [{k: getattr(s, k) for k in ("name", "kind", "weights", "source", "licence")} for s in REGISTRY.values()]
