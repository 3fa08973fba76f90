"""One short GPU run: seconds and peak GPU memory of every VAE at full size, and training steps per second.

On CUDA, with full-size models of the real architectures and reproducible random weights (the work and memory are
the real models'; nothing is downloaded), on a real CT volume tiled to 512x512x128 from the sample DICOM series
(a synthetic CT-like phantom of that size when the sample is not reachable, said in the output):

- encode + decode (``reconstruct``) with TAEF2, Wan 2.1, Wan 2.2, IV-VAE z16 dim64, LeanVAE dim16; fp32 and bf16;
  untiled and tiled (x-y tiles of 256 with 64 overlap; video VAEs also 33-slice depth windows overlapping by 4);
- one LDM training step (the default denoiser, stage 3d attention, batch 8 windows of 16 latent slices of the
  512x512 TAEF2 latent grid) and one seg training step (default SegResNet, 96x96x64 patches, batch 2), bf16 autocast;
- the paper's released denoiser at full size: one DDIM step per 17-latent window in fp32 and bf16, and a whole
  50-step generation of a 512x512x128 volume the official way (two passes, LeanVAE decoding);

writes ``bench_gpu.md`` / ``bench_gpu.json`` and prints the table. Rows are skipped (and listed as skipped) rather
than let the whole run pass ``--budget_s`` (default 420 s). Without CUDA it exits at once with one line (status 2).

    python bench/bench_gpu.py --out outputs/bench_gpu            # make bench-gpu
    python bench/bench_gpu.py --bf16-check-cpu                    # TAEF2 fp32 vs bf16 autocast PSNR, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VAES = ("taef2", "wan2.1", "wan2.2", "ivvae_z16_dim64", "leanvae_dim16")


def full_size_vae(name: str, dtype: torch.dtype):
    """The named VAE at full size with seeded random weights (no download)."""
    torch.manual_seed(0)
    if name == "taef2":
        from fvae_ct.vae.image_ae import TAESDVAE

        return TAESDVAE(None, None, latent_channels=32, pool_width=256, name="taef2")
    if name.startswith("wan"):
        from diffusers import AutoencoderKLWan

        from fvae_ct.vae.wan import WanVAE
        from fvae_ct.vae.wan_checkpoint import WAN_CONFIGS

        return WanVAE(model=AutoencoderKLWan(**WAN_CONFIGS[name]), name=name, dtype=dtype)
    if name.startswith("ivvae"):
        from fvae_ct.vae.ivvae import IVVAE, IVVAENet

        return IVVAE(model=IVVAENet(16, 64), dtype=dtype)
    from fvae_ct.vae.leanvae import LEANVAE_CONFIGS, LeanVAE, LeanVAENet

    return LeanVAE(model=LeanVAENet(**LEANVAE_CONFIGS["dim16"]), dtype=dtype)


def ct_volume(depth: int = 128) -> tuple[np.ndarray, str]:
    """[D, 512, 512] HU: the sample DICOM series mirrored along depth to ``depth`` slices, or a phantom."""
    try:
        from fvae_ct.assets import sample_ct
        from fvae_ct.transforms import to_slices
        from fvae_ct.io import load_ct

        img = load_ct(sample_ct("dicom_series_512", None))
        v, _ = to_slices(img[0].numpy(), np.asarray(img.affine))
        reps = np.concatenate([v, v[::-1]] * (depth // (2 * len(v)) + 1))[:depth]
        return reps.astype(np.float32), f"sample DICOM series ({len(v)} slices) mirrored to {depth}"
    except Exception as e:  # noqa: BLE001 - no sample here: a phantom of the same size
        z, y, x = np.mgrid[:depth, :512, :512]
        body = ((y - 256) / 200.0) ** 2 + ((x - 256) / 240.0) ** 2 < 1
        v = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 20, body.shape)
        return v.astype(np.float32), f"synthetic phantom (sample not reachable: {type(e).__name__})"


def _measure(fn, sync=True) -> tuple[float, float]:
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def bench_vaes(vol: np.ndarray, budget: float, t_start: float) -> list[dict]:
    from fvae_ct.tiling import TilingConfig

    rows = []
    for name in VAES:
        for dtype in (torch.float32, torch.bfloat16):
            for tiled in (False, True):
                row = {"row": f"{name} {str(dtype)[6:]} {'tiled' if tiled else 'untiled'}"}
                vae = x = None
                if time.perf_counter() - t_start > budget:
                    rows.append({**row, "status": "skipped (time budget)"})
                    continue
                if name == "taef2" and dtype != torch.float32:
                    rows.append({**row, "status": "n/a (TAEF2 stays fp32)"})
                    continue
                try:
                    vae = full_size_vae(name, dtype).to("cuda")
                    lo, hi = vae.input_range
                    x = torch.from_numpy((np.clip(vol, -1000, 1000) + 1000) / 2000 * (hi - lo) + lo)[None, None]
                    video = vae.depth_factor > 1
                    tiling = TilingConfig(
                        tile_size=256 if tiled else None,
                        tile_overlap=64,
                        depth_window=33 if (tiled and video) else None,
                        depth_overlap=4,
                        slice_batch=8,
                    )
                    vae.reconstruct(x[:, :, :9, :256, :256], tiling=TilingConfig())  # warm-up
                    sec, peak = _measure(lambda: vae.reconstruct(x, tiling=tiling))
                    rows.append({**row, "status": "ok", "seconds": sec, "peak_gib": peak,
                                 "tiling": tiling.as_dict()})
                except torch.cuda.OutOfMemoryError:
                    rows.append({**row, "status": "out of memory"})
                except Exception as e:  # noqa: BLE001 - one row fails, the others still run
                    rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
                finally:
                    vae = x = None
                    torch.cuda.empty_cache()
                print(rows[-1], flush=True)
    return rows


def bench_training(budget: float, t_start: float) -> list[dict]:
    rows = []
    if time.perf_counter() - t_start > budget:
        return [{"row": "LDM step", "status": "skipped (time budget)"}, {"row": "seg step", "status": "skipped"}]
    from fvae_ct.ldm import build_denoiser

    torch.manual_seed(0)
    net = build_denoiser(32, 6, 384).cuda()
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.randn(8, 38, 16, 64, 64, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    ctx, mask = torch.randn(8, 128, 384, device="cuda"), torch.ones(8, 128, device="cuda")

    def ldm_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(net(x, t, ctx, mask).float(), x[:, :32])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows.append(_steps("LDM step (denoiser, 8 windows x 16 x 64 x 64 latents, bf16)", ldm_step))
    net = opt = x = None
    torch.cuda.empty_cache()
    from monai.losses import DiceCELoss
    from monai.networks.nets import SegResNet

    from fvae_ct.aug_seg.workflow import DEFAULT_NETWORK as D

    seg = SegResNet(3, D["init_filters"], 1, 3, blocks_down=D["blocks_down"], blocks_up=D["blocks_up"]).cuda()
    opt = torch.optim.AdamW(seg.parameters(), 2e-4)
    img = torch.rand(2, 1, *D["patch_size"], device="cuda")
    lab = torch.randint(0, 3, (2, 1, *D["patch_size"]), device="cuda")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def seg_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(seg(img).float(), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows.append(_steps(f"seg step (SegResNet, 2 x {'x'.join(map(str, D['patch_size']))}, bf16)", seg_step))
    return rows


def bench_official_ldm(budget: float, t_start: float) -> list[dict]:
    """The paper's released denoiser at full size (481.9 M parameters, random weights): one DDIM step on one window
    (17 x 64 x 64 latents, context 512 x 768) in fp32 and bf16 autocast, then a whole 50-step generation of a
    512 x 512 x 128-slice volume the official way (two passes of 65-slice windows, re-injection, seams swapped;
    LeanVAE-dim16 decoding each window; mask encoding and text not included)."""
    if time.perf_counter() - t_start > budget:
        return [{"row": "official LDM", "status": "skipped (time budget)"}]
    from fvae_ct.ldm import make_scheduler, sample_latents
    from fvae_ct.ldm.long_volume import official_long_volume
    from fvae_ct.ldm.official import official_denoiser

    torch.manual_seed(0)
    net = official_denoiser().cuda().eval()
    x, t = torch.randn(1, 32, 17, 64, 64, device="cuda"), torch.tensor([951], device="cuda")
    ctx = torch.randn(1, 512, 768, device="cuda")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):

        def step(dtype=dtype):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                net(x, t, ctx)

        name = "fp32" if dtype == torch.float32 else "bf16"
        rows.append(_steps(f"official LDM: one DDIM step, 1 window 17 x 64 x 64, context 512 x 768, {name}", step))
    if time.perf_counter() - t_start > budget:
        return rows + [{"row": "official LDM generation", "status": "skipped (time budget)"}]
    vae = full_size_vae("leanvae_dim16", torch.float32).cuda()
    sched = make_scheduler("ddpm", sampler=True, ddim_spacing="ldm")
    mask = torch.randn(1, 16, 17, 64, 64, device="cuda")

    def generate(start, stop, previous):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            z = sample_latents(net, sched, (1, 16, 17, 64, 64), mask, ctx, None, steps=50, eta=1.0,
                               depth_window=None, depth_overlap=0, previous=previous)
            x = vae.decode(z.float() / 1.52)
        return x[0, 0, : stop - start], z[:, :, -1:]

    sec, peak = _measure(lambda: official_long_volume(generate, 128))
    row = {"row": "official LDM: 50-step generation, 512 x 512 x 128 slices (4 windows, bf16 UNet)", "status": "ok",
           "seconds": sec, "peak_gib": peak}
    print(row, flush=True)
    return rows + [row]


def _steps(label: str, step, n: int = 10) -> dict:
    try:
        for _ in range(3):
            step()
        sec, peak = _measure(lambda: [step() for _ in range(n)])
        out = {"row": label, "status": "ok", "steps_per_s": n / sec, "peak_gib": peak}
    except torch.cuda.OutOfMemoryError:
        out = {"row": label, "status": "out of memory"}
    print(out, flush=True)
    return out


def bf16_check_cpu(out: Path) -> dict:
    """TAEF2 (real weights) on the sample series, fp32 vs bf16 autocast on the CPU: PSNR and the difference."""
    from fvae_ct.metrics import recon_metrics
    from fvae_ct.transforms import recon_preprocessing
    from fvae_ct.vae import load

    vae = load("taef2")
    pre = recon_preprocessing("image", (-1000, 1000), vae.input_range)
    from fvae_ct.assets import sample_ct

    d = pre({"image": sample_ct("dicom_series_512", None)})
    x = d["image"].as_tensor()[None]
    res = {}
    for label, ctx in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        t0 = time.perf_counter()
        if ctx is None:
            y = vae.reconstruct(x)
        else:
            with torch.autocast("cpu", dtype=ctx):
                y = vae.reconstruct(x)
        sec = time.perf_counter() - t0
        hu_x = (x[0, 0].numpy() * 2000 - 1000)
        hu_y = np.round(y.float()[0, 0].numpy() * 2000 - 1000)
        m = recon_metrics(hu_x, hu_y, (-1000, 1000))
        res[label] = {"psnr": m["psnr"], "ssim2d": m["ssim2d"], "seconds": sec}
        print(label, res[label], flush=True)
    res["psnr_loss_db"] = res["fp32"]["psnr"] - res["bf16 autocast"]["psnr"]
    res["decision"] = "TAEF2 stays fp32" if res["psnr_loss_db"] > 0.1 else "bf16 is safe for TAEF2"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_cpu_taef2.json").write_text(json.dumps(res, indent=2))
    print(f"bf16 autocast loses {res['psnr_loss_db']:.3f} dB on TAEF2: {res['decision']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_gpu")
    ap.add_argument("--budget_s", type=float, default=420.0, help="skip further rows after this many seconds")
    ap.add_argument("--bf16-check-cpu", action="store_true", help="TAEF2 fp32 vs bf16 autocast on the CPU")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.bf16_check_cpu:
        bf16_check_cpu(out)
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False): nothing measured")
        return 2
    t_start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(0)
    vol, source = ct_volume()
    rows = bench_vaes(vol, a.budget_s, t_start) + bench_training(a.budget_s, t_start)
    rows += bench_official_ldm(a.budget_s + 180, t_start)  # its own 3 minutes: what a site waits for
    lines = [f"GPU: {gpu}; torch {torch.__version__}; volume 512x512x128 ({source}); "
             "tiled = x-y tiles 256 / overlap 64 (+ 33-slice depth windows / overlap 4 for video VAEs)", "",
             "| run | status | seconds | steps/s | peak GPU GiB |", "|---|---|---|---|---|"]
    for r in rows:
        sec = f"{r['seconds']:.2f}" if "seconds" in r else ""
        sps = f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        lines.append(f"| {r['row']} | {r['status']} | {sec} | {sps} | {peak} |")
    lines.append(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.md").write_text("\n".join(lines) + "\n")
    (out / "bench_gpu.json").write_text(json.dumps({"gpu": gpu, "volume": source, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
