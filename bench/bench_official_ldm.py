"""The paper's released generation denoiser at full size on this machine's CPU: seconds per DDIM step per window.

The official pseudo-3D UNet (:func:`fvae_ct.ldm.official.official_denoiser`: 224 channels x [1, 2, 3, 4], 32 -> 16
latent channels, a temporal conv after every 3x3 conv; 481.9 M parameters) with random weights (the work and memory
are the real model's) on one window: 17 latent slices of 64 x 64 (65 CT slices of 512 x 512 through LeanVAE-dim16),
context 512 x 768 (CXR-BERT), fp32, no autograd. Peak RSS of the process is read with psutil.

    python bench/bench_official_ldm.py --out outputs/bench_official_ldm [--steps 2]       # part of make bench
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_official_ldm")
    ap.add_argument("--steps", type=int, default=2, help="timed denoiser calls (after one warm-up)")
    a = ap.parse_args(argv)
    from fvae_ct.ldm.official import official_denoiser

    proc, peak = psutil.Process(), [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    torch.manual_seed(0)
    net = official_denoiser().eval()
    params = sum(p.numel() for p in net.parameters())
    rss_model = proc.memory_info().rss
    x, t, ctx = torch.randn(1, 32, 17, 64, 64), torch.tensor([951]), torch.randn(1, 512, 768)
    with torch.no_grad():
        net(x, t, ctx)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.steps):
            net(x, t, ctx)
        sec = (time.perf_counter() - t0) / a.steps
    done.set()
    row = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "parameters": params,
        "seconds_per_step_per_window": sec,
        "rss_model_mib": rss_model / 2**20,
        "peak_rss_mib": max(peak[0], proc.memory_info().rss) / 2**20,
        "generation_estimate_s": {  # 512 x 512 x 128 slices, official long volume: 2 + 2 windows, 20 / 50 steps
            "20_steps": 4 * 20 * sec,
            "50_steps": 4 * 50 * sec,
        },
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_official_ldm.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
