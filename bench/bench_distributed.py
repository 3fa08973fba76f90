"""Wall time of one dataset reconstruction with torchrun on 1 and on N CPU processes (1 thread each).

The dataset: 8 real CT cases of different sizes (slabs of the sample volumes under $FVAE_ASSETS/ct), reconstructed
with the fvae_recon bundle's inference.yaml + multi_gpu_inference.yaml and the default VAE (TAEF2). Writes
``bench_distributed.md`` / ``.json`` and checks that every run's outputs are identical voxel for voxel.

    python bench/bench_distributed.py --out outputs/bench_distributed --procs 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "bundles" / "fvae_recon" / "configs"
#: (volume, number of slabs along the last axis): 8 cases of 4 different sizes
SLABS = (("aorta_ct_1p5mm.nii.gz", 3), ("totalseg_ct_3mm.nii.gz", 2), ("chest_ct_1p5mm.nii.gz", 2),
         ("totalseg_ct_sm_3mm.nii.gz", 1))


def make_dataset(assets: Path, dest: Path) -> list[tuple[str, tuple]]:
    dest.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, n in SLABS:
        img = nib.load(str(assets / "ct" / name))
        vol = np.asarray(img.dataobj).astype(np.int16)
        edges = np.linspace(0, vol.shape[2], n + 1).astype(int)
        for i in range(n):
            aff = img.affine.copy()
            aff[:3, 3] += img.affine[:3, 2] * edges[i]
            slab = vol[..., edges[i] : edges[i + 1]]
            case = f"{name[:-7]}_{i}"
            nib.save(nib.Nifti1Image(slab, aff), str(dest / f"{case}.nii.gz"))
            cases.append((case, slab.shape))
    return cases


def run(procs: int, data: Path, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
           "monai.bundle", "run", "--config_file", str([str(CONF / "inference.yaml"),
                                                       str(CONF / "multi_gpu_inference.yaml")]),
           "--input", str(data), "--output_dir", str(out), "--figures", "False"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{r.stderr[-3000:]}")
    return wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_distributed")
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--assets", default=os.environ.get("FVAE_ASSETS", str(ROOT.parent / "shared" / "assets")))
    a = ap.parse_args(argv)
    out = Path(a.out)
    cases = make_dataset(Path(a.assets), out / "data")
    rows = []
    for n in [int(x) for x in a.procs.split(",")]:
        dest = out / f"recon_{n}"
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        wall = run(n, out / "data", dest)
        s = json.loads((dest / "summary.json").read_text())
        compute = sum(c["seconds"] for c in s["cases"])
        rows.append({"processes": n, "wall_s": wall, "case_seconds_sum": compute, "ranks": s.get("ranks"),
                     "psnr_mean": s["metrics"]["psnr"]["mean"]})
        print(f"{n} process(es): {wall:.1f} s wall, {compute:.1f} s of case time", flush=True)
    ref = out / f"recon_{rows[0]['processes']}"
    for r in rows[1:]:  # the same outputs whatever the number of processes
        for p in sorted(ref.glob("*_recon.nii.gz")):
            q = out / f"recon_{r['processes']}" / p.name
            same = np.array_equal(np.asarray(nib.load(str(p)).dataobj), np.asarray(nib.load(str(q)).dataobj))
            if not same:
                raise SystemExit(f"{q} differs from {p}")
    base = rows[0]["wall_s"]
    lines = ["| processes (1 thread each) | wall s | speed-up | case time s (sum) | voxels per rank (M) |",
             "|---|---|---|---|---|"]
    for r in rows:
        per_rank = ", ".join(f"{x['voxels'] / 1e6:.2f}" for x in r["ranks"]) if r["ranks"] else "all"
        lines.append(f"| {r['processes']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | "
                     f"{r['case_seconds_sum']:.1f} | {per_rank} |")
    sizes = ", ".join(f"{c}: {'x'.join(map(str, s))}" for c, s in cases)
    md = "\n".join([f"8 cases ({sizes}), TAEF2, torch {__import__('torch').__version__}, {os.cpu_count()} cores", "",
                    *lines, "", "outputs identical voxel for voxel across the runs"])
    (out / "bench_distributed.md").write_text(md + "\n")
    (out / "bench_distributed.json").write_text(json.dumps({"cases": cases, "runs": rows}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
