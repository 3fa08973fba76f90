"""Is the frozen VAE a boundary-preserving denoiser? The VAE and classical denoisers, side by side.

For each case the frozen VAE's reconstruction (through :class:`~fvae_ct.recon.ReconWorkflow`, the same
pipeline as the recon bundle) and every baseline of :data:`fvae_ct.recon.denoisers.DENOISERS` are scored
with the same functions (:mod:`fvae_ct.recon.boundary`, :mod:`fvae_ct.metrics.recon`) on the same
volume, clipped to the HU window. ``gaussian_matched`` is a gaussian whose sigma is chosen so that its
noise suppression equals the VAE's (at equal noise suppression, who keeps the boundaries sharper?);
``gaussian_psnr_matched`` one whose PSNR equals the VAE's (the same error budget: where does it go?).
When the VAE suppresses no noise, no gaussian matches it and the row says so.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from ..batch import BatchRunner
from ..errors import InputError, OptionError
from ..io import Case, fetch_case, load_ct, load_labels, write_text_atomic
from ..metrics.recon import recon_metrics
from ..options import parse_bool
from ..transforms import from_slices, to_slices
from .analysis_figure import analysis_figure
from .boundary import analyze, boundary_shift, edge_profiles, noise_floor, reference
from .denoisers import DENOISERS, gaussian, match_gaussian_sigma
from .noise import make_noise, noise_level, noise_ratio, noise_removed
from .tables import COLUMNS, NOISE_COLUMNS, SHORT, cell, noise_table, table
from .workflow import ReconWorkflow

__all__ = ["AnalysisWorkflow", "DEFAULT_METHODS", "COLUMNS"]

log = logging.getLogger("fvae_ct")
DEFAULT_METHODS = (
    "vae",
    "gaussian_matched",
    "gaussian_psnr_matched",
    "gaussian_1vox",
    "median3",
    "gaussian_inplane_0.5",
    "gaussian_inplane_1",
    "median3_inplane",
    "bilateral",
    "nlm",
)
DEFAULT_NOISE = ("white10", "white20", "ct20")
_MATCHED = ("gaussian_matched", "gaussian_psnr_matched")


def _label_for(case: Case, labels: str | None) -> str | None:
    """The label map of a case: datalist ``label``, a single file, or ``<case>[_seg|_label|_labels].nii.gz``."""
    if case.label:
        return case.label
    if labels is None:
        return None
    p = Path(labels)
    if p.is_file():
        return str(p)
    for suffix in ("_seg", "_label", "_labels", ""):
        for ext in (".nii.gz", ".nii"):
            q = p / f"{case.name}{suffix}{ext}"
            if q.is_file():
                return str(q)
    return None


def names(value, option: str) -> list[str]:
    """A list option given as a list, or as text (the command line): ``"a,b"``, ``"[a, b]"``; ``None``: empty."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise OptionError(f"{option} {value!r}: give a list of names, e.g. [a, b]")


