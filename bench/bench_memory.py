"""Peak memory of a whole `fvae recon` case against the number of 512x512 slices (issue 12, point 13).

    python bench/bench_memory.py --out outputs/bench_memory [--slices 20,60,180]     (part of: make bench)

For each slice count, a fresh process runs the reconstruction workflow exactly as `fvae recon` does (load the
NIfTI, TAEF2 in 4-slice batches, int16 output written atomically, metrics on the original grid, three-view PNG)
on the real 20-slice DICOM sample repeated along z (mirrored, so neighbouring slices stay continuous), and
reports the peak RSS of that process (``ru_maxrss``), the RSS once the model and the input volume are loaded, and
the per-slice growth. Writes memory.md and memory.json into --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_volume(n: int, path: Path) -> None:
    """The sample DICOM series as NIfTI, ``n`` slices (the 20 slices mirrored back and forth)."""
    import nibabel as nib
    import numpy as np
    from fvae_ct.assets import sample_ct
    from fvae_ct.io import load_ct

    img = load_ct(sample_ct("dicom_series_512"))
    hu = img[0].numpy().astype(np.int16)  # [X, Y, Z]
    z = np.concatenate([np.arange(hu.shape[2]), np.arange(hu.shape[2])[::-1]])
    idx = np.resize(z, n)
    nib.save(nib.Nifti1Image(hu[:, :, idx], np.asarray(img.affine, dtype=np.float64)), str(path))


def child(path: str, out: str) -> None:
    """Fresh process: one case through the workflow; print JSON with the RSS figures."""
    import torch

    torch.set_num_threads(2)
    from fvae_ct.io import Case, load_ct
    from fvae_ct.recon import ReconWorkflow
    from fvae_ct.vae import load

    wf = ReconWorkflow(load("taef2"), out, figures=True, progress=False)
    load_ct(path)  # imports and reader warm-up; then measure the baseline with the model loaded
    base = _rss_mib()
    t = time.perf_counter()
    row = wf.run_case(Case("bench", path))
    print(
        json.dumps(
            {
                "rss_model_mib": base,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": time.perf_counter() - t,
                "psnr": row["psnr"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench_memory")
    ap.add_argument("--slices", default="20,60,180")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fvae_bench_mem_") as tmp:
        for n in map(int, a.slices.split(",")):
            vol = Path(tmp) / f"ct_{n}.nii.gz"
            make_volume(n, vol)
            r = subprocess.run(
                [sys.executable, __file__, "--child", str(vol), str(Path(tmp) / f"out_{n}")],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if r.returncode != 0:
                sys.exit(r.stderr[-3000:])
            m = json.loads(r.stdout.strip().splitlines()[-1])
            m.update(slices=n, volume_f32_mib=n * 512 * 512 * 4 / 2**20)
            rows.append(m)
            print(
                f"{n:4d} slices: peak RSS {m['peak_rss_mib']:.0f} MiB (model loaded {m['rss_model_mib']:.0f} MiB), "
                f"{m['seconds']:.0f} s, PSNR {m['psnr']:.2f} dB",
                flush=True,
            )
    slope = (rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]) / max(1, rows[-1]["slices"] - rows[0]["slices"])
    lines = [
        "| slices | float32 volume (MiB) | RSS, model loaded (MiB) | peak RSS (MiB) | peak - model (MiB) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        lines.append(
            f"| {m['slices']} | {m['volume_f32_mib']:.0f} | {m['rss_model_mib']:.0f} | {m['peak_rss_mib']:.0f} "
            f"| {m['peak_rss_mib'] - m['rss_model_mib']:.0f} | {m['seconds']:.0f} |"
        )
    lines.append(f"\nGrowth: {slope:.1f} MiB of peak RSS per 512x512 slice " f"(one float32 slice is 1.0 MiB).")
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    (out / "memory.json").write_text(json.dumps({"rows": rows, "mib_per_slice": slope}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
