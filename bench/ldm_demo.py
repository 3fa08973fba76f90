"""Does the fvae_ldm bundle learn, and does it beat what needs no learning? `make ldm-demo`, ~15 min on 2 CPU cores.

    python bench/ldm_demo.py --out outputs/ldm_demo [--minutes_2d 10 --minutes_3d 2.5 --seeds 4 --prior_skip true]
    python bench/ldm_demo.py --out outputs/ldm_demo --reuse    # evaluate that run's trained models again

Data (real, from $FVAE_ASSETS/ct): training = the TotalSegmentator abdomen CT (122 x 101 x 30, 3 mm) with its organ
label map and a one-line report; held out = the 512 x 512 DICOM series (another acquisition: a Siemens scan in its
own patient coordinates; TotalSegmentator's test files do not say whether the patient differs), resampled to 3 mm
like the training CT, with its organ label map. Nothing of the held-out scan is seen in training.

The bundle's own configs run in this process (prepare.yaml -> train.yaml stage 2d -> stage 3d -> inference.yaml,
TAEF2 latents, a smaller UNet than the default so that it trains on a CPU); training stops at a wall-time budget.
Three denoisers are compared on the held-out scan:
- zero: the untrained network without the prior skip (MONAI's zero-initialised output layer predicts 0 noise);
- Gaussian prior: no learning, the optimal denoiser if the latents were independent Gaussians with the training
  latents' mean and variance per channel (:class:`fvae_ct.ldm.gaussian.GaussianPriorDenoiser`);
- trained: the stage-3d EMA weights, what inference uses (trained with train.yaml's default ``prior_skip``: the
  network predicts the noise around the unit-Gaussian prior's ``sqrt(1 - alpha_cumprod[t]) x_t``; ``--prior_skip
  false`` trains a plain epsilon UNet, the official parametrisation).
For each: the epsilon MSE on the held-out latents per timestep (fixed noise, 4 noise seeds; t = 981 is the first
DDIM step at 50 steps) and, for comparison, on the training CT's latents (seen in training), a bias diagnostic at high t (least-squares slope of predicted on true epsilon, per-channel
mean of the error), and generation from the held-out mask over --seeds sampling seeds (DDIM 50 steps, guidance 2):
median HU per organ and mask adherence (Dice / NSD at 2 mm of a fixed HU-window segmenter: each organ's 10th-90th
HU percentile in the training CT, against the conditioning mask; the same segmenter on the real held-out CT is the
reference), mean +- standard deviation over seeds. Writes results.json, results.md, loss.png, slices.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "bundles" / "fvae_ldm" / "configs"
ORGANS = {1: "spleen", 5: "liver", 6: "stomach"}  # the mask classes present in the held-out scan
REPORT = "CT of the upper abdomen: liver, spleen and stomach unremarkable."
TIMESTEPS = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950, 981, 999]  # 981: the first DDIM step at 50 steps
HIGH_T = [950, 981, 999]
MODELS = ("zero", "Gaussian prior", "trained")
SMALL = {  # a UNet that trains on 2 CPU cores
    "unet_channels": [64, 128, 128],
    "attention_levels": [False, True, True],
    "num_head_channels": 16,
    "norm_num_groups": 16,
    "num_res_blocks": 1,
    "consistency_levels": [1, 2],
}


def make_data(out: Path) -> tuple[Path, Path, Path]:
    """Datalist of the training case, the held-out CT and its mask (NIfTI, written under ``out``)."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from fvae_ct.assets import sample_ct, sample_dir
    from fvae_ct.io import load_ct, load_labels, save_nifti_atomic

    ct_dir = Path(sample_dir())
    out.mkdir(parents=True, exist_ok=True)
    dcm = load_ct(sample_ct())
    lab = load_labels(str(ct_dir / "dicom_series_512_seg.nii.gz"), np.asarray(dcm.affine), dcm.shape[1:])
    lab = MetaTensor(torch.from_numpy(lab[None].astype(np.float32)), affine=dcm.affine)
    pix = (3.0, 3.0, 3.0)  # the training CT's voxel size
    img3 = Spacing(pix, mode="bilinear")(dcm)
    lab3 = Spacing(pix, mode="nearest")(lab)
    save_nifti_atomic(np.round(img3[0].numpy()).astype(np.int16), np.asarray(img3.affine), out / "heldout_ct.nii.gz")
    save_nifti_atomic(lab3[0].numpy().astype(np.uint8), np.asarray(lab3.affine), out / "heldout_seg.nii.gz")
    items = [{"image": str(ct_dir / "totalseg_ct_sm_3mm.nii.gz"), "label": str(ct_dir / "totalseg_ct_sm_3mm_seg.nii.gz"),
              "report": REPORT}]
    (out / "datalist.json").write_text(json.dumps(items, indent=1))
    return out / "datalist.json", out / "heldout_ct.nii.gz", out / "heldout_seg.nii.gz"


