"""What a train.yaml checkpoint records of its training (``checkpoint["record"]``) and how it is read back: the
conditioning it was trained with (checked against latent_stats.json), its depth window and its architecture."""

from __future__ import annotations

from ..errors import InputError
from ..options import parse_bool

__all__ = ["TrainingRecord", "check_record", "recorded", "trained_depth"]


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
        self.data["architecture"] = plain_architecture(architecture) if architecture is not None else None

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


def plain_architecture(arch: dict) -> dict:
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
