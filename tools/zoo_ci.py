"""Run the MONAI model-zoo's own CI scripts, unchanged, on our bundle archives, outside this repository.

    python tools/zoo_ci.py --zoo <model-zoo checkout or bare git dir> [--work outputs/zoo_ci] [--bundles ...]

What a bundle pull request to Project-MONAI/model-zoo goes through, reproduced in a scratch copy of the zoo:
1. the zoo tree is exported into ``<work>/zoo`` and each archive from ``make bundles`` is unpacked into ``models/``
   (what the PR would add);
2. ``ci/bundle_custom_data.py`` gets the exclusion-list entries CONTRIBUTING allows (the PR would add them too):
   see :data:`EXCLUSIONS`;
3. the files the zoo would download are placed where its downloader finds them with a matching SHA-256 (this
   machine has no internet): the schema ``models/meta_schema_20240725.json`` and every ``large_files.yml`` entry
   (from ``$FVAE_ASSETS``, found by upstream URL);
4. in a virtual environment with the bundle's requirements (made by the zoo's ``ci/get_bundle_requirements.py``)
   plus ``jsonschema`` and the zoo's format tools, the zoo's scripts run unchanged: ``ci/get_bundle_requirements.py``,
   ``ci/prepare_schema.py``, ``ci/verify_bundle.py -m min`` (the CPU pre-merge) and ``ci/verify_bundle.py`` in full
   mode (the GPU pre-merge's checks: properties, ``verify_net_in_out``, TorchScript export; on the CPU here), then
   black / isort / flake8 with the zoo's ``setup.cfg`` / ``pyproject.toml`` on the bundle's code (``runtests.sh
   --codeformat`` minus pytype, whose install is not practical here).
The archives are checked exactly as a pull request would contain them, with nothing added: fvae_aug_seg is a
training recipe with no published weights, so its TorchScript check (which exports ``models/model.pt``) is excluded,
as CONTRIBUTING allows; its README says so.

Writes ``<work>/zoo_ci.md`` (commands and results) and exits non-zero when a check failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from build_bundles import build, unpack  # noqa: E402 (tools/ is this script's folder)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("fvae_recon", "fvae_aug_seg", "fvae_ldm")
#: bundle -> exclusion lists of ci/bundle_custom_data.py, each as CONTRIBUTING allows it
EXCLUSIONS = {
    "fvae_recon": ["exclude_verify_preferred_files_list", "exclude_verify_torchscript_list"],
    "fvae_aug_seg": ["exclude_verify_preferred_files_list", "exclude_verify_torchscript_list"],
    "fvae_ldm": ["exclude_verify_preferred_files_list", "exclude_verify_shape_list", "exclude_verify_torchscript_list"],
}
#: what the zoo's scripts and the format tools print about each check (kept in the summary table)
KEY_LINES = (
    "verified",
    "successfully",
    "skip",
    "does not support",
    "would be left unchanged",
    "prepared schema",
    "version range",
    "requirements_",
)
NOTE = (
    "Not run: pytype (the fourth check of `runtests.sh --codeformat`; its install is not practical here). "
    "`ci/verify_bundle.py` without `-m` is the GPU pre-merge's verification (properties, shape, TorchScript), "
    "run on the CPU."
)
MARK, END = "<!-- ZOO_CI_RESULTS -->", "<!-- /ZOO_CI_RESULTS -->"
#: jsonschema (verify_metadata) and the format tools of the zoo's requirements-dev.txt, at the versions of
#: constraints.txt (the zoo installs them unpinned)
TOOLS = ["jsonschema", "black", "isort", "flake8", "flake8-bugbear", "flake8-comprehensions", "flake8-executable",
         "pep8-naming"]
#: the format checks of ``runtests.sh --codeformat`` (pytype aside), flags as the zoo passes them
FORMAT_CHECKS = (
    ["isort", "--check"],
    ["black", "--skip-magic-trailing-comma", "--check"],
    ["flake8", "--count", "--statistics"],
)


def sh(cmd: list, cwd: Path, env: dict | None = None, log: list | None = None, check: bool = True) -> tuple[int, str]:
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    if log is not None:
        log.append((" ".join(str(c) for c in cmd), r.returncode, time.time() - t, out))
    if check and r.returncode != 0:
        print(out[-3000:], file=sys.stderr)
    print(f"[{'ok' if r.returncode == 0 else 'FAILED'}] {' '.join(str(c) for c in cmd)} ({time.time() - t:.0f} s)")
    return r.returncode, out


def export_zoo(zoo: Path, dest: Path) -> None:
    if (zoo / "ci").is_dir():
        shutil.copytree(zoo, dest, ignore=shutil.ignore_patterns(".git"))
        return
    archive = dest.parent / "zoo.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "--git-dir", str(zoo), "archive", "HEAD"], stdout=f, check=True)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    archive.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="Project-MONAI/model-zoo checkout or bare git directory")
    ap.add_argument("--work", default=str(REPO / "outputs" / "zoo_ci"))
    ap.add_argument("--bundles", default=",".join(BUNDLES))
    ap.add_argument("--venv", default=str(REPO / ".venv-zoo"))
    ap.add_argument("--update-readmes", action="store_true", help="write the results into bundles/*/docs/results.md")
    a = ap.parse_args()
    bundles = [b for b in a.bundles.split(",") if b]
    work = Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    zoo = work / "zoo"
    export_zoo(Path(a.zoo), zoo)
    commit = (
        subprocess.run(
            ["git", "--git-dir", a.zoo, "log", "-1", "--format=%H %cs"], capture_output=True, text=True
        ).stdout.strip()
        if not (Path(a.zoo) / "ci").is_dir()
        else "(checkout)"
    )

    for b in bundles:
        unpack(build(b, work / "dist"), zoo / "models")
    with open(zoo / "ci" / "bundle_custom_data.py", "a") as f:
        f.write("\n# fvae-ct bundles (as their pull request adds them; see each bundle's docs/README.md)\n")
        for b in bundles:
            for lst in EXCLUSIONS[b]:
                f.write(f"{lst}.append({b!r})\n")
    schema = next(Path(p) / "monai" / "meta_schema_20240725.json" for p in os.environ["FVAE_ASSETS"].split(":"))
    shutil.copyfile(schema, zoo / "models" / "meta_schema_20240725.json")

    venv = Path(a.venv)
    py = venv / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVAE_") and k != "PYTHONPATH"}
    env.update(
        ALLOW_MONAI_RC="true",
        PATH=f"{venv / 'bin'}:{env['PATH']}",
        MPLBACKEND="Agg",
        FVAE_CACHE=str(work / "empty_cache"),
    )
    log: list = []
    failed = 0
    # the pre-merge script's first step (the zoo's requirements.txt: monai), every package at the version of
    # constraints.txt (torch 2.13.0, CPU here); then jsonschema for verify_metadata and the format tools
    pins = subprocess.run([sys.executable, REPO / "tools" / "pins.py", "export", "--env", "bundles"],
                          capture_output=True, text=True, check=True).stdout
    (work / "constraints.txt").write_text(pins)  # [test] + [bundles] of constraints.txt
    pin = ["-c", work / "constraints.txt"]
    sh([py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", *pin], zoo, env)
    sh([py, "-m", "pip", "install", "-q", "-r", "requirements.txt", *pin], zoo, env, log)
    sh([py, "-m", "pip", "install", "-q", *TOOLS, *pin], zoo, env)
    sys.path.insert(0, str(REPO / "tools"))
    import pins as pinning

    for b in bundles:
        failed += sh([py, "ci/get_bundle_requirements.py", "--b", b], zoo, env, log)[0] != 0
        req_file = f"requirements_{b}.txt"  # the name that script writes (and prints on stdout)
        section = pinning.bundle_env(b, pinning.read())  # [bundles], or the bundle's own overrides (fvae_aug_seg)
        (work / f"constraints_{b}.txt").write_text(pinning.export(section, pinning.read()))
        bpin = ["-c", work / f"constraints_{b}.txt"]
        failed += sh([py, "-m", "pip", "install", "-q", "--pre", "-r", req_file, *bpin], zoo, env, log)[0] != 0
        check = [sys.executable, REPO / "tools" / "pins.py", "check", "--env", section, "--subset", "--python", py]
        failed += sh(check, zoo, env, log)[0] != 0  # what that install holds is at the pins
        failed += sh([py, "ci/prepare_schema.py", "--l", b], zoo, env, log)[0] != 0
        failed += sh([py, "ci/verify_bundle.py", "-b", b, "-m", "min"], zoo, env, log)[0] != 0
        failed += sh([py, "ci/verify_bundle.py", "-b", b], zoo, env, log)[0] != 0
        for tool in FORMAT_CHECKS:
            failed += sh([py, "-m", *tool, f"models/{b}"], zoo, env, log)[0] != 0

    lines = [
        f"Model-zoo snapshot {commit}; `python tools/zoo_ci.py --zoo <zoo>` ({time.strftime('%Y-%m-%d')}), "
        f"Python {sys.version.split()[0]}, CPU only.",
        "",
        "| command (run in the zoo root) | result |",
        "|---|---|",
    ]
    for cmd, code, secs, out in log:
        cmd = cmd.replace(str(py), "python").replace(str(work), "<work>")
        said = [
            ln.split(" - INFO - ")[-1].strip()
            for ln in out.splitlines()
            if any(k in ln for k in KEY_LINES) and not any(k in ln for k in ("File exists", "Warning"))
        ]
        if code != 0:
            said = [ln for ln in out.splitlines() if ln.strip()][-1:]
        res = "passed" if code == 0 else "FAILED"
        lines.append(
            f"| `{cmd}` | {res} ({secs:.0f} s){': ' if said else ''}{'; '.join(said)[:700].replace('|', '/')} |"
        )
    (work / "zoo_ci.md").write_text("\n".join(lines) + "\n")
    if a.update_readmes:
        for b in bundles:
            rows = [ln for ln in lines[4:] if f" {b}" in ln or f"_{b}." in ln or f"models/{b}" in ln]
            excl = ", ".join(f"`{x}`" for x in EXCLUSIONS[b])
            block = "\n".join(
                [
                    MARK,
                    lines[0],
                    "",
                    f"Exclusion lists added to `ci/bundle_custom_data.py`: {excl}. {NOTE}",
                    "",
                    *lines[2:5],
                    *rows,
                    END,
                ]
            )
            readme = REPO / "bundles" / b / "docs" / "results.md"  # the README links to it
            text = readme.read_text()
            start = text.index(MARK)
            end = text.index(END) + len(END) if END in text else start + len(MARK)
            readme.write_text(text[:start] + block + text[end:])
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