def parser(config: str, root: Path, **over) -> "ConfigParser":  # noqa: F821
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(CONF / config))
    p.update({"bundle_root": str(root), **over})
    return p


def train(root: Path, stage: str, minutes: float, lr: float, scheduler: str = "ddpm", prior_skip: bool = True) -> dict:
    """train.yaml for ``stage`` with a wall-time budget (ignite TimeLimit); returns the loss history."""
    from ignite.engine import Events
    from ignite.handlers import TimeLimit

    p = parser("train.yaml", root, stage=stage, learning_rate=lr, train_depth=8, batch_size=4,
               samples_per_epoch=40, max_epochs=100000, scheduler=scheduler, prior_skip=prior_skip, **SMALL)
    trainer = p.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(int(minutes * 60)))
    t0 = time.time()
    p.get_parsed_content("run")
    losses = json.loads((root / "eval" / "train_loss.json").read_text())["loss"]
    (root / "eval" / f"train_loss_{stage}.json").write_text(json.dumps({"loss": losses}))
    return {"iterations": len(losses), "seconds": time.time() - t0, "loss": losses}


def gaussian_prior(root: Path):
    """The closed-form baseline: per-channel mean and variance of the scaled training latents."""
    from fvae_ct.ldm.gaussian import GaussianPriorDenoiser

    stats = json.loads((root / "latents" / "latent_stats.json").read_text())
    zs = [torch.load(f, weights_only=True)["latent"] for f in sorted((root / "latents").glob("*.pt"))]
    z = torch.cat([v.flatten(1) for v in zs], 1).double() * stats["scale_factor"]  # [C, N]
    return GaussianPriorDenoiser(z.mean(1), z.var(1)).eval()


def heldout_latents(root: Path, held_ct: Path, held_seg: Path) -> Path:
    """The held-out scan encoded like the training cache (TAEF2, the same mask classes), once."""
    from fvae_ct.ldm import prepare_latents

    cache = root / "heldout_latents"
    if not (cache / "heldout_ct.pt").is_file():
        (root / "heldout.json").write_text(json.dumps([{"image": str(held_ct), "label": str(held_seg)}]))
        from fvae_ct.vae import load

        prepare_latents(str(root / "heldout.json"), load("taef2"), str(cache), [1, 2, 3, 5, 6, 7])
    return cache / "heldout_ct.pt"


@torch.no_grad()
def denoising_eval(network, root: Path, latent_file: Path, seeds: int = 4) -> dict:
    """Epsilon MSE of ``network`` on one cached case's latents per timestep (:data:`TIMESTEPS`, 4 noise seeds) and
    their mean over 50 .. 950; at :data:`HIGH_T` the least-squares slope of predicted on true epsilon and the
    per-channel mean of the error (its root mean square over channels and its largest magnitude)."""
    from fvae_ct.ldm import make_scheduler

    rec = torch.load(latent_file, weights_only=True)
    stats = json.loads((root / "latents" / "latent_stats.json").read_text())
    text = json.loads((root / "text.json").read_text())
    z0 = rec["latent"][None] * stats["scale_factor"]
    m = rec["mask"][None] * stats.get("mask_scale_factor", 1.0)
    h, w = z0.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    z0 = torch.nn.functional.pad(z0, (0, pw, 0, ph, 0, 0), mode="replicate")
    m = torch.nn.functional.pad(m, (0, pw, 0, ph, 0, 0), mode="replicate")
    ctx, cmask = torch.tensor(text["text"])[None], torch.tensor(text["mask"])[None]
    sched = make_scheduler("ddpm")
    per_t, bias = {}, {}
    for t in TIMESTEPS:
        losses, preds, eps_all = [], [], []
        for s in range(seeds):
            eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1000 * s + t))
            tt = torch.tensor([t])
            pred = network(torch.cat([sched.add_noise(z0, eps, tt), m], 1), tt, ctx, cmask)
            losses.append(float(((pred - eps) ** 2).mean()))
            preds.append(pred)
            eps_all.append(eps)
        per_t[t] = float(np.mean(losses))
        if t in HIGH_T:
            p, e = torch.cat(preds).double(), torch.cat(eps_all).double()
            slope = float(((p - p.mean()) * (e - e.mean())).sum() / ((e - e.mean()) ** 2).sum())
            ch = (p - e).transpose(0, 1).flatten(1).mean(1)  # per-channel mean error
            bias[t] = {"slope": slope, "channel_mean_error_rms": float(ch.pow(2).mean().sqrt()),
                       "channel_mean_error_max": float(ch.abs().max())}
    return {"loss": float(np.mean([per_t[t] for t in TIMESTEPS if t <= 950])), "per_t": per_t, "bias": bias}


