"""The reconstruction workflow behind ``bundles/fvae_recon`` and ``fvae recon`` (one implementation).

For each case: load + validate -> HU window -> (working spacing) -> axial slices -> frozen VAE
``reconstruct`` (tiled, memory-bounded) -> inverse transforms (HU restored by rounding) -> int16 NIfTI
with the input's affine, written atomically -> metrics on the original grid -> three-view PNG.
A failing case is reported and skipped; the run ends with an error listing the failures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from .. import distributed
from ..batch import BatchRunner, csv_cell
from ..errors import BatchFailure, OptionError
from ..figures import three_view
from ..io import (
    OUTPUT_MARK,
    Case,
    axial_axis,
    discover_cases,
    is_own_output,
    load_ct,
    save_nifti_atomic,
    spacing_of,
    unique_names,
    write_text_atomic,
)
from ..metrics import PROTOCOL, recon_metrics, ssim_unavailable
from ..options import parse_bool
from ..tiling import TilingConfig, auto_tile_size
from ..transforms import DEFAULT_HU_WINDOW, HU_ROUNDING, SLICE_ORIENTATIONS, recon_preprocessing
from ..vae.base import FrozenVAE

__all__ = ["VAEReconInferer", "ReconWorkflow", "BatchFailure", "RECON_SUFFIX", "VAEReconstructd", "reconstruct_hu"]

log = logging.getLogger("fvae_ct")
RECON_SUFFIX = "_recon.nii.gz"
METRIC_KEYS = ("psnr", "ssim3d", "ssim2d", "mse", "mse_hu", "mae_hu", "seconds")


class VAEReconInferer(Inferer):
    """MONAI ``Inferer``: ``inferer(x, vae)`` = ``vae.reconstruct(x)`` with the tiling knobs of this object.

    ``x: [B, 1, D, H, W]`` in the VAE's input range -> same shape and range. ``tile_size="auto"``: whole slices on
    the CPU; on a GPU the tile edge :func:`fvae_ct.tiling.auto_tile_size` picks from the free GPU memory (whole
    slices when they fit), decided per call and kept in ``self.tiling``.
    """

    def __init__(
        self,
        tile_size: int | None = None,
        tile_overlap: int = 96,
        depth_window: int | None = None,
        depth_overlap: int = 4,
        slice_batch: int = 4,
        blend: str = "cosine",
        progress: bool = False,
        depth_last: str = "shift",
    ):
        super().__init__()
        self.auto = tile_size == "auto"
        tile_size = None if self.auto else tile_size
        self.tiling = TilingConfig(tile_size, tile_overlap, depth_window, depth_overlap, slice_batch, blend, depth_last)
        self.progress = progress

    def __call__(self, inputs: torch.Tensor, network: FrozenVAE, *args, **kwargs) -> torch.Tensor:
        if self.auto and network.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(network.device)
            tile = auto_tile_size(network, *inputs.shape[-2:], free / 2**30)
            overlap = min(self.tiling.tile_overlap, tile // 2) if tile else self.tiling.tile_overlap
            self.tiling = replace(self.tiling, tile_size=tile, tile_overlap=overlap)
            log.info(
                "%s: %s (%.1f GiB free on %s)",
                network.name,
                f"tiles of {tile}" if tile else "whole slices",
                free / 2**30,
                network.device,
            )
        return network.reconstruct(inputs, tiling=self.tiling, progress=self.progress)


def reconstruct_hu(image: MetaTensor, network: FrozenVAE, preprocessing, inferer: VAEReconInferer) -> MetaTensor:
    """HU ``MetaTensor [1, X, Y, Z]`` -> reconstructed HU ``[1, X, Y, Z]`` (integer values, float dtype).

    ``preprocessing`` is :func:`fvae_ct.transforms.recon_preprocessing` for this network; its inverse puts
    the reconstruction back on the input's grid and restores HU by rounding.
    """
    x = preprocessing({"image": image})["image"]
    y = inferer(x.as_tensor()[None].to(network.device), network)[0].cpu()
    pred = MetaTensor(y, meta=dict(x.meta), applied_operations=list(x.applied_operations))
    out = preprocessing.inverse({"image": pred})["image"]
    return MetaTensor(out.as_tensor(), meta=dict(image.meta))


class VAEReconstructd(MapTransform):
    """The frozen VAE as a MONAI dictionary transform: ``d[output_key] = reconstruction of d[key]`` (HU).

    For the ``online`` reconstruction view of segmentation training (GPU users). ``d[key]`` is an HU
    ``MetaTensor [1, X, Y, Z]``; the output has the same shape, affine and meta.
    """

    def __init__(
        self,
        keys,
        network: FrozenVAE,
        output_key: str = "image_recon",
        hu_window=DEFAULT_HU_WINDOW,
        working_spacing: float | None = None,
        inferer: VAEReconInferer | None = None,
    ):
        super().__init__(keys)
        self.network = network
        self.output_key = output_key
        self.inferer = inferer or VAEReconInferer()
        self.preprocessing = recon_preprocessing(
            "image", hu_window, network.input_range, working_spacing, check_hu=False
        )

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key])
            d[self.output_key] = reconstruct_hu(img, self.network, self.preprocessing, self.inferer)
        return d


CASE_KEYS = ("shape", "spacing_mm", "modality", "warnings", "input", "output")
CSV_COLUMNS = ("case", "status", *METRIC_KEYS, *CASE_KEYS)


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _json_value(v):
    """JSON-safe: inf -> ``"inf"``, NaN -> ``None`` (not measured); the rest as is."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class ReconWorkflow:
    """Reconstruct CT volumes through a frozen VAE, write them and score them.

    Args:
        network: the frozen VAE (see :func:`fvae_ct.vae.load`).
        output_dir: where ``<case>_recon.nii.gz``, ``<case>_views.png``, ``metrics.csv`` and ``summary.json`` go.
        inferer: a :class:`VAEReconInferer` (tiling knobs); default untiled, 4 slices per batch.
        hu_window: HU window ``[low, high]``; voxels outside it are clipped (also in the output).
        working_spacing: in-plane spacing (mm) to resample to before the VAE (``None``: native grid).
        skip_existing: reuse an existing ``<case>_recon.nii.gz`` (metrics are still computed).
        slice_orientation: ``display`` (upright axial slices, ours) or ``file`` (the file's voxel order, the paper's).
        hu_rounding: ``round`` (ours) or ``truncate`` (toward zero, the paper's ``astype(int16)``).
        figures: write the three-view PNG per case.
        device: torch device for the VAE.
    """

    def __init__(
        self,
        network: FrozenVAE,
        output_dir: str,
        inferer: VAEReconInferer | None = None,
        hu_window=DEFAULT_HU_WINDOW,
        working_spacing: float | None = None,
        skip_existing: bool = False,
        figures: bool = True,
        check_hu: bool = True,
        device: str | torch.device | None = None,
        progress: bool = True,
        slice_orientation: str = "display",
        hu_rounding: str = "round",
    ):
        self.network = network if device is None else network.to(device)
        self.output_dir = Path(output_dir)
        self.inferer = inferer or VAEReconInferer()
        if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
            raise OptionError(f"hu_window {list(hu_window)}: give [low, high] with low < high, e.g. [-1000, 1000]")
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.working_spacing = None if working_spacing in (None, "", "None") else float(working_spacing)
        if self.working_spacing is not None and not self.working_spacing > 0:
            raise OptionError(f"working_spacing {working_spacing}: give a positive in-plane spacing in mm, or none")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise OptionError(f"output_dir {self.output_dir}: exists and is a file, not a folder")
        if any(p.exists() and not p.is_dir() for p in self.output_dir.parents):
            raise OptionError(f"output_dir {self.output_dir}: a part of the path is a file, not a folder")
        self.skip_existing = parse_bool(skip_existing, "skip_existing")
        self.figures = parse_bool(figures, "figures")
        self.progress = progress
        if slice_orientation not in SLICE_ORIENTATIONS:
            raise OptionError(f"slice_orientation {slice_orientation!r}: give one of {', '.join(SLICE_ORIENTATIONS)}")
        if hu_rounding not in HU_ROUNDING:
            raise OptionError(f"hu_rounding {hu_rounding!r}: give one of {', '.join(HU_ROUNDING)}")
        self.slice_orientation, self.hu_rounding = slice_orientation, hu_rounding
        self.preprocessing = recon_preprocessing(
            "image", self.hu_window, network.input_range, self.working_spacing, check_hu, slice_orientation, hu_rounding
        )

    # ---- one case -------------------------------------------------------------------------------------
    def reconstruct_volume(self, image: MetaTensor) -> MetaTensor:
        """HU ``MetaTensor [1, X, Y, Z]`` -> reconstructed HU ``[1, X, Y, Z]`` (integer values, float dtype)."""
        return reconstruct_hu(image, self.network, self.preprocessing, self.inferer)

    def _existing_output(self, out_path: Path, shape, affine) -> tuple[np.ndarray | None, str]:
        """The reconstruction already at ``out_path`` if it is complete and fits the input, else ``(None, why)``."""
        try:
            img = nib.load(str(out_path))
            data = np.asarray(img.dataobj)  # reads every byte: a truncated file fails here
        except Exception as e:  # noqa: BLE001 - any reader error means: recompute
            return None, f"is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
        if data.shape != tuple(shape):
            return None, f"has shape {data.shape}, the input {tuple(shape)}"
        if not np.allclose(img.affine, affine, atol=1e-4):
            return None, "lies on another grid than the input (affines differ)"
        return data, ""

    def run_case(self, case: Case, forbid=()) -> dict:
        """Reconstruct, write and score one case; ``forbid``: paths never written over (the batch's inputs)."""
        out_path = self.output_dir / f"{case.name}{RECON_SUFFIX}"
        t0 = time.perf_counter()
        info: dict = {}
        image = load_ct(case.path, check_hu=True, info=info)
        notes = list(info["warnings"])
        is_nifti = Path(case.path).is_file()
        affine = nib.load(case.path).affine if is_nifti else np.asarray(image.affine, dtype=np.float64)
        hu_in = image[0].numpy()
        hu_out, status, seconds = None, "ok", math.nan
        if self.skip_existing and out_path.is_file():
            hu_out, why = self._existing_output(out_path, hu_in.shape, affine)
            if hu_out is None:
                log.warning("%s: the existing %s %s; reconstructing it again", case.name, out_path.name, why)
                notes.append(f"existing output {why}: reconstructed again")
            else:
                status = "skipped"
        if hu_out is None:
            rec = self.reconstruct_volume(image)[0].numpy()
            hu_out = np.clip(np.round(rec), -32768, 32767).astype(np.int16)
            del rec
            save_nifti_atomic(
                hu_out,
                affine,
                out_path,
                like=case.path if is_nifti else None,
                forbid=(case.path, *forbid),
                description=f"{OUTPUT_MARK} {self.network.name}",
            )
            seconds = time.perf_counter() - t0
        ax = axial_axis(affine)
        x, y = np.moveaxis(hu_in, ax, 0), np.moveaxis(hu_out, ax, 0)  # views, [D, H, W]
        m = recon_metrics(x, y, self.hu_window)
        for k, dims in (("ssim3d", 3), ("ssim2d", 2)):
            why = ssim_unavailable(x.shape, dims)
            if why is not None:
                m[k] = "n/a"
                notes.append(f"{k} {why}")
        m["seconds"] = seconds
        if self.figures:
            three_view(
                hu_in,
                hu_out,
                affine,
                self.output_dir / f"{case.name}_views.png",
                title=f"{case.name} - {self.network.name}",
                window=self.hu_window,
                metrics={k: m[k] for k in ("psnr", "ssim2d", "mae_hu")},
            )
        sp = spacing_of(affine)
        return {
            "case": case.name,
            "status": status,
            **m,
            "shape": "x".join(map(str, hu_in.shape)),
            "spacing_mm": "x".join(f"{s:.4g}" for s in sp),
            "modality": info.get("modality") or ("n/a (NIfTI)" if is_nifti else ""),
            "warnings": notes,
            "input": case.path,
            "output": str(out_path),
        }

    # ---- a batch --------------------------------------------------------------------------------------
    def cases(self, input_path) -> list[Case]:
        """Cases of a path (see :func:`fvae_ct.io.discover_cases`) or of a list of paths."""
        if isinstance(input_path, (list, tuple)):
            cases = unique_names([c for p in input_path for c in discover_cases(p)])
        else:
            cases = discover_cases(input_path)
        out = self.output_dir.resolve()
        # when the output folder is the input folder, our own earlier reconstructions (marked in their header) are
        # not inputs; any other file there is, and is never written over
        return [
            c
            for c in cases
            if not (
                Path(os.path.realpath(c.path)).parent == out and c.path.endswith(RECON_SUFFIX) and is_own_output(c.path)
            )
        ]

    def run(self, input_path) -> dict:
        """Process every case of ``input_path``; write metrics.csv (one row per case, appended and synced as each
        case ends) and summary.json; raise if any case failed.

        One run at a time per output folder (a second one is refused while the first holds the folder's lock).
        Interrupted (Ctrl-C, a kill): the rows written so far stay in metrics.csv; Ctrl-C also writes summary.json
        marked ``interrupted``. Rerun with ``skip_existing`` to resume: finished cases are reused and scored again,
        so metrics.csv ends with one row per case.

        Under torchrun (:mod:`fvae_ct.distributed` initialised) every rank calls this: rank 0 takes the folder's
        lock, lists the cases and splits them by voxel count (:func:`fvae_ct.distributed.shard`); each rank runs
        and writes only its share, its rows appended to ``metrics.rank<r>.csv``; rank 0 gathers every rank's rows
        and failures and writes the merged metrics.csv / summary.json in the order of the case list (the rank
        files are then removed). A failing case is recorded by its rank and never blocks the others.
        """
        world = distributed.world_size()
        what = f"fvae recon ({self.network.name})" + (f", {world} ranks" if world > 1 else "")

        def interrupted():  # Ctrl-C: summary.json of the cases done, marked interrupted
            self._write(runner.rows.get("metrics.csv", []), runner.failures, len(runner.cases), interrupted=True)

        runner = BatchRunner(
            self.output_dir,
            what,
            csv={"metrics.csv": CSV_COLUMNS},
            progress=self.progress,
            resume=self.skip_existing,
            interrupted=interrupted,
        )
        with runner:
            cases = runner.plan(lambda: self.cases(input_path))
            previous = runner.previous.get("metrics.csv", {})  # the times of an earlier (killed, sharded) run
            inputs = tuple(os.path.realpath(c.path) for c in cases)  # a link loop: no error
            for case in runner.mine():
                with runner.case(case) as c:
                    row = self.run_case(case, forbid=inputs)
                    if row["status"] == "skipped" and case.name in previous:  # keep the time it took when it ran
                        row["seconds"] = _float(previous[case.name].get("seconds"))
                    c.add(row)
                    log.info(
                        "%s%s: PSNR %.2f dB, SSIM2d %s", runner.tag, case.name, row["psnr"], csv_cell(row["ssim2d"])
                    )
            tables, failures = runner.gather()
            summary = None
            if runner.rank == 0:
                rows = tables["metrics.csv"]
                summary = self._write(rows, failures, n_cases=len(cases), ranks=runner.ranks())
                print(self.table(rows, failures))
            summary = distributed.broadcast_object(summary)
        runner.raise_failures()
        return summary

    def _write(
        self,
        rows: list[dict],
        failures: list[dict],
        n_cases: int,
        interrupted: bool = False,
        ranks: list[dict] | None = None,
    ) -> dict:
        """summary.json: statistics per metric over the finished cases, each case, the failures; ``ranks``: the
        share of each rank of a torchrun run (cases, voxels)."""
        stats = {}
        for k in METRIC_KEYS:
            vals = [r.get(k) for r in rows]
            v = np.array([x for x in vals if isinstance(x, float) and math.isfinite(x)])
            stats[k] = {
                "mean": float(v.mean()) if v.size else None,
                "std": float(v.std()) if v.size else None,
                "n": int(v.size),
            }
            n_inf = sum(isinstance(x, float) and math.isinf(x) for x in vals)
            n_na = sum(x == "n/a" for x in vals)
            if k == "psnr" or n_inf:
                stats[k]["n_inf"] = int(n_inf)  # identical reconstructions: counted, not averaged
            if n_na:
                stats[k]["n_na"] = int(n_na)
        net = self.network
        modalities: dict[str, int] = {}
        for r in rows:
            modalities[r["modality"] or "unknown"] = modalities.get(r["modality"] or "unknown", 0) + 1
        summary = {
            "vae": net.name,
            "vae_properties": {
                "latent_channels": net.latent_channels,
                "spatial_factor": net.spatial_factor,
                "depth_factor": net.depth_factor,
                "input_range": list(net.input_range),
            },
            "hu_window": list(self.hu_window),
            "working_spacing_mm": self.working_spacing,
            "tiling": self.inferer.tiling.as_dict(),
            "slice_orientation": self.slice_orientation,
            "hu_rounding": self.hu_rounding,
            "protocol": PROTOCOL,
            "n_cases": n_cases,
            "n_ok": len(rows),
            "n_failed": len(failures),
            "interrupted": interrupted,
            "world_size": len(ranks) if ranks else 1,
            **({"ranks": ranks} if ranks else {}),
            "metrics": stats,
            "modalities": modalities,
            "n_with_warnings": sum(bool(r["warnings"]) for r in rows),
            "cases": [{k: _json_value(r.get(k)) for k in ("case", "status", *METRIC_KEYS, *CASE_KEYS)} for r in rows],
            "failures": failures,
        }
        write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
        return summary

    @staticmethod
    def table(rows: list[dict], failures: list[dict]) -> str:
        def cell(v, width, fmt):
            return (
                f"{v:{width}{fmt}}" if isinstance(v, float) and math.isfinite(v) else f"{csv_cell(v) or '-':>{width}}"
            )

        head = f"{'case':<32} {'PSNR dB':>8} {'SSIM3d':>7} {'SSIM2d':>7} {'MSE HU2':>9} {'sec':>7}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(
                f"{r['case'][:32]:<32} {cell(r['psnr'], 8, '.2f')} {cell(r['ssim3d'], 7, '.4f')} "
                f"{cell(r['ssim2d'], 7, '.4f')} {cell(r['mse_hu'], 9, '.1f')} {cell(r['seconds'], 7, '.1f')}"
            )
        if len(rows) > 1:
            mean = {}
            for k in ("psnr", "ssim3d", "ssim2d", "mse_hu"):
                v = [r[k] for r in rows if isinstance(r[k], float) and math.isfinite(r[k])]
                mean[k] = float(np.mean(v)) if v else math.nan
            lines.append(
                f"{'mean (finite)':<32} {cell(mean['psnr'], 8, '.2f')} {cell(mean['ssim3d'], 7, '.4f')} "
                f"{cell(mean['ssim2d'], 7, '.4f')} {cell(mean['mse_hu'], 9, '.1f')}"
            )
        for r in rows:
            for w in r.get("warnings") or ():
                lines.append(f"WARNING {r['case']}: {w}")
        for f in failures:
            lines.append(f"FAILED {f['case']}: {f['error']}")
        return "\n".join(lines)
