"""Size of the default fvae_ldm denoiser: parameters, FLOPs and memory per training step (measured on CPU).

    python bench/bench_ldm.py [--latent_channels 32 --mask_channels 6 --hw 64 --depth 8]

Counts FLOPs of one forward + backward with torch's FlopCounterMode and peak memory of the step, for a
batch of one latent window. GPU time is then derived (FLOPs / sustained throughput), not measured.
"""

import argparse
import json
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from fvae_ct.ldm import build_denoiser


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent_channels", type=int, default=32)
    ap.add_argument("--mask_channels", type=int, default=6)
    ap.add_argument("--text_dim", type=int, default=384)
    ap.add_argument("--hw", type=int, default=64)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--mode", default="attention")
    a = ap.parse_args()
    net = build_denoiser(a.latent_channels, a.mask_channels, a.text_dim, mode=a.mode)
    x = torch.randn(1, a.latent_channels + a.mask_channels, a.depth, a.hw, a.hw)
    t = torch.tensor([500])
    ctx, cm = torch.randn(1, 32, a.text_dim), torch.ones(1, 32, dtype=torch.long)
    n2d = sum(p.numel() for p in net.unet.parameters())
    n3d = sum(p.numel() for p in net.parameters_3d())
    rss0 = psutil.Process().memory_info().rss
    flops = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with flops:
        y = net(x, t, ctx, cm)
        y.square().mean().backward()
    sec = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss - rss0
    res = {"params_2d": n2d, "params_3d": n3d, "window": [a.depth, a.hw, a.hw],
           "gflop_per_step": flops.get_total_flops() / 1e9, "cpu_seconds": sec, "cpu_rss_growth_mib": rss / 2**20}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
