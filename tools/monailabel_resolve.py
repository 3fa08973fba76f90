"""Does a bundle's requirement list install together with MONAI Label in one environment? pip's own resolver says.

    python tools/monailabel_resolve.py [--bundle fvae_aug_seg] [--pythons 3.10,3.11,3.12] [--numpy 1.26.4]
        [--work outputs/monailabel_resolve]

For each Python (``python3.X`` on PATH, or a pyenv installation) a scratch venv runs
``pip install --dry-run --ignore-installed --report`` of the bundle's ``metadata.json`` pins (monai, torch, numpy and
``required_packages_version``; ``--numpy`` replaces the numpy pin) plus ``monailabel==<supported_apps>``: nothing is
installed. Prints one line per Python: the resolved torch / torchvision / numpy / pydicom, or pip's conflict lines.
Needs the package index (PyPI); about 3 minutes per Python. Exits 1 when any Python fails to resolve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def requirements(bundle: str, numpy: str | None) -> list[str]:
    m = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    reqs = [f"monai=={m['monai_version']}", f"torch=={m['pytorch_version']}", f"numpy=={numpy or m['numpy_version']}"]
    reqs += [f"{k}=={v}" for k, v in m["required_packages_version"].items()]
    return reqs + [f"monailabel=={m['supported_apps']['monai-label']}"]


def interpreter(version: str) -> str:
    """``python3.X`` on PATH when it runs, else a pyenv installation of that version."""
    for cand in [f"python{version}", *sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))]:
        if subprocess.run([cand, "--version"], capture_output=True).returncode == 0:
            return cand
    raise SystemExit(f"no Python {version} found (python{version} on PATH or ~/.pyenv/versions/{version}.*)")


def resolve(python: str, reqs: list[str], work: Path) -> tuple[bool, str]:
    venv = work / f"venv{python}"
    if not (venv / "bin" / "pip").is_file():
        subprocess.run([interpreter(python), "-m", "venv", str(venv)], check=True)
    report = work / f"report{python}.json"
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--dry-run", "--ignore-installed", "--report",
                        str(report), *reqs], capture_output=True, text=True)
    if r.returncode:  # pip's "The conflict is caused by:" lines
        out = (r.stdout + r.stderr).splitlines()
        lines = [x.strip() for x in out if "depends on" in x or "user requested" in x]
        return False, "; ".join(lines) or out[-1]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    return True, ", ".join(f"{k} {got.get(k, '-')}" for k in ("torch", "torchvision", "numpy", "pydicom", "monai"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="fvae_aug_seg")
    p.add_argument("--pythons", default="3.10,3.11,3.12")
    p.add_argument("--numpy", default=None, help="numpy version instead of the metadata's")
    p.add_argument("--work", default=str(REPO / "outputs" / "monailabel_resolve"))
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    reqs = requirements(a.bundle, a.numpy)
    print("requirements:", " ".join(reqs), flush=True)
    failed = 0
    for py in a.pythons.split(","):
        ok, what = resolve(py, reqs, work)
        failed += not ok
        print(f"Python {py}: {'resolves' if ok else 'CONFLICT'}: {what}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
