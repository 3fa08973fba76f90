"""Benchmark of the default frozen VAE (TAEF2) on real 512x512 CT slices: speed, FLOP rate, peak memory.

    python bench/bench_taef2.py --out outputs/bench        (or: make bench)

Measures, in one run on this machine:
- seconds per 512x512 slice (encode + decode) in channels-last (our default) and default memory format;
- nominal conv GFLOP per slice (counted with forward hooks) and the achieved GFLOP/s, beside a 2048^2
  fp32 matmul and a channels-last 64->64 3x3 convolution measured in the same run;
- peak RSS of a fresh process while it reconstructs 16 vs 64 slices, untiled and tiled (256 px, overlap 96),
  sampled every 2 ms; 'working memory' = peak minus the RSS before the call (model and volume loaded).
Writes bench.md and bench.json into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _slices(n: int) -> torch.Tensor:
    """n real 512x512 slices in [0, 1] as [1, 1, n, 512, 512] (the 20-slice series repeated along depth)."""
    from fvae_ct.assets import sample_ct
    from fvae_ct.transforms import recon_preprocessing

    x = recon_preprocessing()({"image": sample_ct("dicom_series_512")})["image"].as_tensor()[None]
    reps = -(-n // x.shape[2])
    return x.repeat(1, 1, reps, 1, 1)[:, :, :n].contiguous()


def _best(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best(lambda: a @ b, 5) / 1e9


def conv_gflops() -> float:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last).eval()
    x = torch.randn(1, 64, 256, 256).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t = _best(lambda: conv(x), 5)
    return 2 * 64 * 64 * 9 * 256 * 256 / t / 1e9


def conv_flops_per_slice(vae) -> float:
    """Nominal FLOPs (2 x MACs) of every Conv2d for one 512x512 slice, encode + decode."""
    total = [0]

    def hook(m, inp, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    vae.reconstruct(torch.rand(1, 1, 1, 512, 512))
    for h in hs:
        h.remove()
    return float(total[0])


def child(n: int, tile: int | None) -> None:
    """Run in a fresh process: reconstruct n slices; print peak RSS during the reconstruction as JSON."""
    from fvae_ct.tiling import TilingConfig
    from fvae_ct.vae import load

    from peak_rss import PeakRSS  # bench/peak_rss.py (this script's folder is on sys.path)

    vae = load("taef2")
    x = _slices(n)
    gc.collect()
    t = time.perf_counter()
    with PeakRSS(interval=0.002) as mon:
        vae.reconstruct(x, tiling=TilingConfig(tile_size=tile, tile_overlap=96, slice_batch=4))
    sec = time.perf_counter() - t
    before = mon.before
    mib = 2**20
    print(json.dumps({"slices": n, "tile": tile, "rss_before_mib": before / mib, "peak_rss_mib": mon.peak / mib,
                      "working_mib": (mon.peak - before) / mib, "seconds": sec, "volume_mib": x.numel() * 4 / mib}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--slices", type=int, default=8, help="slices for the speed measurement")
    ap.add_argument("--child", nargs=2, metavar=("N", "TILE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(int(a.child[0]), None if a.child[1] == "none" else int(a.child[1]))
        return

    from fvae_ct.tiling import TilingConfig
    from fvae_ct.vae import load

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    res: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    res["matmul_2048_gflops"] = matmul_gflops()
    res["conv3x3_channels_last_gflops"] = conv_gflops()
    x = _slices(a.slices)
    speed = {}
    for fmt, cl in (("channels_last", True), ("default", False)):
        vae = load("taef2", channels_last=cl)
        t = _best(lambda v=vae: v.reconstruct(x, tiling=TilingConfig(slice_batch=4)), 2)
        speed[fmt] = t / a.slices
        print(f"{fmt:14s}: {speed[fmt]:.2f} s per 512x512 slice")
    flops = conv_flops_per_slice(load("taef2"))
    res.update(seconds_per_slice=speed, gflop_per_slice=flops / 1e9,
               achieved_gflops={k: flops / v / 1e9 for k, v in speed.items()})
    rows = []
    for tile in (None, 256):
        for n in (16, 64):
            r = subprocess.run([sys.executable, __file__, "--child", str(n), str(tile or "none")],
                               capture_output=True, text=True, check=True, env=os.environ)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    res["memory"] = rows

    md = [
        "| measure | value |", "|---|---|",
        f"| fp32 matmul 2048^2 | {res['matmul_2048_gflops']:.0f} GFLOP/s |",
        f"| channels-last conv 64->64 3x3 on 256^2 | {res['conv3x3_channels_last_gflops']:.0f} GFLOP/s |",
        f"| TAEF2 nominal conv work | {res['gflop_per_slice']:.0f} GFLOP per 512x512 slice (encode + decode) |",
    ]
    for k in ("channels_last", "default"):
        md.append(f"| TAEF2 {k.replace('_', '-')} | {speed[k]:.2f} s per slice = {res['achieved_gflops'][k]:.0f} "
                  f"GFLOP/s ({100 * res['achieved_gflops'][k] / res['matmul_2048_gflops']:.0f} % of matmul) |")
    md += ["", "| slices | tiling | RSS before (MiB) | peak RSS during reconstruct (MiB) | working memory (MiB) "
           "| input volume (MiB) | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['slices']} | {'256 px, overlap 96' if r['tile'] else 'none'} | {r['rss_before_mib']:.0f} | "
                  f"{r['peak_rss_mib']:.0f} | {r['working_mib']:.0f} | {r['volume_mib']:.0f} | {r['seconds']:.1f} |")
    text = "\n".join(md)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
