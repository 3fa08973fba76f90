"""``fvae compare-vaes``: the recon bundle once per VAE, one table.

For each VAE the fvae_recon bundle reconstructs every case into ``<output_dir>/<vae>/``, in a process of its own
(``python -m fvae_ct.recon.compare``), so ``peak_rss_mib`` is that VAE's run alone: the child's maximum resident
memory as the kernel counts it (``wait4``), Python, torch and the data included. The table has the mean PSNR, SSIM,
MSE from its summary.json, the wall seconds of the run, and the boundary / noise measures of
:mod:`fvae_ct.recon.boundary` computed from the written reconstructions: noise ratio, mean boundary shift, edge-width
ratio, added blur and signed edge offset (mm), high-frequency error fraction.

The VAEs are the cases of one :class:`fvae_ct.batch.BatchRunner` batch: one comparison at a time per output folder,
a row appended to compare.csv as each VAE ends, a VAE that fails reported at the end after the others ran. With
``skip_existing`` a VAE whose ``<vae>/compare.json`` was made with the same settings is not run again (its row is
reused), and the others resume their own recon run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..batch import BatchRunner
from ..errors import BatchFailure, FvaeError, InputError, OptionError
from ..io import discover_cases, load_ct, load_labels, write_text_atomic
from ..options import parse_bool
from ..reconstruct import RECON_SUFFIX
from ..transforms import hu_window_of, to_slices
from .boundary import analyze

__all__ = ["MEASURES", "COLUMNS", "compare_vaes", "markdown_table", "run_measured"]

log = logging.getLogger("fvae_ct")

#: the boundary / noise measures of the table (:func:`fvae_ct.recon.boundary.analyze` keys)
MEASURES = (
    "noise_ratio",
    "boundary_shift_mean_mm",
    "edge_width_ratio",
    "edge_added_blur_mm",
    "edge_offset_mm",
    "hf_error_fraction",
)
#: compare.csv's columns
COLUMNS = ("vae", "psnr", "ssim3d", "ssim2d", "mse_hu", "seconds", "peak_rss_mib", *MEASURES)


@dataclass
class _VAERun:
    """One VAE as a case of the batch: ``name`` the VAE, ``path`` the input it reconstructs."""

    name: str
    path: str


class _ChildFailed(FvaeError):
    """The child recon run of one VAE ended with an error (its one line)."""


def run_measured(cmd: list[str]) -> tuple[int, str, float, float]:
    """Run ``cmd`` as a child process: (exit code, its stderr, wall seconds, its peak resident memory in MiB)."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(cmd, stdout=null, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, time.perf_counter() - t0, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def _measures(input_path, sub: Path, labels, hu_window) -> dict:
    """Mean over the cases of the boundary / noise measures of the reconstructions in ``sub``."""
    figs = []
    for case in discover_cases(input_path):
        img = nib.load(str(sub / f"{case.name}{RECON_SUFFIX}"))
        src = load_ct(case.path)
        aff = img.affine
        x, sp = to_slices(np.clip(src[0].numpy().astype(np.float64), *hu_window), aff)
        y, _ = to_slices(np.asarray(img.dataobj).astype(np.float64), aff)
        lab = None if labels is None else to_slices(load_labels(labels, aff, img.shape), aff)[0]
        a = analyze(x, y, sp, lab)
        figs.append([a[k] for k in MEASURES])
    with warnings.catch_warnings():  # a measure no case has (NaN: not measurable there) stays NaN, without a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(np.array(figs, dtype=np.float64), 0)
    return {k: float(v) for k, v in zip(MEASURES, means)}


def _run_vae(vae: str, opts: dict, input_path, sub: Path, labels, hu_window) -> dict:
    """One VAE: its recon run in a child process, then the table row."""
    code, err, seconds, peak = run_measured([sys.executable, "-m", __name__, json.dumps(opts)])
    if code:  # the child's one-line error is its last stderr line
        raise _ChildFailed((err.strip().splitlines() or [f"exit code {code}"])[-1].removeprefix(_CHILD_ERROR))
    summary = json.loads((sub / "summary.json").read_text())
    row = {"vae": vae, **{k: summary["metrics"][k]["mean"] for k in ("psnr", "ssim3d", "ssim2d", "mse_hu")}}
    row.update(seconds=seconds, peak_rss_mib=peak, **_measures(input_path, sub, labels, hu_window))
    return row


