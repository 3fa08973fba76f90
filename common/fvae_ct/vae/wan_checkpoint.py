"""Wan's original single-file VAE checkpoints (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``) as diffusers models, offline.

The official Wan code names its VAE parameters after its own modules (``encoder.downsamples.3.residual.2.weight``,
``conv1``, ``head``); diffusers' ``AutoencoderKLWan`` uses ``down_blocks`` / ``resnets`` / ``conv_in`` ... The map
between the two is written here from the module structure of the official ``vae2_1.py`` / ``vae2_2.py``:

- Wan 2.1: flat ``downsamples.<k>`` / ``upsamples.<k>`` lists (per decoder stage: ``num_res_blocks + 1`` residual
  blocks then an upsampler); diffusers' own converter handles it (``from_single_file``), we give it the config.
- Wan 2.2: nested ``downsamples.<stage>.downsamples.<k>`` / ``upsamples.<stage>.upsamples.<k>`` (residual stages
  with parameter-free average / duplicate shortcuts); diffusers' converter assumes the 2.1 layout, so
  :func:`original_to_diffusers` converts it.

Both official configs (the diffusers ``vae/config.json`` of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and
Wan-AI/Wan2.2-TI2V-5B-Diffusers; latent mean / std as in the official code) are carried here, so nothing is
fetched from the hub.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from ..errors import WeightsError

__all__ = [
    "WAN_CONFIGS",
    "WAN_FILES",
    "SINGLE_FILE_SUFFIXES",
    "is_single_file",
    "original_to_diffusers",
    "diffusers_to_original",
    "read_state_dict",
    "load_single_file",
]

_WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632,
               -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
_WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
              1.1253, 2.8251, 1.9160]  # fmt: skip
_WAN22_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
               0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
               -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
               -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681,
               -0.0667]  # fmt: skip
_WAN22_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885,
              0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338,
              0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458,
              1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]  # fmt: skip

#: diffusers ``AutoencoderKLWan`` configs of the official weights
WAN_CONFIGS = {
    "wan2.1": {
        "base_dim": 96,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "latents_mean": _WAN21_MEAN,
        "latents_std": _WAN21_STD,
    },
    "wan2.2": {
        "base_dim": 160,
        "decoder_base_dim": 256,
        "z_dim": 48,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "is_residual": True,
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "latents_mean": _WAN22_MEAN,
        "latents_std": _WAN22_STD,
    },
}

#: the official single files: where they are, their size and licence
WAN_FILES = {
    "wan2.1": "Wan2.1_VAE.pth (508 MB, in Wan-AI/Wan2.1-T2V-14B, -T2V-1.3B, -I2V-14B-480P/720P; Apache-2.0)",
    "wan2.2": "Wan2.2_VAE.pth (2.8 GB, in Wan-AI/Wan2.2-TI2V-5B; Apache-2.0)",
}
SINGLE_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")

# one residual block's leaves: official <-> diffusers
_RESIDUAL = (("residual.0.gamma", "norm1.gamma"), ("residual.2.", "conv1."), ("residual.3.gamma", "norm2.gamma"),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))  # fmt: skip


def is_single_file(weights) -> bool:
    """A local checkpoint file (not a diffusers folder or hub id)."""
    p = Path(str(weights))
    return p.is_file() and p.name.lower().endswith(SINGLE_FILE_SUFFIXES)


def _leaf(rest: str, to_diffusers: bool) -> str:
    for a, b in _RESIDUAL:
        src, dst = (a, b) if to_diffusers else (b, a)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return rest


_TOP = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))  # official <-> diffusers, whole model
_PART = (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."))  # ... in encoder / decoder


def _shared_renames(key: str, to_diffusers: bool) -> tuple[str | None, str, str]:
    """The renames both directions share: ``(renamed key, "", "")`` when one applies (or the key is outside the
    encoder / decoder), else ``(None, "encoder" | "decoder", the rest of the key)``."""
    for a, b in _TOP:
        src, dst = (a, b) if to_diffusers else (b, a)
        if key.startswith(src):
            return dst + key[len(src) :], "", ""
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        return key, "", ""
    part, rest = m.groups()
    for a, b in _PART:
        src, dst = (a, b) if to_diffusers else (b, a)
        if rest.startswith(src):
            return f"{part}.{dst}{rest[len(src):]}", part, rest
    return None, part, rest


def _key_to_diffusers(key: str, cfg: dict) -> str:
    n_res, residual = int(cfg.get("num_res_blocks", 2)), bool(cfg.get("is_residual", False))
    done, part, rest = _shared_renames(key, True)
    if done is not None:
        return done
    m = re.match(r"middle\.(\d+)\.(.*)$", rest)
    if m:
        i, leaf = int(m.group(1)), m.group(2)
        if i == 1:
            return f"{part}.mid_block.attentions.0.{leaf}"
        return f"{part}.mid_block.resnets.{i // 2}.{_leaf(leaf, True)}"
    if residual:
        m = re.match(r"(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)$", rest)
        if m:
            kind, s, j, leaf = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            n = n_res if kind == "down" else n_res + 1
            block = "down_blocks" if kind == "down" else "up_blocks"
            if j < n:
                return f"{part}.{block}.{s}.resnets.{j}.{_leaf(leaf, True)}"
            return f"{part}.{block}.{s}.{kind}sampler.{leaf}"
    else:
        m = re.match(r"downsamples\.(\d+)\.(.*)$", rest)
        if m:
            return f"{part}.down_blocks.{m.group(1)}.{_leaf(m.group(2), True)}"
        m = re.match(r"upsamples\.(\d+)\.(.*)$", rest)
        if m:
            k, leaf = int(m.group(1)), m.group(2)
            s, j = divmod(k, n_res + 2)
            if j < n_res + 1:
                return f"{part}.up_blocks.{s}.resnets.{j}.{_leaf(leaf, True)}"
            return f"{part}.up_blocks.{s}.upsamplers.0.{leaf}"
    return key


def _key_to_original(key: str, cfg: dict) -> str:
    n_res, residual = int(cfg.get("num_res_blocks", 2)), bool(cfg.get("is_residual", False))
    done, part, rest = _shared_renames(key, False)
    if done is not None:
        return done
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.*)$", rest)
    if m:
        kind, i, leaf = m.group(1), int(m.group(2)), m.group(3)
        return f"{part}.middle.1.{leaf}" if kind == "attentions" else f"{part}.middle.{2 * i}.{_leaf(leaf, False)}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(.*)$", rest)
    if not m:
        return key
    kind, s, inner = m.group(1), int(m.group(2)), m.group(3)
    n = n_res if kind == "down" else n_res + 1
    if residual:
        m = re.match(r"resnets\.(\d+)\.(.*)$", inner)
        j, leaf = (int(m.group(1)), _leaf(m.group(2), False)) if m else (n, inner.split(".", 1)[1])
        return f"{part}.{kind}samples.{s}.{kind}samples.{j}.{leaf}"
    if kind == "down":
        return f"{part}.downsamples.{s}.{_leaf(inner, False)}"
    m = re.match(r"resnets\.(\d+)\.(.*)$", inner)
    if m:
        return f"{part}.upsamples.{s * (n_res + 2) + int(m.group(1))}.{_leaf(m.group(2), False)}"
    leaf = re.sub(r"^upsamplers\.0\.", "", inner)
    return f"{part}.upsamples.{s * (n_res + 2) + n_res + 1}.{leaf}"


def original_to_diffusers(state: dict, config: dict) -> dict:
    """Official Wan VAE state dict -> diffusers ``AutoencoderKLWan`` names (values shared, not copied)."""
    return {_key_to_diffusers(k, config): v for k, v in state.items()}


def diffusers_to_original(state: dict, config: dict) -> dict:
    """The inverse of :func:`original_to_diffusers`: diffusers names -> the official code's names."""
    return {_key_to_original(k, config): v for k, v in state.items()}


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors of a ``.safetensors`` or torch pickle (``weights_only``) checkpoint; an error naming the file."""
    p = Path(path)
    state: object
    try:
        if p.name.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, ...: one clear message
        raise WeightsError(f"{p}: cannot read the checkpoint ({type(e).__name__}: {e}); truncated download?") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{p}: not a state dict of tensors")
    return state


def _listed(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _layout(cfg: dict) -> dict:
    """Original-layout names and shapes of the model ``cfg`` builds (on the meta device: no memory)."""
    from diffusers.models import AutoencoderKLWan  # diffusers' top level types it as its no-torch placeholder

    with torch.device("meta"):
        empty = AutoencoderKLWan(**cfg)
    return {_key_to_original(k, cfg): tuple(v.shape) for k, v in empty.state_dict().items()}


def load_single_file(
    name: str, path: str | os.PathLike, dtype: torch.dtype = torch.float32, config: dict | None = None
):
    """An official single-file Wan VAE checkpoint (``.pth`` / ``.safetensors``) as an ``AutoencoderKLWan``, offline.

    ``config``: the diffusers config (default :data:`WAN_CONFIGS` ``[name]``; tests pass tiny ones). The file's
    keys and shapes are checked against that config first: a file that does not fit is refused naming the
    expected file, the missing / unexpected keys and the first shape mismatches.
    """
    from diffusers.models import AutoencoderKLWan  # diffusers' top level types it as its no-torch placeholder

    if name not in WAN_CONFIGS:
        raise WeightsError(f"{name}: no Wan single-file config (known: {', '.join(WAN_CONFIGS)})")
    cfg = dict(config if config is not None else WAN_CONFIGS[name])
    state = read_state_dict(path)
    want = _layout(cfg)
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = set(want) - set(got), set(got) - set(want)
    shapes = [f"{k} {got[k]} (expected {want[k]})" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if missing or unexpected or shapes:
        why = []
        if missing:
            why.append(f"missing {_listed(missing)}")
        if unexpected:
            why.append(f"unexpected {_listed(unexpected)}")
        if shapes:
            why.append(f"shapes differ: {'; '.join(shapes[:3])}")
        for other in WAN_CONFIGS:  # the other release's file given by mistake: say so
            if other != name and config is None and got == _layout(WAN_CONFIGS[other]):
                why.insert(0, f"it is the {other} VAE file: use --vae {other}")
        raise WeightsError(
            f"{path}: not an original {name} VAE checkpoint (expected {WAN_FILES[name]}): " + "; ".join(why)
        )
    if not cfg.get("is_residual"):  # Wan 2.1 layout: diffusers' own converter
        with tempfile.TemporaryDirectory() as d:
            Path(d, "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **cfg}))
            return AutoencoderKLWan.from_single_file(state, config=d, torch_dtype=dtype)
    model = AutoencoderKLWan(**cfg)
    model.load_state_dict(original_to_diffusers(state, cfg), strict=True)
    return model.to(dtype).eval()
