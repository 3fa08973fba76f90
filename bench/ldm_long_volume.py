"""Long-volume sampling against whole-volume sampling and the prior, with exact depth-coupled denoisers.

For each prior (AR(1) rho 0.95 and a squared-exponential covariance of length 12: a longer, non-Markov correlation)
and each long-volume mode, the denoiser is the optimal one for the prior on whatever window it gets
(:class:`fvae_ct.ldm.gaussian.GaussianDepthDenoiser`), so every difference from whole-volume sampling is the
sampler's. Prints a markdown table (the LDM README's) and writes it with the per-slice variances as JSON.

    python bench/ldm_long_volume.py [--depth 51 --window 17 --overlap 8 --steps 20 --seeds 8 --size 32]

Modes: whole volume (the reference); ``blend`` with overlap 0 (plain windows), fixed grid, shifting grid (the old
default); ``select`` (a variant tried here, not a bundle option: shifting grid, each slice takes the prediction of the
window where it is most central, no averaging); ``official`` (the latent-space form of the paper's two passes, as
the bundle runs it for a VAE without depth compression: offset window // 2, seams swapped +- window // 4); ``chain``
(the default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fvae_ct.ldm import make_scheduler, sample_latents
from fvae_ct.ldm.gaussian import GaussianDepthDenoiser, ar1, depth_statistics, sq_exp
from fvae_ct.ldm.long_volume import chain_windows, fusion_boundaries, official_long_volume, pass_windows
from fvae_ct.tiling import depth_window_starts

PRIORS = {"AR(1) rho 0.95": ar1(0.95), "squared-exponential, length 12": sq_exp(12.0)}


def select_apply(fn, x, window, overlap, offset):
    """Each slice takes the prediction of the window (grid shifted by ``offset``) where it is farthest from an
    inner window edge."""
    d = x.shape[2]
    out, best = torch.empty_like(x), torch.full((d,), -1.0)
    for a, b in depth_window_starts(d, window, overlap, offset):
        y = fn(x[:, :, a:b])
        for j in range(a, b):
            margin = min(j - a + 0.5 if a > 0 else 1e9, b - j - 0.5 if b < d else 1e9)
            if margin > best[j]:
                best[j], out[:, :, j] = margin, y[:, :, j - a]
    return out


def sample(model, mode, shape, seed, args):
    sched = make_scheduler(sampler=True)
    w, ov, d = args.window, args.overlap, shape[2]
    common = dict(steps=args.steps, seed=seed)
    if mode == "whole volume":
        return sample_latents(model, sched, shape, **common)
    if mode == "chain (default)":
        return sample_latents(model, sched, shape, depth_window=w, depth_overlap=ov, long_volume="chain", **common)
    if mode.startswith("blend"):
        o = 0 if "plain" in mode else ov
        shift = "shifting" in mode
        return sample_latents(
            model, sched, shape, depth_window=w, depth_overlap=o, depth_shift=shift, long_volume="blend", **common
        )
    if mode.startswith("select"):
        import fvae_ct.ldm.sampling as sampling

        original = sampling.shifted_depth_apply
        sampling.shifted_depth_apply = select_apply
        try:
            return sample_latents(model, sched, shape, depth_window=w, depth_overlap=ov, long_volume="blend", **common)
        finally:
            sampling.shifted_depth_apply = original
    if mode == "official":
        calls = []

        def generate(start, stop, previous):
            calls.append(start)
            z = sample_latents(model, sched, (*shape[:2], stop - start, *shape[3:]), previous=previous,
                               steps=args.steps, seed=seed * 1000 + len(calls), long_volume="blend")
            return z[0].transpose(0, 1), z[:, :, -1:]  # slices first, as the official generate returns them

        vol = official_long_volume(generate, d, w, w // 2, w // 4, w - 1, 1)
        return vol.transpose(0, 1)[None]
    raise ValueError(mode)


def seams_of(mode, args, d):
    w, ov = args.window, args.overlap
    if mode.startswith("chain"):
        return [a + k for a, b, k in chain_windows(d, w, ov) if k]
    if mode == "official":
        starts = [s for s, _, _ in pass_windows(d, w)][1:]
        swaps = [e for b in fusion_boundaries(len(starts) + 1, w - 1, 1) for e in (b - w // 4, b + w // 4)]
        return sorted({*starts, *[s for s in swaps if 0 < s < d]})
    wins = depth_window_starts(d, w, 0 if "plain" in mode else ov)
    return sorted({a for a, _ in wins[1:]} | {b for _, b in wins[:-1]})


MODES = [
    "whole volume",
    "blend, plain windows (overlap 0, fixed grid)",
    "blend, fixed grid",
    "blend, shifting grid (the old default)",
    "select (shifting grid, most central window)",
    "official",
    "chain (default)",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=51)
    p.add_argument("--window", type=int, default=17)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--out", default="outputs/ldm_long_volume")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    shape = (1, 1, args.depth, args.size, args.size)
    lines = [
        f"depth {args.depth} latent slices, window {args.window}, overlap {args.overlap}, {args.steps} DDIM steps, "
        f"eta 0, {args.seeds} seeds x {args.size} x {args.size}; in brackets: the ratio to whole-volume sampling; the "
        "prior's own values (variance 1) in its last row",
        "",
        "| prior | mode | variance | lag-1 autocorr. | lag-4 | lag-8 | seam ratio | band variance ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    result, t0 = {}, time.time()
    for pname, cov in PRIORS.items():
        model = GaussianDepthDenoiser(cov)
        ref = None
        for mode in MODES:
            zs = torch.cat([sample(model, mode, shape, s, args)[0] for s in range(args.seeds)])
            st = depth_statistics(zs, seams=seams_of(mode, args, args.depth))
            ref = ref or st
            r = {k: st[k] / ref[k] for k in ("var", "ac1", "ac4", "ac8")}
            lines.append(
                f"| {pname} | {mode} | "
                + " | ".join(f"{st[k]:.3f} ({r[k]:.3f})" for k in ("var", "ac1", "ac4", "ac8"))
                + f" | {st['seam_ratio']:.3f} | {st['band_var_ratio']:.3f} |"
            )
            print(lines[-1], flush=True)
            result[f"{pname} / {mode}"] = {**{k: v for k, v in st.items() if k != "var_per_slice"},
                                           "var_per_slice": st["var_per_slice"].tolist()}
        i = torch.arange(args.depth, dtype=torch.float64)
        c = cov(i)
        lines.append(
            f"| {pname} | the prior | 1.000 | "
            + " | ".join(f"{float(c.diagonal(k).mean()):.3f}" for k in (1, 4, 8))
            + " | | |"
        )
    lines.append(f"\n({time.time() - t0:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_volume.md").write_text("\n".join(lines) + "\n")
    (out / "long_volume.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
