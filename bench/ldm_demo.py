"""Does the fvae_ldm bundle learn? A CPU run on real CT (issue 13): `make ldm-demo`, about 15 minutes on 2 cores.

    python bench/ldm_demo.py --out outputs/ldm_demo [--minutes_2d 10 --minutes_3d 2.5]

Data (real, from $FVAE_ASSETS/ct): the TotalSegmentator abdomen CT (122 x 101 x 30, 3 mm) and the 20-slice
512 x 512 DICOM series (resampled to 3 x 3 x 2 mm), each with its organ label map and a one-line report. The last
8 slices of the abdomen CT are held back: the model never sees them, and generation starts from their mask.

The bundle's own configs run in this process (prepare.yaml -> train.yaml stage 2d -> stage 3d -> inference.yaml,
TAEF2 latents, a smaller UNet than the default so that it trains on a CPU); training stops at a wall-time budget.
Then, for the trained model and for the same model untrained (its initial weights):
- the denoising loss on the held-back latents (fixed timesteps and noise),
- generated vs real held-back slices with the mask's contours (slices.png), the training loss (loss.png),
- median HU per organ, generated vs real,
- mask adherence: Dice / NSD (2 mm) of a fixed HU-window segmenter (each organ's 10th-90th HU percentile in the
  training CT) against the conditioning mask; the same segmenter on the real held-back CT is the reference.
Writes results.json and results.md into --out.
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
ORGANS = {1: "spleen", 5: "liver", 6: "stomach"}  # the mask classes present in the held-back slices
HELD = 8  # held-back slices at the top of the abdomen CT
SMALL = {  # a UNet that trains on 2 CPU cores
    "unet_channels": [64, 128, 128],
    "attention_levels": [False, True, True],
    "num_head_channels": 16,
    "norm_num_groups": 16,
    "num_res_blocks": 1,
    "consistency_levels": [1, 2],
}


def make_data(out: Path) -> tuple[Path, Path, Path]:
    """Datalist of the training cases, the held-back CT and its mask (NIfTI, written under ``out``)."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from fvae_ct.assets import sample_ct, sample_dir
    from fvae_ct.io import load_ct, load_labels, save_nifti_atomic

    ct_dir = Path(sample_dir())
    out.mkdir(parents=True, exist_ok=True)
    ct = nib.load(str(ct_dir / "totalseg_ct_sm_3mm.nii.gz"))
    seg = nib.load(str(ct_dir / "totalseg_ct_sm_3mm_seg.nii.gz"))
    n = ct.shape[2]
    for name, img in (("abdomen_ct", ct), ("abdomen_seg", seg)):
        nib.save(img.slicer[:, :, : n - HELD], str(out / f"{name}_train.nii.gz"))
        nib.save(img.slicer[:, :, n - HELD :], str(out / f"{name}_heldback.nii.gz"))
    dcm = load_ct(sample_ct())
    lab = load_labels(str(ct_dir / "dicom_series_512_seg.nii.gz"), np.asarray(dcm.affine), dcm.shape[1:])
    lab = MetaTensor(torch.from_numpy(lab[None].astype(np.float32)), affine=dcm.affine)
    pix = (3.0, 3.0, 2.0)
    img3 = Spacing(pix, mode="bilinear")(dcm)
    lab3 = Spacing(pix, mode="nearest")(lab)
    save_nifti_atomic(np.round(img3[0].numpy()).astype(np.int16), np.asarray(img3.affine), out / "dicom_ct.nii.gz")
    save_nifti_atomic(lab3[0].numpy().astype(np.uint8), np.asarray(lab3.affine), out / "dicom_seg.nii.gz")
    report = "CT of the upper abdomen: liver, spleen and stomach unremarkable."
    items = [
        {"image": "abdomen_ct_train.nii.gz", "label": "abdomen_seg_train.nii.gz", "report": report},
        {"image": "dicom_ct.nii.gz", "label": "dicom_seg.nii.gz", "report": report},
    ]
    (out / "datalist.json").write_text(json.dumps(items, indent=1))
    return out / "datalist.json", out / "abdomen_ct_heldback.nii.gz", out / "abdomen_seg_heldback.nii.gz"


def parser(config: str, root: Path, **over) -> "ConfigParser":  # noqa: F821
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(CONF / config))
    p.update({"bundle_root": str(root), **over})
    return p


