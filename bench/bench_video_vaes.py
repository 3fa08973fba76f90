"""Benchmark of our IV-VAE and LeanVAE at full size on real 512x512 CT slices: speed and peak memory.

    python bench/bench_video_vaes.py --out outputs/bench_video [--slices 5,9]

The official weights cannot be downloaded on this machine, so the networks carry reproducible random weights
(:func:`fvae_ct.testing.keyed_weights`) of the released shapes (IV-VAE z16 dim64, LeanVAE dim16): the work
and the memory are those of the real models, the reconstructions are not. Each measurement runs in a fresh
process: ``reconstruct`` of n real slices (the DICOM sample), peak RSS sampled every 2 ms; working memory =
peak minus the RSS with model and volume loaded. Both models stream the volume through the network one
group of 4 slices at a time, so the working memory should not grow with n beyond the output volume.
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

MODELS = ("ivvae_z16_dim64", "leanvae_dim16")


def _build(name: str):
    from fvae_ct.testing import keyed_weights
    from fvae_ct.vae.ivvae import IVVAE, IVVAENet
    from fvae_ct.vae.leanvae import LEANVAE_CONFIGS, LeanVAE, LeanVAENet

    if name.startswith("ivvae"):
        net = IVVAENet(16, 64)
        net.load_state_dict(keyed_weights(net), strict=True)
        return IVVAE(model=net)
    net = LeanVAENet(**LEANVAE_CONFIGS["dim16"])
    net.load_state_dict(keyed_weights(net), strict=True)
    return LeanVAE(model=net)


def _slices(n: int, lo: float, hi: float) -> torch.Tensor:
    """n real 512x512 slices in [lo, hi] as [1, 1, n, 512, 512] (the 20-slice series, repeated if needed)."""
    from fvae_ct.assets import sample_ct
    from fvae_ct.transforms import recon_preprocessing

    x = recon_preprocessing(input_range=(lo, hi))({"image": sample_ct("dicom_series_512")})["image"].as_tensor()[None]
    reps = -(-n // x.shape[2])
    return x.repeat(1, 1, reps, 1, 1)[:, :, :n].contiguous()


def child(name: str, n: int) -> None:
    from peak_rss import PeakRSS  # bench/peak_rss.py (this script's folder is on sys.path)

    vae = _build(name)
    x = _slices(n, *vae.input_range)
    gc.collect()
    t = time.perf_counter()
    with PeakRSS(interval=0.002) as mon:
        y = vae.reconstruct(x)
    sec = time.perf_counter() - t
    mib = 2**20
    params = sum(p.numel() for p in vae.parameters())
    print(json.dumps({"model": name, "slices": n, "params_m": params / 1e6, "seconds": sec, "s_per_slice": sec / n,
                      "rss_before_mib": mon.before / mib, "peak_rss_mib": mon.peak / mib,
                      "working_mib": (mon.peak - mon.before) / mib, "volume_mib": x.numel() * 4 / mib,
                      "finite": bool(torch.isfinite(y).all())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench_video")
    ap.add_argument("--slices", default="5,9", help="comma-separated slice counts (1 + 4k avoids padding)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    rows = []
    for name in a.models.split(","):
        for n in (int(s) for s in a.slices.split(",")):
            r = subprocess.run([sys.executable, __file__, "--child", name, str(n)], capture_output=True, text=True,
                               check=True, env=os.environ)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    md = ["| model (random weights, released shapes) | params | slices | s per 512x512 slice | RSS before (MiB) | "
          "peak RSS (MiB) | working memory (MiB) | input volume (MiB) |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['params_m']:.1f} M | {r['slices']} | {r['s_per_slice']:.2f} | "
           f"{r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['working_mib']:.0f} | {r['volume_mib']:.0f} |"
           for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                "rows": rows}, indent=1) + "\n")
    (out / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