def compare_vaes(
    input_path: str,
    vaes,
    output_dir: str,
    weights: dict | None = None,
    labels: str | None = None,
    hu_window=(-1000.0, 1000.0),
    skip_existing=False,
    progress: bool = True,
    **overrides,
) -> list[dict]:
    """Reconstruct ``input_path`` with every VAE of ``vaes`` (one ``fvae recon`` process each; ``overrides``: its
    options), write ``compare.csv`` / ``compare.md`` and return the rows (one per VAE that ran, in the order of
    ``vaes``); a VAE that fails is reported at the end, after the others, as one :class:`BatchFailure` whose ``rows``
    are those of the others."""
    from ..vae import REGISTRY

    vaes = [str(v).strip() for v in (vaes.split(",") if isinstance(vaes, str) else vaes) if str(v).strip()]
    unknown = [v for v in vaes if v not in REGISTRY]
    if unknown or not vaes:
        raise OptionError(f"vaes {vaes}: unknown {unknown}; give VAE names of `fvae list-vaes`: {', '.join(REGISTRY)}")
    if weights is not None and not isinstance(weights, dict):
        raise OptionError(f'weights {weights!r}: give a JSON object of weights per VAE, e.g. {{"wan2.1": "/path"}}')
    if labels is not None and not Path(labels).exists():
        raise InputError(labels, "does not exist (give the label map of the input)")
    weights, out = weights or {}, Path(output_dir)
    skip_existing = parse_bool(skip_existing, "skip_existing")
    hu_window = list(hu_window_of(hu_window))
    runner = BatchRunner(out, "fvae compare-vaes", {"compare.csv": COLUMNS}, progress=progress)
    with runner:
        runner.plan(lambda: [_VAERun(v, str(input_path)) for v in vaes])
        for run in runner.mine():
            with runner.case(run) as c:
                sub = out / run.name
                opts = {"input": str(input_path), "output_dir": str(sub), "vae": run.name}
                opts.update(vae_weights=weights.get(run.name), hu_window=hu_window, figures=False, **overrides)
                settings = {"options": opts, "labels": labels}
                record = sub / "compare.json"
                old = _previous(record, settings) if skip_existing else None
                if old is None:
                    row = _run_vae(
                        run.name, {**opts, "skip_existing": skip_existing}, input_path, sub, labels, hu_window
                    )
                    write_text_atomic(record, json.dumps({"settings": settings, "row": row}, indent=1))
                c.add({**(old or row), "case": run.name})
        rows, _ = runner.gather()
        rows = rows["compare.csv"]
        if rows:
            write_text_atomic(out / "compare.md", markdown_table(rows) + "\n")
    if runner.failures:
        lines = [f"{f['case']}: {f['error'].removeprefix(_ChildFailed.__name__ + ': ')}" for f in runner.failures]
        e = BatchFailure(
            f"{len(lines)} of {len(vaes)} VAEs failed (the table has the others):\n  " + "\n  ".join(lines)
        )
        e.rows = rows  # the table of the VAEs that ran
        raise e
    return rows


def _previous(record: Path, settings: dict) -> dict | None:
    """The row ``record`` holds if it was made with ``settings`` (a resumed comparison), else ``None``."""
    try:
        old = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("settings") != settings or not isinstance(old.get("row"), dict):
        return None
    log.info("compare-vaes: %s done earlier with the same settings; its row is reused", record.parent.name)
    return old["row"]


def markdown_table(rows: list[dict]) -> str:
    """compare.md: one row per VAE, the columns of compare.csv."""
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(md)


_CHILD_ERROR = "compare-vaes child: "


def _child(argv: list[str]) -> None:
    """``python -m fvae_ct.recon.compare '<json options>'``: one recon run of :func:`compare_vaes` in a process of
    its own; an fvae-ct error ends it with one line on stderr and exit code 1."""
    from ..bundle import run_bundle
    from ..errors import user_error

    try:
        run_bundle("fvae_recon", "inference.yaml", **json.loads(argv[0]))
    except Exception as e:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        cause = user_error(e)
        if cause is None:
            raise
        sys.exit(f"{_CHILD_ERROR}{cause}")


if __name__ == "__main__":
    _child(sys.argv[1:])
