"""The fvae_ldm denoiser: built from its architecture (train.yaml's options, or what a checkpoint records), and the
weights of a train.yaml checkpoint loaded into it (inference, and stage 3d starting from stage 2d)."""

from __future__ import annotations

import inspect

from ..errors import OptionError
from ..options import parse_bool
from .diffusion import make_scheduler
from .record import check_record, plain_architecture, recorded

__all__ = ["build_denoiser", "ARCHITECTURE_OPTIONS", "recorded_architecture", "load_denoiser", "load_stage2d"]


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
        arch = plain_architecture(rec)
        wanted = plain_architecture(ask)
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
    return plain_architecture(arch)


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