class AnalysisWorkflow:
    """Score the VAE and the classical denoisers with the boundary/noise figures.

    Args:
        recon: the :class:`ReconWorkflow` (VAE, transforms, HU window, output folder) of the recon bundle.
        labels: a label map (one case) or a folder of ``<case>[_seg].nii.gz``; ``None`` = label-free mode.
        methods: ``"vae"``, ``"gaussian_matched"`` and any name of :data:`fvae_ct.recon.denoisers.DENOISERS`.
        cutoff: frequency (cycles/voxel) above which error energy counts as high-frequency.
    """

    def __init__(
        self,
        recon: ReconWorkflow,
        labels: str | None = None,
        methods=DEFAULT_METHODS,
        cutoff: float = 0.25,
        figures: bool = True,
        progress: bool = True,
        insert_noise=DEFAULT_NOISE,
    ):
        methods = names(methods, "methods")
        valid = ("vae", *_MATCHED, *DENOISERS)
        unknown = [m for m in methods if m not in valid]
        if unknown or not methods:
            raise OptionError(f"methods {methods}: unknown {unknown}; give any of {', '.join(valid)}")
        matched = [m for m in methods if m in _MATCHED]
        if matched and "vae" not in methods:
            raise OptionError(f"methods {methods}: {', '.join(matched)} need the 'vae' method (they match the VAE)")
        if "vae" in methods:  # the matched gaussians need the VAE's row first
            methods = ["vae", *[m for m in methods if m != "vae"]]
        try:
            self.cutoff = float(cutoff)
        except (TypeError, ValueError):
            self.cutoff = float("nan")
        if not 0 < self.cutoff <= 0.5**0.5:
            raise OptionError(f"hf_cutoff {cutoff!r}: give a frequency in cycles/voxel, above 0 and at most 0.707")
        if labels is not None and not Path(labels).exists():
            raise InputError(labels, "does not exist (give a label map, or a folder of <case>[_seg].nii.gz)")
        self.recon = recon
        self.labels = None if labels is None else str(labels)
        self.methods = methods
        self.figures = parse_bool(figures, "figures")
        self.progress = progress
        self.output_dir = recon.output_dir
        self.insert_noise = names(insert_noise, "insert_noise")
        for k in self.insert_noise:
            noise_level(k)  # a bad name fails now, not after the first case
        self.noise_rows: list[dict] = []

    def run_case(self, case: Case) -> list[dict]:
        window = self.recon.hu_window
        fetch_case(case)  # a series on a PACS: fetched now, by the process that runs it
        image = load_ct(case.path)
        affine = nib.load(case.path).affine if Path(case.path).is_file() else np.asarray(image.affine, np.float64)
        hu = image[0].numpy()
        x, spacing = to_slices(np.clip(hu.astype(np.float64), *window), affine)
        lab_path = _label_for(case, self.labels)
        lab = None
        if lab_path is not None:
            lab = to_slices(load_labels(lab_path, affine, hu.shape), affine)[0]
        elif self.labels is not None:
            log.warning("%s: no label map found in %s; label-free analysis", case.name, self.labels)
        ref = reference(x, spacing, lab)  # what every method is compared against, computed once
        sigmas: dict[str, float] = {}  # the matched gaussians' sigma, found on the clean volume

        def apply(method: str, xin: np.ndarray) -> np.ndarray:
            """``method`` on a volume ``xin`` (slice layout, HU, clipped), rounded and clipped like an output."""
            if method == "vae":
                img = image.clone()
                img[0] = torch.from_numpy(from_slices(xin, affine).astype(np.float32))
                y = to_slices(self.recon.reconstruct_volume(img)[0].numpy(), affine)[0]
            elif method in _MATCHED:
                y = np.round(gaussian(xin, sigmas[method]))
            else:
                y = np.round(DENOISERS[method].fn(xin, tuple(spacing), window))
            return np.clip(np.asarray(y, np.float64), *window)

        rows, outputs, spectra = [], {}, {}
        for method in tqdm(
            self.methods, desc=f"analysis {case.name}", unit="method", disable=not self.progress, leave=False
        ):
            t0 = time.perf_counter()
            param = ""
            name = f"vae:{self.recon.network.name}" if method == "vae" else method
            if method in _MATCHED:
                vae_row = next(r for r in rows if r["method"].startswith("vae:"))
                if method == "gaussian_matched":  # equal noise suppression
                    what, target = "noise_ratio", vae_row["noise_ratio"]
                    score = lambda g: noise_ratio(x, g, spacing, lab, ref["regions"])  # noqa: E731
                else:  # equal PSNR: the same error budget, spent differently
                    what, target = "psnr", vae_row["psnr"]
                    score = lambda g: recon_metrics(x, np.round(g), window)["psnr"]  # noqa: E731
                sigma = match_gaussian_sigma(x, target, score)
                if not np.isfinite(sigma):
                    log.warning("%s: no gaussian reaches the VAE's %s (%.3f)", case.name, what, target)
                    rows.append(
                        {
                            "case": case.name,
                            "method": name,
                            **{k: float("nan") for k in (*SHORT, *COLUMNS[2:-2])},
                            "param": f"no match: VAE {what} {target:.3f}",
                            "seconds": time.perf_counter() - t0,
                            "labels": lab_path or "",
                        }
                    )
                    continue
                sigmas[method] = sigma
                param = f"sigma={sigma:.3f} vox"
            y = apply(method, x)
            seconds = time.perf_counter() - t0
            m = recon_metrics(x, y, window)
            a = analyze(x, y, spacing, lab, self.cutoff, ref)
            spectra[name] = a.pop("_spectrum")
            a.pop("_per_organ")
            floor = noise_floor(x, y, spacing, lab, ref, *window)
            rows.append(
                {
                    "case": case.name,
                    "method": name,
                    **{k: m[k] for k in ("psnr", "ssim2d", "ssim3d")},
                    **a,
                    **floor,
                    "param": param,
                    "seconds": seconds,
                    "labels": lab_path or "",
                }
            )
            outputs[name] = y
        self.noise_rows.extend(self._inserted_noise(case.name, x, spacing, lab, ref, apply, sigmas, window, outputs))
        if self.figures:
            path = self.output_dir / f"{case.name}_analysis.png"
            analysis_figure(path, case.name, x, outputs, spectra, rows, lab is not None, self.cutoff)
        return rows

    def _inserted_noise(self, name, x, spacing, lab, ref, apply, sigmas, window, outputs) -> list[dict]:
        """Known noise added to the original, every method run on the noisy copy: how much of the inserted noise comes
        through (against the method's output for the original), the error against the original, and how far the
        boundaries of the output move from the original's."""
        out = []
        hom = ref["regions"][0]

        def rms(v):
            return float(np.sqrt(np.mean(v[hom] ** 2))) if hom.any() else float("nan")

        for j, kind in enumerate(self.insert_noise):
            n = make_noise(kind, x.shape, seed=100 + j)
            xn = np.clip(x + n, *window)
            for method in self.methods:
                label = f"vae:{self.recon.network.name}" if method == "vae" else method
                if label not in outputs:  # a matched gaussian without a match
                    continue
                y = apply(method, xn)
                sh = boundary_shift(x, y, spacing, lab, ref=ref)
                ep = edge_profiles(x, y, spacing, lab, ref=ref)
                out.append(
                    {
                        "case": name,
                        "method": label,
                        "noise": kind,
                        "noise_hu": rms(xn - x),
                        "noise_removed": noise_removed(outputs[label], y, xn - x, hom),
                        "error_hu": rms(y - x),
                        "boundary_shift_mean_mm": sh["mean_mm"],
                        "boundary_shift_p95_mm": sh["p95_mm"],
                        "edge_width_ratio": ep["width_ratio"],
                        "edge_offset_mm": ep["offset_mm"],
                        "param": f"sigma={sigmas[method]:.3f} vox" if method in sigmas else "",
                    }
                )
            # the noisy input itself: the reference row (removes nothing)
            sh = boundary_shift(x, xn, spacing, lab, ref=ref)
            ep = edge_profiles(x, xn, spacing, lab, ref=ref)
            out.append(
                {
                    "case": name,
                    "method": "noisy input",
                    "noise": kind,
                    "noise_hu": rms(xn - x),
                    "noise_removed": 0.0,
                    "error_hu": rms(xn - x),
                    "boundary_shift_mean_mm": sh["mean_mm"],
                    "boundary_shift_p95_mm": sh["p95_mm"],
                    "edge_width_ratio": ep["width_ratio"],
                    "edge_offset_mm": ep["offset_mm"],
                    "param": "",
                }
            )
        return out

    def _settings(self, case: Case) -> dict:
        """What a case's ``<case>_analysis.json`` depends on (``skip_existing`` reuses it only when they match)."""
        return {
            "vae": self.recon.network.name,
            "hu_window": list(self.recon.hu_window),
            "methods": self.methods,
            "cutoff": self.cutoff,
            "insert_noise": self.insert_noise,
            "labels": _label_for(case, self.labels) or "",
            "input": case.shown,
        }

    def _case_result(self, case: Case) -> tuple[list[dict], list[dict]]:
        """(rows, inserted-noise rows) of one case: reused from ``<case>_analysis.json`` with ``skip_existing`` when
        it was made with the same settings, else computed and stored there (atomically)."""
        path, settings = self.output_dir / f"{case.name}_analysis.json", self._settings(case)
        if self.recon.skip_existing and path.is_file():
            try:
                old = json.loads(path.read_text())
                if old.get("settings") == settings:
                    return old["rows"], old["inserted_noise"]
                log.warning("%s: %s was made with other settings; analysing again", case.name, path.name)
            except (OSError, ValueError, KeyError, AttributeError) as e:
                log.warning("%s: %s is unreadable (%s); analysing again", case.name, path.name, type(e).__name__)
        n = len(self.noise_rows)
        rows = self.run_case(case)
        noise = self.noise_rows[n:]
        record = {"settings": settings, "rows": rows, "inserted_noise": noise}
        write_text_atomic(path, json.dumps(record, indent=1, default=float))
        return rows, noise

    def run(self, input_path=None) -> list[dict]:
        """Analyse every case of ``input_path`` (default: the cases of the recon's dataset); write ``analysis.csv``,
        ``denoising.csv`` (inserted noise), ``analysis.json``, one PNG and one ``<case>_analysis.json`` per case. The
        batch of :class:`fvae_ct.batch.BatchRunner`: one run per folder, rows appended as each case ends, torchrun
        sharding; the recon's ``skip_existing`` resumes (a case with a ``<case>_analysis.json`` of the same settings is
        not analysed again)."""
        tables = {
            "analysis.csv": [*COLUMNS, "labels"],
            **({"denoising.csv": NOISE_COLUMNS} if self.insert_noise else {}),
        }
        self.noise_rows = []
        with BatchRunner(self.output_dir, "fvae analyze", tables, cell, self.progress) as runner:
            runner.plan(lambda: self.recon.case_list(input_path))
            for case in runner.mine():
                with runner.case(case) as c:
                    rows, noise = self._case_result(case)
                    c.add(*rows)
                    c.add(*noise, table="denoising.csv")
            tables, failures = runner.gather()
            rows, self.noise_rows = tables["analysis.csv"], tables.get("denoising.csv", [])
            if runner.rank == 0:
                record = {
                    "vae": self.recon.network.name,
                    "hu_window": list(self.recon.hu_window),
                    "cutoff": self.cutoff,
                }
                record.update(rows=rows, inserted_noise=self.noise_rows, failures=failures)
                write_text_atomic(self.output_dir / "analysis.json", json.dumps(record, indent=2, default=float))
                print(table(rows))
                if self.noise_rows:
                    print(noise_table(self.noise_rows))
        runner.raise_failures()
        return rows