def train(root: Path, stage: str, minutes: float, lr: float, scheduler: str = "ddpm") -> dict:
    """train.yaml for ``stage`` with a wall-time budget (ignite TimeLimit); returns the loss history."""
    from ignite.engine import Events
    from ignite.handlers import TimeLimit

    p = parser("train.yaml", root, stage=stage, learning_rate=lr, train_depth=8, batch_size=4,
               samples_per_epoch=40, max_epochs=100000, scheduler=scheduler, **SMALL)
    trainer = p.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(int(minutes * 60)))
    t0 = time.time()
    p.get_parsed_content("run")
    losses = json.loads((root / "eval" / "train_loss.json").read_text())["loss"]
    (root / "eval" / f"train_loss_{stage}.json").write_text(json.dumps({"loss": losses}))
    return {"iterations": len(losses), "seconds": time.time() - t0, "loss": losses}


@torch.no_grad()
def heldout_loss(network, root: Path, held_ct: Path, held_seg: Path, seeds: int = 4,
                 scheduler: str = "ddpm") -> tuple[float, dict]:
    """Epsilon-MSE of ``network`` on the held-back volume's latents: the mean over timesteps 50, 150, ..., 950, and
    per timestep (also 999, where x_t is 99.8 % noise and a trained model predicts the noise almost exactly)."""
    from fvae_ct.ldm import make_scheduler, prepare_latents

    cache = root / "heldout_latents"
    if not (cache / "abdomen_ct_heldback.pt").is_file():
        (root / "heldout.json").write_text(json.dumps([{"image": str(held_ct), "label": str(held_seg)}]))
        from fvae_ct.vae import load

        prepare_latents(str(root / "heldout.json"), load("taef2"), str(cache), [1, 2, 3, 5, 6, 7])
    rec = torch.load(cache / "abdomen_ct_heldback.pt", weights_only=True)
    stats = json.loads((root / "latents" / "latent_stats.json").read_text())
    text = json.loads((root / "text.json").read_text()) if (root / "text.json").is_file() else None
    z0 = rec["latent"][None] * stats["scale_factor"]
    m = rec["mask"][None] * stats.get("mask_scale_factor", 1.0)
    h, w = z0.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    z0 = torch.nn.functional.pad(z0, (0, pw, 0, ph, 0, 0), mode="replicate")
    m = torch.nn.functional.pad(m, (0, pw, 0, ph, 0, 0), mode="replicate")
    ctx, cmask = (torch.tensor(text["text"])[None], torch.tensor(text["mask"])[None]) if text else (None, None)
    sched = make_scheduler(scheduler)
    ts = list(range(50, 1000, 100)) + [999]
    losses = {t: [] for t in ts}
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        for t in ts:
            eps = torch.randn(z0.shape, generator=g)
            tt = torch.tensor([t])
            zt = sched.add_noise(z0, eps, tt)
            target = eps if scheduler == "ddpm" else z0 - eps  # rectified flow: the velocity
            pred = network(torch.cat([zt, m], 1), tt, ctx, cmask)
            losses[t].append(float(((pred - target) ** 2).mean()))
    per_t = {t: float(np.mean(v)) for t, v in losses.items()}
    return float(np.mean([per_t[t] for t in ts[:-1]])), per_t


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
    from fvae_ct.metrics.generation import mask_adherence, organ_median_hu

    out = {"median_hu": {ORGANS[c]: v for c, v in organ_median_hu(hu, lab, list(ORGANS)).items()}}
    for c, (lo, hi) in windows.items():
        pred = ((hu >= lo) & (hu <= hi)).astype(np.uint8)
        a = mask_adherence(pred, (lab == c).astype(np.uint8), spacing, [1], tolerance_mm=2.0)
        out[f"dice_{ORGANS[c]}"], out[f"nsd_{ORGANS[c]}"] = a["dice_1"], a["nsd_1"]
    return out


