"""The reconstruction workflow behind ``bundles/fvae_recon`` and ``fvae recon`` (one implementation).

For each case: load + validate -> the preprocessing chain (HU window -> (working spacing) -> axial slices) -> frozen
VAE ``reconstruct`` (tiled, memory-bounded) -> the chain's inverse (integer HU) -> int16 NIfTI with the input's affine,
and/or (``output_format``) a derived DICOM series of a DICOM input (:mod:`fvae_ct.recon.dicom_output`), written
atomically -> metrics on the original grid -> three-view PNG. A failing case is reported and skipped; the run
ends with an error listing the failures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from .. import distributed
from ..batch import BatchRunner, csv_cell
from ..bundle import bundle_version
from ..dicomweb import store_files, store_target
from ..errors import BatchFailure, InputError, OptionError
from ..figures import three_view
from ..io import OUTPUT_MARK, Case, axial_axis, fetch_case, load_ct, save_nifti_atomic, spacing_of, write_text_atomic
from ..metrics import recon_metrics, ssim_unavailable
from ..options import parse_bool
from ..reconstruct import RECON_SUFFIX, VAEReconInferer, reconstruct_hu
from ..transforms import DEFAULT_HU_WINDOW
from ..vae.base import FrozenVAE
from .dicom_output import DICOM_SUFFIX, check_output_format, existing_series, write_derived_series
from .inputs import cases_of, list_cases
from .preprocessing import chain_settings, recon_chain
from .summary import CSV_COLUMNS, as_float, metrics_table, summarize

__all__ = ["ReconWorkflow", "BatchFailure", "RECON_SUFFIX"]

log = logging.getLogger("fvae_ct")


class ReconWorkflow:
    """Reconstruct CT volumes through a frozen VAE, write them and score them.

    Args:
        network: the frozen VAE (see :func:`fvae_ct.vae.load`).
        output_dir: where ``<case>_recon.nii.gz``, ``<case>_views.png``, ``metrics.csv`` and ``summary.json`` go.
        inferer: a :class:`~fvae_ct.reconstruct.VAEReconInferer` (tiling knobs); default untiled, 4 slices per batch.
        hu_window: HU window ``[low, high]``; voxels outside it are clipped (also in the output).
        working_spacing: in-plane spacing (mm) to resample to before the VAE (``None``: native grid).
        skip_existing: reuse an existing ``<case>_recon.nii.gz`` / ``<case>_recon_dicom/`` (checked: complete, on the
            input's grid; metrics are still computed).
        output_format: ``nifti`` (``<case>_recon.nii.gz``), ``dicom`` (only the derived series ``<case>_recon_dicom/``;
            a case that is not a DICOM series folder fails) or ``both`` (the series where the input is a DICOM series,
            with a warning where it is not).
        derived_by: the software named in the derived series (default: ``fvae_recon <version>``).
        store: a DICOMweb root (``http(s)://host[:port]/dicom-web``): each case's derived series is sent there with
            STOW-RS once written (:mod:`fvae_ct.dicomweb`; needs ``output_format`` dicom or both).
        slice_orientation: ``display`` (upright axial slices, ours) or ``file`` (the file's voxel order, the paper's).
        hu_rounding: ``round`` (ours) or ``truncate`` (toward zero, the paper's ``astype(int16)``).
        figures: write the three-view PNG per case.
        device: torch device for the VAE.
        dataset: the bundle's ``dataset``: a MONAI ``Dataset`` of :func:`fvae_ct.recon.inputs.datalist` items whose
            ``transform`` is the preprocessing chain (:func:`fvae_ct.recon.preprocessing.recon_chain`); :meth:`run`
            without an input runs its cases.
        preprocessing: the chain itself (default: the dataset's transform, else one built from ``hu_window``,
            ``working_spacing``, ``slice_orientation``, ``hu_rounding``, which are then read from the chain).
    """

    def __init__(
        self,
        network: FrozenVAE,
        output_dir: str,
        inferer: VAEReconInferer | None = None,
        hu_window=None,
        working_spacing: float | None = None,
        skip_existing: bool = False,
        figures: bool = True,
        check_hu: bool = True,
        device: str | torch.device | None = None,
        progress: bool = True,
        slice_orientation: str | None = None,
        hu_rounding: str | None = None,
        dataset=None,
        preprocessing=None,
        output_format: str = "nifti",
        derived_by: str | None = None,
        store: str | None = None,
    ):
        self.output_format = check_output_format(output_format)
        self.store = store_target(store)
        if self.store and self.output_format == "nifti":
            raise OptionError("store: sends the derived DICOM series; set output_format to dicom or both")
        self.derived_by = derived_by or bundle_version("fvae_recon")
        self.network = network if device is None else network.to(device)
        self.output_dir = Path(output_dir)
        self.inferer = inferer or VAEReconInferer()
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise OptionError(f"output_dir {self.output_dir}: exists and is a file, not a folder")
        if any(p.exists() and not p.is_dir() for p in self.output_dir.parents):
            raise OptionError(f"output_dir {self.output_dir}: a part of the path is a file, not a folder")
        self.skip_existing = parse_bool(skip_existing, "skip_existing")
        self.figures = parse_bool(figures, "figures")
        self.progress = progress
        self.dataset = dataset
        preprocessing = preprocessing if preprocessing is not None else getattr(dataset, "transform", None)
        given = {"hu_window": hu_window, "working_spacing": working_spacing}
        given.update(slice_orientation=slice_orientation, hu_rounding=hu_rounding)
        if preprocessing is None:
            preprocessing = recon_chain(
                DEFAULT_HU_WINDOW if hu_window is None else hu_window,
                network.input_range,
                working_spacing,
                slice_orientation or "display",
                hu_rounding or "round",
                check_hu=check_hu,
            )
        elif any(v is not None for v in given.values()):
            raise ValueError(f"{sorted(k for k, v in given.items() if v is not None)}: set them in the preprocessing")
        s = chain_settings(preprocessing)
        if tuple(s["input_range"]) != tuple(float(v) for v in network.input_range):
            raise OptionError(
                f"preprocessing: it maps HU to {list(s['input_range'])}, {network.name} takes "
                f"{list(network.input_range)} (build it with input_range: $@network_def.input_range)"
            )
        self.preprocessing = preprocessing
        self.hu_window, self.working_spacing = s["hu_window"], s["working_spacing"]
        self.slice_orientation, self.hu_rounding, self.arithmetic = (
            s["slice_orientation"],
            s["hu_rounding"],
            s["arithmetic"],
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
        dicom_path = self.output_dir / f"{case.name}{DICOM_SUFFIX}"
        t0 = time.perf_counter()
        info: dict = {}
        fetch_case(case)  # a series on a PACS: fetched now, by the process that runs it
        image = load_ct(case.path, check_hu=True, info=info)
        notes = list(info["warnings"])
        is_nifti = Path(case.path).is_file()
        affine = nib.load(case.path).affine if is_nifti else np.asarray(image.affine, dtype=np.float64)
        hu_in = image[0].numpy()
        want = {"nifti": self.output_format != "dicom", "dicom": self.output_format != "nifti"}
        if want["dicom"] and not Path(case.path).is_dir():
            if self.output_format == "dicom":
                raise InputError(case.path, "output_format dicom needs a DICOM series input")
            want["dicom"] = False
            notes.append("no DICOM series written: the input is not a DICOM series folder")
        found = self._reuse(out_path, dicom_path, want, hu_in.shape, affine, notes) if self.skip_existing else {}
        hu_out = found.get("nifti", found.get("dicom"))
        status, seconds = ("skipped" if hu_out is not None else "ok"), math.nan
        if hu_out is None:
            rec = self.reconstruct_volume(image)[0].numpy()
            hu_out = np.clip(np.round(rec), -32768, 32767).astype(np.int16)
            del rec
        if want["nifti"] and "nifti" not in found:
            save_nifti_atomic(
                hu_out,
                affine,
                out_path,
                like=case.path if is_nifti else None,
                forbid=(case.path, *forbid),
                description=f"{OUTPUT_MARK} {self.network.name}",
            )
        if want["dicom"] and not ("dicom" in found and np.array_equal(found["dicom"], hu_out)):
            notes += write_derived_series(
                case.path,
                hu_out,
                affine,
                dicom_path,
                self.network.name,
                self.derived_by,
                self._derivation_details(),
                forbid=(case.path, *forbid),
            )
        if want["dicom"] and self.store:
            store_files(self.store, sorted(dicom_path.glob("*.dcm")), f"{case.name}{DICOM_SUFFIX}")
        if status == "ok":
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
            "input": case.shown,
            "output": str(out_path) if want["nifti"] else "",
            "output_dicom": str(dicom_path) if want["dicom"] else "",
        }

    def _reuse(self, nifti: Path, dicom: Path, want: dict, shape, affine, notes: list) -> dict:
        """The outputs of ``want`` already there that are complete and fit the input: ``{"nifti" | "dicom": array}``;
        one that does not is named in the log and ``notes`` (it is written again)."""
        found = {}
        for kind, path, check in (("nifti", nifti, self._existing_output), ("dicom", dicom, existing_series)):
            if want[kind] and path.exists():
                data, why = check(path, shape, affine)
                if data is None:
                    log.warning("the existing %s %s; writing it again", path, why)
                    notes.append(f"existing output {why} ({path.name}): written again")
                else:
                    found[kind] = data
        return found

    def _derivation_details(self) -> str:
        """The settings a derived DICOM series records in its DerivationDescription."""
        lo, hi = self.hu_window
        ws = f"; in-plane working spacing {self.working_spacing:g} mm and back" if self.working_spacing else ""
        return f"HU window [{lo:g}, {hi:g}], values outside it clipped{ws}; HU rounding {self.hu_rounding}"

    # ---- a batch --------------------------------------------------------------------------------------
    def cases(self, input_path) -> list[Case]:
        """Cases of a path or a list of paths (:func:`fvae_ct.recon.inputs.list_cases`) for this output folder."""
        return list_cases(input_path, self.output_dir)

    def case_list(self, input_path=None) -> list[Case]:
        """The cases of ``input_path``, or without it those of the ``dataset`` this workflow was built with."""
        if input_path is not None:
            return self.cases(input_path)
        if self.dataset is None:
            raise ValueError("ReconWorkflow.run(): give the input, or build the workflow with a dataset")
        return cases_of(self.dataset.data)

    def run(self, input_path=None) -> dict:
        """Process every case of ``input_path`` (default: the cases of ``dataset``); write metrics.csv (one row per
        case, appended and synced as each case ends) and summary.json; raise if any case failed.

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
            cases = runner.plan(lambda: self.case_list(input_path))
            previous = runner.previous.get("metrics.csv", {})  # the times of an earlier (killed, sharded) run
            inputs = tuple(os.path.realpath(c.path) for c in cases)  # a link loop: no error
            for case in runner.mine():
                with runner.case(case) as c:
                    row = self.run_case(case, forbid=inputs)
                    if row["status"] == "skipped" and case.name in previous:  # keep the time it took when it ran
                        row["seconds"] = as_float(previous[case.name].get("seconds"))
                    c.add(row)
                    log.info(
                        "%s%s: PSNR %.2f dB, SSIM2d %s", runner.tag, case.name, row["psnr"], csv_cell(row["ssim2d"])
                    )
            tables, failures = runner.gather()
            summary = None
            if runner.rank == 0:
                rows = tables["metrics.csv"]
                summary = self._write(rows, failures, n_cases=len(cases), ranks=runner.ranks())
                print(metrics_table(rows, failures))
            summary = distributed.broadcast_object(summary)
        runner.raise_failures()
        return summary

    def _write(self, rows, failures, n_cases: int, interrupted: bool = False, ranks=None) -> dict:
        """summary.json (:func:`fvae_ct.recon.summary.summarize`) of this run; returns its content."""
        net = self.network
        run = {
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
            "arithmetic": self.arithmetic,
        }
        summary = summarize(rows, failures, n_cases, run, interrupted, ranks)
        write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
        return summary