def hu_window_segmenter(train_items: list[dict], folder: Path) -> dict[int, tuple[float, float]]:
    """Each organ's 10th-90th HU percentile over the training CTs (the segmenter's fixed windows)."""
    vals = {c: [] for c in ORGANS}
    for it in train_items:
        hu = np.asarray(nib.load(str(folder / it["image"])).dataobj)
        lab = np.asarray(nib.load(str(folder / it["label"])).dataobj)
        for c in ORGANS:
            vals[c].append(hu[lab == c])
    return {c: tuple(float(q) for q in np.percentile(np.concatenate(v), [10, 90])) for c, v in vals.items()}


def score(hu: np.ndarray, lab: np.ndarray, spacing, windows) -> dict:
    from fvae_ct.ldm.generation_metrics import mask_adherence, organ_median_hu

    out = {f"median_hu_{ORGANS[c]}": v for c, v in organ_median_hu(hu, lab, list(ORGANS)).items()}
    for c, (lo, hi) in windows.items():
        pred = ((hu >= lo) & (hu <= hi)).astype(np.uint8)
        a = mask_adherence(pred, (lab == c).astype(np.uint8), spacing, [1], tolerance_mm=2.0)
        out[f"dice_{ORGANS[c]}"], out[f"nsd_{ORGANS[c]}"] = a["dice_1"], a["nsd_1"]
    return out