def figures(out: Path, hist: dict, untrained_loss: float, vols: dict, lab: np.ndarray, affine) -> None:
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
        ax.plot(x, smooth, color=col, lw=1.5, label=f"stage {stage} (running mean of {k})")
        start += len(y)
    ax.axhline(untrained_loss, color="k", ls="--", lw=1, label="untrained, held-back latents")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("epsilon MSE")
    ax.legend(fontsize=8)
    ax.set_title("fvae_ldm on 2 real CTs, TAEF2 latents (CPU)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    zs = [1, HELD // 2, HELD - 2]
    up = {name: to_slices(v, affine)[0] for name, v in vols.items()}  # upright axial slices, radiological view
    lab = to_slices(lab, affine)[0]
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
    fig.suptitle("held-back slices, window -200..300 HU; contours: spleen red, liver green, stomach blue", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "slices.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/ldm_demo")
    ap.add_argument("--minutes_2d", type=float, default=10.0)
    ap.add_argument("--minutes_3d", type=float, default=2.5)
    ap.add_argument("--learning_rate", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scheduler", default="ddpm", choices=("ddpm", "rflow"))
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    root = out / "bundle"
    t_start = time.time()
    datalist, held_ct, held_seg = make_data(out / "data")
    prep = parser("prepare.yaml", root, datalist=str(datalist), vae="taef2")
    prep.get_parsed_content("run")
    stats = json.loads((root / "latents" / "latent_stats.json").read_text())
    # the report's token embedding (the same for every case), for the held-out loss
    rec = torch.load(next((root / "latents").glob("*.pt")), weights_only=True)
    (root / "text.json").write_text(json.dumps({"text": rec["text"].tolist(), "mask": rec["text_mask"].tolist()}))
    hist = {}
    for stage, minutes in (("2d", a.minutes_2d), ("3d", a.minutes_3d)):
        print(f"training stage {stage} for {minutes} min ...", flush=True)
        hist[stage] = train(root, stage, minutes, a.learning_rate, a.scheduler)
    # held-out loss and generation: trained (EMA, what inference uses) and untrained (initial weights)
    results = {"stats": {k: stats[k] for k in ("scale_factor", "latent_std", "cases")}, "scheduler": a.scheduler,
               "learning_rate": a.learning_rate, "train": {}, "models": {}}
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
    vols = {"real (held back)": real}
    for name in ("trained", "untrained"):
        p = parser("inference.yaml", root, stage="3d", steps=a.steps, seed=0, scheduler=a.scheduler,
                   output_dir=str(out / "generated"), **SMALL)
        if name == "untrained":
            torch.manual_seed(0)
            p["network"] = "$@network_def.to(@device)"
        net = p.get_parsed_content("network").eval()
        loss, per_t = heldout_loss(net, root, held_ct, held_seg, scheduler=a.scheduler)
        wf = p.get_parsed_content("workflow")
        path = wf.run(str(held_seg), "CT of the upper abdomen: liver, spleen and stomach unremarkable.",
                      name=f"generated_{name}")
        hu = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
        vols[f"generated, {name}"] = hu
        results["models"][name] = {"heldout_loss": loss, "heldout_loss_per_t": per_t, "hu_std": float(hu.std()),
                                   **score(hu, lab, spacing, windows)}
        print(name, json.dumps(results["models"][name]), flush=True)
    results["models"]["real"] = {"hu_std": float(real.std()), **score(real, lab, spacing, windows)}
    figures(out, hist, results["models"]["untrained"]["heldout_loss"], vols, lab, nib.load(str(held_ct)).affine)
    results["minutes_total"] = round((time.time() - t_start) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = ["| | held-back loss | " + " | ".join(f"median HU {o}" for o in ORGANS.values()) + " | "
            + " | ".join(f"Dice / NSD {o}" for o in ORGANS.values()) + " |",
            "|---" * (2 + 2 * len(ORGANS)) + "|"]
    for name in ("untrained", "trained", "real"):
        r = results["models"][name]
        loss = f"{r['heldout_loss']:.3f}" if "heldout_loss" in r else "-"
        rows.append(f"| {name} | {loss} | " + " | ".join(f"{r['median_hu'][o]:.0f}" for o in ORGANS.values()) + " | "
                    + " | ".join(f"{r['dice_' + o]:.2f} / {r['nsd_' + o]:.2f}" for o in ORGANS.values()) + " |")
    tr = results["train"]
    pt = results["models"]["trained"]["heldout_loss_per_t"]
    what = "epsilon" if a.scheduler == "ddpm" else "velocity"
    rows += ["", "| timestep | " + " | ".join(str(t) for t in pt) + " |", "|---" * (1 + len(pt)) + "|",
             f"| held-back {what} MSE, trained | " + " | ".join(f"{v:.3f}" for v in pt.values()) + " |",
             "", "HU standard deviation of the volume: " + ", ".join(
                 f"{n} {results['models'][n]['hu_std']:.0f}" for n in ("untrained", "trained", "real"))]
    text = "\n".join(rows) + (
        f"\n\nTraining: stage 2d {tr['2d']['iterations']} iterations in {tr['2d']['seconds']:.0f} s (loss first 10 "
        f"{tr['2d']['first_10']:.3f} -> last 50 {tr['2d']['last_50']:.3f}), stage 3d {tr['3d']['iterations']} "
        f"iterations in {tr['3d']['seconds']:.0f} s (last 50 {tr['3d']['last_50']:.3f}); total "
        f"{results['minutes_total']} min.\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
