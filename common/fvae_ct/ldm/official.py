"""The paper's released generation model (github qic999/Foundation-VAE, ``Generation/CT-Generation-Healthy``) in
this bundle: the official pseudo-3D UNet's weights mapped onto our denoiser, from a Lightning checkpoint loaded
without running pickled code.

The official denoiser is ``ldm.modules.diffusionmodules.openaimodel_pseudo3D.UNetModel`` (:data:`OFFICIAL_UNET`):
a 2D latent-diffusion UNet over the ``B * 17`` latent slices of a window (slice index fastest), the image and mask
latents concatenated on channels (16 + 16), a temporal ``Conv1d`` (kernel 3, identity-initialised, named
``*_tem`` / ``*.temporal_conv``) after every 3x3 convolution, cross-attention to CXR-BERT's last hidden state
``[B, 512, 768]`` with no attention mask. :func:`official_denoiser` builds the same network from MONAI's
``DiffusionModelUNet`` + :class:`~fvae_ct.ldm.networks.PseudoThreeDUNet` (``conv_every``; any depth, where the
official code hard-codes 17), :func:`official_key_map` names every official tensor's place in it, and
:func:`load_official_checkpoint` reads ``state_dict`` (``model.diffusion_model.*``; ``model_ema.*`` when present:
LitEma's copy, names without dots; ``text_transformer.*``: the BERT weights) and checks keys and shapes first.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import WeightsError

__all__ = [
    "OFFICIAL_UNET",
    "OFFICIAL_SCHEDULE",
    "official_denoiser",
    "official_key_map",
    "convert_official_unet",
    "safe_load",
    "load_official_checkpoint",
    "official_stats",
    "load_pretrained",
    "text_width",
]

#: ``unet_config.params`` of the official configs (``configs/latent-diffusion/full_ct_3d_with_body_mask.yaml``)
OFFICIAL_UNET = dict(
    image_size=64,
    in_channels=32,
    out_channels=16,
    model_channels=224,
    attention_resolutions=[8, 4, 2],
    num_res_blocks=2,
    channel_mult=[1, 2, 3, 4],
    num_head_channels=32,
    use_spatial_transformer=True,
    context_dim=768,
    transformer_depth=1,
    legacy=False,
)
#: the official diffusion settings: scaled-linear betas, eps prediction, LeanVAE-dim16 latents x 1.52 (stage 3d)
OFFICIAL_SCHEDULE = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, scale_factor=1.52)
PREFIX = "model.diffusion_model."


def _levels(model_channels: int, channel_mult, attention_resolutions) -> list[tuple[int, bool]]:
    """(channels, has attention) per level; the official code attends where the downsampling factor is listed."""
    return [(model_channels * m, 2 ** i in set(attention_resolutions)) for i, m in enumerate(channel_mult)]


def official_denoiser(
    model_channels: int = 224,
    channel_mult=(1, 2, 3, 4),
    attention_resolutions=(8, 4, 2),
    num_res_blocks: int = 2,
    num_head_channels: int = 32,
    latent_channels: int = 16,
    mask_channels: int = 16,
    context_dim: int = 768,
):
    """Our denoiser with the official architecture: ``[B, 32, D, h, w]`` (noisy latent, then mask latent), timesteps
    ``[B]``, context ``[B, T, 768]`` -> eps ``[B, 16, D, h, w]``. Group norms as the official ones (eps 1e-5 in the
    ResBlocks and the output, 1e-6 in the spatial transformers)."""
    from monai.networks.nets import DiffusionModelUNet
    from torch import nn

    from .networks import PseudoThreeDUNet

    levels = _levels(model_channels, channel_mult, attention_resolutions)
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=latent_channels + mask_channels,
        out_channels=latent_channels,
        channels=tuple(c for c, _ in levels),
        attention_levels=tuple(a for _, a in levels),
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        norm_num_groups=32,
        norm_eps=1e-5,
        with_conditioning=True,
        cross_attention_dim=context_dim,
    )
    for name, m in unet.named_modules():  # SpatialTransformer.norm: GroupNorm(32, eps=1e-6) in the official code
        if name.endswith("attention") or ".attentions." in name:
            if isinstance(getattr(m, "norm", None), nn.GroupNorm):
                m.norm.eps = 1e-6
    return PseudoThreeDUNet(unet, mode="conv_every")


_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1.conv",
    "in_layers_tem.temporal_conv": "conv1.depth.depth.conv",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2.conv",
    "out_layers_tem.temporal_conv": "conv2.depth.depth.conv",
    "skip_connection": "skip_connection.conv",
}
_ATTN = {
    "norm": "norm",
    "proj_in": "proj_in.conv",
    "proj_out": "proj_out.conv",
    **{f"transformer_blocks.0.attn{i}.to_{x}": f"transformer_blocks.0.attn{i}.to_{x}" for i in (1, 2) for x in "qkv"},
    **{f"transformer_blocks.0.attn{i}.to_out.0": f"transformer_blocks.0.attn{i}.out_proj" for i in (1, 2)},
    "transformer_blocks.0.ff.net.0.proj": "transformer_blocks.0.ff.linear1",
    "transformer_blocks.0.ff.net.2": "transformer_blocks.0.ff.linear2",
    **{f"transformer_blocks.0.norm{i}": f"transformer_blocks.0.norm{i}" for i in (1, 2, 3)},
}


def official_key_map(
    model_channels: int = 224, channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_res_blocks: int = 2
) -> dict[str, str]:
    """Official module path (without ``model.diffusion_model.``) -> our module path (under ``unet.``), for every
    module that holds tensors; a tensor name is ``<path>.weight`` / ``<path>.bias`` on both sides."""
    levels = _levels(model_channels, channel_mult, attention_resolutions)
    m = {"time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2", "out.0": "out.0", "out.2": "out.2.conv"}
    m.update({"input_blocks.0.0": "conv_in.conv", "input_blocks.0.1.temporal_conv": "conv_in.depth.depth.conv"})
    m["out_tem.temporal_conv"] = "out.2.depth.depth.conv"

    def block(off: str, ours: str, attn: bool, attn_ours: str) -> None:
        m.update({f"{off}.0.{k}": f"{ours}.{v}" for k, v in _RES.items()})
        if attn:
            m.update({f"{off}.1.{k}": f"{attn_ours}.{v}" for k, v in _ATTN.items()})

    i = 1
    for lvl, (_, attn) in enumerate(levels):
        for r in range(num_res_blocks):
            block(f"input_blocks.{i}", f"down_blocks.{lvl}.resnets.{r}", attn, f"down_blocks.{lvl}.attentions.{r}")
            i += 1
        if lvl < len(levels) - 1:
            m[f"input_blocks.{i}.0.op"] = f"down_blocks.{lvl}.downsampler.op.conv"
            m[f"input_blocks.{i}.0.op_tem.temporal_conv"] = f"down_blocks.{lvl}.downsampler.op.depth.depth.conv"
            i += 1
    m.update({f"middle_block.0.{k}": f"middle_block.resnet_1.{v}" for k, v in _RES.items()})
    m.update({f"middle_block.1.{k}": f"middle_block.attention.{v}" for k, v in _ATTN.items()})
    m.update({f"middle_block.2.{k}": f"middle_block.resnet_2.{v}" for k, v in _RES.items()})
    o = 0
    for j, (_, attn) in enumerate(reversed(levels)):
        for r in range(num_res_blocks + 1):
            block(f"output_blocks.{o}", f"up_blocks.{j}.resnets.{r}", attn, f"up_blocks.{j}.attentions.{r}")
            if r == num_res_blocks and j < len(levels) - 1:
                up = f"output_blocks.{o}.{2 if attn else 1}"
                m[f"{up}.conv"] = f"up_blocks.{j}.upsampler.postconv.conv"
                m[f"{up}.conv_tem.temporal_conv"] = f"up_blocks.{j}.upsampler.postconv.depth.depth.conv"
            o += 1
    return m


def convert_official_unet(official: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], key_map: dict) -> dict:
    """Official UNet tensors (names without ``model.diffusion_model.``) -> our state dict (``unet.*``), every key and
    shape checked first; a 2D (stage-1) checkpoint has no temporal convs and keeps ours (identity). Temporal
    ``Conv1d`` weights ``[C, C, 3]`` become ``Conv3d`` ``[C, C, 3, 1, 1]``."""
    tensors = {f"{k}.{p}": f"unet.{v}.{p}" for k, v in key_map.items() for p in ("weight", "bias")}
    tensors = {k: v for k, v in tensors.items() if v in ours}  # e.g. to_q has no bias on either side
    unexpected = sorted(set(official) - set(tensors))
    missing = sorted(k for k in tensors if k not in official and "tem" not in k)
    if unexpected or missing:
        raise WeightsError(
            f"not the official pseudo-3D UNet of this size: {len(missing)} missing "
            f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}"
        )
    out = dict(ours)
    wrong = []
    for k, dst in tensors.items():
        if k not in official:
            continue
        v = official[k]
        if "temporal_conv.weight" in k and v.dim() == 3:
            v = v[..., None, None]
        if tuple(v.shape) != tuple(ours[dst].shape):
            wrong.append(f"{k} {tuple(v.shape)} vs {tuple(ours[dst].shape)}")
        out[dst] = v.to(ours[dst].dtype)
    if wrong:
        raise WeightsError(f"official UNet shapes do not fit ({len(wrong)}): {'; '.join(wrong[:3])}")
    return out


#: module prefixes whose classes a Lightning checkpoint names as data (PL 1.4 keys ``callbacks`` by the callback's
#: class); they are read as inert stand-ins, never imported or called
LIGHTNING = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


def _stand_in(name: str) -> type:
    """An inert class standing for ``name``: creating it only keeps its arguments (no Lightning code runs)."""

    def init(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    return type(name.rsplit(".", 1)[-1], (), {"__init__": init, "__setstate__": lambda self, st: None})


def safe_load(path: str | Path) -> dict:
    """``torch.load(weights_only=True)``: tensors, containers, numbers and strings only (a Lightning checkpoint's
    epoch, callbacks and optimizer states are such data; Lightning classes it names are read as inert stand-ins).
    A file that needs any other global is refused with one line naming it, and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # read from the pickle, not run
        unsafe = [n for n in names if not n.startswith(LIGHTNING)]
        if unsafe:
            raise WeightsError(
                f"{path}: refused, it needs code to load ({', '.join(unsafe[:4])}); only tensors and plain data are read"
            )
        with torch.serialization.safe_globals([(_stand_in(n), n) for n in names]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused, it needs code to load ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def load_official_checkpoint(path: str | Path, network, use_ema: bool = True, text_model=None) -> dict:
    """Load the official Lightning checkpoint ``path`` into ``network`` (from :func:`official_denoiser`).

    ``use_ema``: the LitEma copy (``model_ema.*``) when the file has one (stage 2d; the released stage-3d model was
    trained without EMA), else the weights. ``text_model``: a ``transformers.BertModel`` that receives the file's
    ``text_transformer.*`` weights when present (strict). Returns what was read:
    ``{"source": "ema"|"model", "text": bool, "temporal": bool, "epoch", "global_step"}``."""
    return _apply(safe_load(path), path, network, use_ema, text_model)


def _apply(ckpt: dict, path, network, use_ema: bool, text_model) -> dict:
    sd = ckpt.get("state_dict", ckpt)
    unet = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if not unet:
        raise WeightsError(f"{path}: no '{PREFIX}*' tensors: not an official latent-diffusion checkpoint")
    source = "model"
    if use_ema and any(k.startswith("model_ema.") for k in sd):
        ema = {k[len("model_ema.") :]: v for k, v in sd.items() if k.startswith("model_ema.")}
        undotted = {("diffusion_model." + k).replace(".", ""): k for k in unet}
        lost = [k for s, k in undotted.items() if s not in ema]
        if lost:
            raise WeightsError(f"{path}: its EMA copy lacks {len(lost)} UNet tensors ({lost[:3]})")
        unet = {k: ema[s] for s, k in undotted.items()}
        source = "ema"
    ours = network.state_dict()
    u = network.unet
    c0 = u.block_out_channels[0]
    key_map = official_key_map(
        c0,
        [c // c0 for c in u.block_out_channels],
        [2**i for i, a in enumerate(u.attention_levels) if a],
        u.num_res_blocks[0],
    )
    network.load_state_dict(convert_official_unet(unet, ours, key_map))
    text = {k[len("text_transformer.") :]: v for k, v in sd.items() if k.startswith("text_transformer.")}
    if text and text_model is not None:
        missing, unexpected = text_model.load_state_dict(text, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise WeightsError(
                f"{path}: text_transformer does not fit the text encoder: {missing[:3]} {unexpected[:3]}"
            )
    return {
        "source": source,
        "text": bool(text),
        "temporal": any("temporal_conv" in k for k in unet),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }


def text_width(text_encoder: str) -> int:
    """Hidden size of a BERT-like text encoder (a folder or hub id), read from its config: 768 for CXR-BERT."""
    from transformers import AutoConfig

    local = Path(str(text_encoder)).exists()
    return int(AutoConfig.from_pretrained(str(text_encoder), local_files_only=local).hidden_size)


def official_stats(text_encoder: str, text_dim: int = 768, vae: str = "leanvae_dim16") -> dict:
    """What ``latent_stats.json`` would record for the official model (it has no latent cache): LeanVAE-dim16 latents
    and VAE-encoded masks, both x 1.52; label id / 400 in LeanVAE's range; body-masked training images; CXR-BERT
    (``text_encoder``: its folder or hub id), 512 tokens, all attended."""
    return {
        "vae": vae,
        "latent_channels": 16,
        "mask_channels": 16,
        "mask_encoding": "vae",
        "classes": [],
        "mask_label_scale": 400.0,
        "mask_gain": 1.0,
        "body_mask": True,
        "scale_factor": OFFICIAL_SCHEDULE["scale_factor"],
        "mask_scale_factor": OFFICIAL_SCHEDULE["scale_factor"],
        "scale_factor_fixed": True,
        "text_encoder": {"name": str(text_encoder), "dim": int(text_dim), "max_length": 512, "padding": "attend"},
        "text_dim": int(text_dim),
    }


def load_pretrained(path: str | Path, model_channels: int = 224, context_dim: int = 768, use_ema: bool = True) -> dict:
    """The official checkpoint as the bundle's inference uses it: ``{"network": official_denoiser loaded, in eval
    mode, "text": the file's text_transformer.* weights or None, "info": what load_official_checkpoint read}``."""
    network = official_denoiser(model_channels=model_channels, context_dim=context_dim)
    ckpt = safe_load(path)
    info = _apply(ckpt, path, network, use_ema, None)
    sd = ckpt.get("state_dict", ckpt)
    text = {k[len("text_transformer.") :]: v for k, v in sd.items() if k.startswith("text_transformer.")}
    return {"network": network.eval(), "text": text or None, "info": info}