def figures(out: Path, hist: dict, baselines: dict, vols: dict, lab: np.ndarray, affine) -> None:
    import matplotlib.pyplot as plt

    from fvae_ct.transforms import to_slices

    fig, ax = plt.subplots(figsize=(7, 4))
    start = 0
    for stage, col in (("2d", "tab:blue"), ("3d", "tab:red")):
        y = np.asarray(hist[stage]["loss"])
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        x = np.arange(len(smooth)) + start + k - 1
        ax.plot(np.arange(len(y)) + start, y, color=col, alpha=0.2, lw=0.6)
        ax.plot(x, smooth, color=col, lw=1.5, label=f"stage {stage} training loss (running mean of {k})")
        start += len(y)
    for (name, v), ls in zip(baselines.items(), ("--", ":", "-.")):
        ax.axhline(v, color="k", ls=ls, lw=1, label=f"held-out loss, {name}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("epsilon MSE")
    ax.legend(fontsize=7)
    ax.set_title("fvae_ldm on one real CT, TAEF2 latents (CPU)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    up = {name: to_slices(v, affine)[0] for name, v in vols.items()}  # upright axial slices, radiological view
    lab = to_slices(lab, affine)[0]
    n = lab.shape[0]
    zs = [n // 4, n // 2, 3 * n // 4]
    fig, axes = plt.subplots(len(zs), len(vols), figsize=(3.2 * len(vols), 3.0 * len(zs)))
    for i, z in enumerate(zs):
        for j, (name, v) in enumerate(up.items()):
            a = axes[i, j]
            a.imshow(v[z], cmap="gray", vmin=-200, vmax=300)
            for c, col in zip(ORGANS, ("tab:red", "tab:green", "tab:blue")):
                if (lab[z] == c).any():
                    a.contour((lab[z] == c).astype(float), [0.5], colors=col, linewidths=0.7)
            a.set_axis_off()
            if i == 0:
                a.set_title(name, fontsize=9)
    fig.suptitle("held-out scan, window -200..300 HU; contours: spleen red, liver green, stomach blue", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "slices.png", dpi=110)
    plt.close(fig)


def spread(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.0f} +- {v.std(ddof=1):.0f}" if abs(v.mean()) >= 10 else f"{v.mean():.2f} +- {v.std(ddof=1):.2f}"


def tables(results: dict, seeds: int) -> str:
    ev = results["heldout"]
    rows = ["Epsilon MSE per timestep (4 noise seeds) on the held-out scan, and on the training CT (seen in training):",
            "", "| denoiser | latents | " + " | ".join(str(t) for t in TIMESTEPS) + " | mean 50..950 |",
            "|---" * (len(TIMESTEPS) + 3) + "|"]
    for where, ev_ in (("held-out scan", ev), ("training CT", results["seen"])):
        for name in ev_:
            r = ev_[name]
            rows.append(f"| {name} | {where} | " + " | ".join(f"{r['per_t'][t]:.3f}" for t in TIMESTEPS)
                        + f" | {r['loss']:.3f} |")
    rows += ["", "Bias at high t (slope of predicted on true epsilon; per-channel mean of the error: rms / largest):",
             "", "| denoiser | " + " | ".join(f"t = {t}: slope, channel mean error" for t in HIGH_T) + " |",
             "|---" * (len(HIGH_T) + 1) + "|"]
    for name in MODELS[1:]:
        b = ev[name]["bias"]
        rows.append(f"| {name} | " + " | ".join(
            f"{b[t]['slope']:.3f}, {b[t]['channel_mean_error_rms']:.3f} / {b[t]['channel_mean_error_max']:.3f}"
            for t in HIGH_T) + " |")
    rows += ["", f"Generation from the held-out mask, mean +- SD over {seeds} sampling seeds (DDIM "
             f"{results['steps']} steps, guidance 2):", "",
             "| | " + " | ".join(f"median HU {o}" for o in ORGANS.values()) + " | "
             + " | ".join(f"Dice {o}" for o in ORGANS.values()) + " | " + " | ".join(f"NSD {o}" for o in ORGANS.values())
             + " | HU SD of the volume |", "|---" * (2 + 3 * len(ORGANS)) + "|"]
    for name in (*MODELS, "real (held out)"):
        g = results["generation"][name]
        cols = [f"median_hu_{o}" for o in ORGANS.values()] + [f"dice_{o}" for o in ORGANS.values()] + [
            f"nsd_{o}" for o in ORGANS.values()] + ["hu_std"]
        rows.append(f"| {name} | " + " | ".join(
            spread(g[c]) if len(g[c]) > 1 else (f"{g[c][0]:.0f}" if abs(g[c][0]) >= 10 else f"{g[c][0]:.2f}")
            for c in cols) + " |")
    tr = results["train"]
    rows.append(
        f"\nTraining on {results['train_case']}, held out: {results['heldout_case']}. Stage 2d "
        f"{tr['2d']['iterations']} iterations in {tr['2d']['seconds']:.0f} s (loss first 10 {tr['2d']['first_10']:.3f}"
        f" -> last 50 {tr['2d']['last_50']:.3f}), stage 3d {tr['3d']['iterations']} iterations in "
        f"{tr['3d']['seconds']:.0f} s (last 50 {tr['3d']['last_50']:.3f}); total {results['minutes_total']} min.")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/ldm_demo")
    ap.add_argument("--minutes_2d", type=float, default=10.0)
    ap.add_argument("--minutes_3d", type=float, default=2.5)
    ap.add_argument("--learning_rate", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--prior_skip", default="true", choices=("true", "false"))
    ap.add_argument("--reuse", action="store_true", help="evaluate the models an earlier run left in --out again")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    root = out / "bundle"
    t_start = time.time()
    datalist, held_ct, held_seg = make_data(out / "data")
    if not a.reuse:
        prep = parser("prepare.yaml", root, datalist=str(datalist), vae="taef2")
        prep.get_parsed_content("run")
    stats = json.loads((root / "latents" / "latent_stats.json").read_text())
    # the report's token embedding (the same for every case), for the held-out loss
    rec = torch.load(next((root / "latents").glob("*.pt")), weights_only=True)
    (root / "text.json").write_text(json.dumps({"text": rec["text"].tolist(), "mask": rec["text_mask"].tolist()}))
    hist = {}
    for stage, minutes in (("2d", a.minutes_2d), ("3d", a.minutes_3d)):
        if a.reuse:  # the trained models and loss histories of an earlier run in --out
            prev = json.loads((out / "results.json").read_text())["train"][stage]
            loss = json.loads((root / "eval" / f"train_loss_{stage}.json").read_text())["loss"]
            hist[stage] = {"iterations": len(loss), "seconds": prev["seconds"], "loss": loss}
            continue
        print(f"training stage {stage} for {minutes} min ...", flush=True)
        hist[stage] = train(root, stage, minutes, a.learning_rate, prior_skip=a.prior_skip == "true")
    results = {"stats": {k: stats[k] for k in ("scale_factor", "latent_std", "cases")}, "steps": a.steps,
               "prior_skip": a.prior_skip == "true",
               "learning_rate": a.learning_rate, "train": {}, "heldout": {}, "seen": {}, "generation": {},
               "train_case": "the TotalSegmentator abdomen CT (30 slices)",
               "heldout_case": "the 512 x 512 DICOM series (another Siemens acquisition), resampled to 3 mm"}
    for stage in ("2d", "3d"):
        h = hist[stage]
        results["train"][stage] = {"iterations": h["iterations"], "seconds": round(h["seconds"], 1),
                                   "first_10": float(np.mean(h["loss"][:10])), "last_50": float(np.mean(h["loss"][-50:]))}
    real = np.asarray(nib.load(str(held_ct)).dataobj).astype(np.float32)
    lab = np.asarray(nib.load(str(held_seg)).dataobj).astype(np.int16)
    spacing = nib.load(str(held_ct)).header.get_zooms()[:3]
    items = json.loads(datalist.read_text())
    windows = hu_window_segmenter(items, datalist.parent)
    results["hu_windows"] = {ORGANS[c]: w for c, w in windows.items()}
    prior = gaussian_prior(root)
    vols = {"real (held out)": real}
    for name in MODELS:
        gen = {}
        for seed in range(a.seeds):
            p = parser("inference.yaml", root, stage="3d", steps=a.steps, seed=seed, output_dir=str(out / "generated"),
                       **SMALL)
            if name == "zero":  # the initial weights, without the prior skip: MONAI's zero output layer predicts 0
                torch.manual_seed(0)
                p["network"] = "$@network_def.to(@device)"
                p["network_def"] = p["network_def"].replace("fvae_ct.ldm.recorded(@checkpoint, 'prior_skip', False)",
                                                            "False")
            elif name == "Gaussian prior":
                p["network"] = prior
            net = p.get_parsed_content("network").eval()
            if seed == 0:
                results["heldout"][name] = denoising_eval(net, root, heldout_latents(root, held_ct, held_seg))
                print(name, json.dumps(results["heldout"][name]), flush=True)
                if name != "zero":
                    results["seen"][name] = denoising_eval(net, root, next((root / "latents").glob("*.pt")))
            path = p.get_parsed_content("workflow").run(str(held_seg), REPORT, name=f"{name.replace(' ', '_')}_{seed}")
            hu = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
            if seed == 0:
                vols[f"{name}, seed 0"] = hu
            for k, v in {"hu_std": float(hu.std()), **score(hu, lab, spacing, windows)}.items():
                gen.setdefault(k, []).append(v)
        results["generation"][name] = gen
        print(name, json.dumps(gen), flush=True)
    results["generation"]["real (held out)"] = {k: [v] for k, v in {"hu_std": float(real.std()),
                                                                     **score(real, lab, spacing, windows)}.items()}
    figures(out, hist, {n: results["heldout"][n]["loss"] for n in MODELS}, vols, lab, nib.load(str(held_ct)).affine)
    results["minutes_total"] = round((time.time() - t_start) / 60, 1)
    if a.reuse:
        results["minutes_total"] = json.loads((out / "results.json").read_text())["minutes_total"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = tables(results, a.seeds)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
