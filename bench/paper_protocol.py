"""How much our default reconstruction differs from the paper's protocol (fvae_recon configs/paper.yaml).

Runs the fvae_recon bundle's workflow on real CT with our default, each of the paper's choices alone, and the full
paper preset, for TAEF2 (real weights) and a tiny random Wan 2.1 (the real diffusers class, seeded; its output is
not a reconstruction, so only the differences between protocols mean something). Writes ``paper_protocol.md`` /
``.json`` and prints the table.

    python bench/paper_protocol.py --out outputs/paper_protocol
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "bundles" / "fvae_recon" / "configs"
VARIANTS = {  # name: overrides on inference.yaml ("paper" = the whole preset)
    "ours (default)": {},
    "+ file voxel order": {"slice_orientation": "file"},
    "+ HU truncation": {"hu_rounding": "truncate"},
    "+ 65-slice windows, last padded": {"depth_window": 65, "depth_overlap": 0, "depth_last": "pad"},
    "+ the script's arithmetic (Wan)": {"arithmetic": "script"},
    "paper.yaml": "paper",
}


def tiny_wan(folder: Path) -> str:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    m = AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    m.save_pretrained(folder)
    return str(folder)


def run(ct: str, out: Path, vae: str, weights: str | None, variant) -> tuple[dict, np.ndarray]:
    p = ConfigParser()
    p.read_config([str(CONF / "inference.yaml")] + ([str(CONF / "paper.yaml")] if variant == "paper" else []))
    # the script's float32 arithmetic is Wan's (fvae_ct.recon.script); TAEF2 takes the preset's other steps
    paper = {"arithmetic": "ours"} if vae == "taef2" else {}
    p.update({"input": ct, "output_dir": str(out), "vae": vae, "vae_weights": weights, "figures": False,
              "device": "cpu", **(paper if variant == "paper" else variant)})
    s = p.get_parsed_content("evaluator").run()
    rec = next(out.glob("*_recon.nii.gz"))
    return s, np.asarray(nib.load(str(rec)).dataobj).astype(np.int32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/paper_protocol")
    ap.add_argument("--assets", default=os.environ.get("FVAE_ASSETS", str(ROOT.parent / "shared" / "assets")))
    a = ap.parse_args(argv)
    out, assets = Path(a.out), Path(a.assets)
    cts = {"DICOM series 512x512x20": str(assets / "ct" / "dicom_series_512"),
           "chest CT 122x102x112": str(assets / "ct" / "chest_ct_1p5mm.nii.gz")}
    wan = tiny_wan(out / "tiny_wan21")
    rows = []
    for vae, weights in (("taef2", None), ("wan2.1 (tiny random)", wan)):
        for ct_name, ct in cts.items():
            if vae == "taef2" and ct_name.startswith("chest"):
                continue  # one case for the real weights (the windows do not matter to an image autoencoder)
            ref = None
            for vname, variant in VARIANTS.items():
                if vae == "taef2" and isinstance(variant, dict) and variant.get("arithmetic") == "script":
                    continue  # the scripts' arithmetic is Wan's
                dest = out / f"{vae.split()[0]}_{ct_name.split()[0]}_{len(rows)}"
                s, hu = run(ct, dest, vae.split()[0], weights, variant)
                ref = hu if ref is None else ref
                m = s["metrics"]
                rows.append({"vae": vae, "ct": ct_name, "protocol": vname, "psnr": m["psnr"]["mean"],
                             "ssim2d": m["ssim2d"]["mean"], "mse_hu": m["mse_hu"]["mean"],
                             "mean_abs_diff_to_ours_hu": float(np.abs(hu - ref).mean()),
                             "voxels_differing": float((hu != ref).mean())})
                print(rows[-1], flush=True)
    lines = ["| VAE | CT | protocol | PSNR dB | SSIM2d | MSE HU^2 | mean abs diff to ours (HU) | voxels differing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vae']} | {r['ct']} | {r['protocol']} | {r['psnr']:.2f} | {r['ssim2d']:.4f} | "
                     f"{r['mse_hu']:.1f} | {r['mean_abs_diff_to_ours_hu']:.2f} | {100 * r['voxels_differing']:.1f} % |")
    (out / "paper_protocol.md").write_text("\n".join(lines) + "\n")
    (out / "paper_protocol.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
