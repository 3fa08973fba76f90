"""The ``fvae`` command (python-fire). Subcommands run the same bundle configs as ``python -m monai.bundle run``.

fvae recon INPUT -o OUT --vae taef2 [--working_spacing 1.0] [--tile_size 256] ...
fvae analyze INPUT -o OUT --labels LABELS --vae taef2
fvae make-lesion-set OUT --n_cases 6
fvae ablate-seg --datalist OUT/dataset.json --arms none,union -o ablation [--max_epochs 50 ...]
fvae evaluate-gen --gen_dir G --real_dir R --masks_dir M --output_dir OUT
fvae compare-vaes INPUT --vaes taef2,wan2.1 --output_dir OUT
fvae list-vaes
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["main"]


def _path(p):
    """A path argument as text (fire turns a folder named ``12345`` into an int, and a list stays a list)."""
    if p is None or isinstance(p, (list, tuple)):
        return p
    return str(p)


@contextlib.contextmanager
def _user_errors(command: str, on_interrupt: str | None = None):
    """fvae-ct errors (and missing files) raised in the block: one line ``fvae <command>: <error>``, exit code 1;
    Ctrl-C: exit code 130 (with ``on_interrupt`` said); anything else (a bug) keeps its traceback."""
    from .errors import user_error

    try:
        yield
    except KeyboardInterrupt:
        print(f"fvae {command}: interrupted" + (f" ({on_interrupt})" if on_interrupt else ""), file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        cause = user_error(e)
        if cause is None:
            raise
        sys.exit(f"fvae {command}: {cause}")


def _run_cli(command: str, config, bundle: str = "fvae_recon", **overrides) -> None:
    """``run_bundle(bundle, ...)`` with fvae-ct errors (and missing files) turned into a one-line message and
    exit code 1 (:func:`_user_errors`)."""
    from .bundle import run_bundle

    with _user_errors(command, "finished cases are kept; rerun with --skip_existing true to resume"):
        run_bundle(bundle, config, **overrides)


def _check_options(command: str, bundle: str, configs: list[str], options: dict) -> None:
    """Refuse, in one line, an option that is not a top-level id of the bundle's configs (a typo would otherwise
    set an id nothing reads)."""
    import yaml

    from .bundle import bundle_dir

    root = bundle_dir(bundle)
    ids = set()
    for c in configs:
        ids |= set(yaml.safe_load((root / "configs" / c).read_text()) or {})
    unknown = sorted(set(options) - ids)
    if unknown:
        sys.exit(
            f"fvae {command}: unknown option(s) {', '.join('--' + u for u in unknown)} (not ids of {bundle} "
            f"{' + '.join(configs)})"
        )


class CLI:
    """fvae-ct: frozen natural-image/video foundation VAEs for 3D CT."""

    def recon(self, input: str | None = None, output_dir: str | None = None, vae: str = "taef2", **options) -> None:
        """Reconstruct CT through a frozen VAE and score it (the fvae_recon bundle's inference.yaml).

        INPUT: a NIfTI file, a DICOM series folder, a folder of those, a datalist JSON, or a DICOMweb study /
        series address (default: the sample DICOM series from FVAE_ASSETS); --store <DICOMweb root> with
        --output_format dicom|both sends each derived series there. Writes <case>_recon.nii.gz, <case>_views.png, metrics.csv
        and summary.json into OUTPUT_DIR (-o). Exits non-zero when any case failed. Every option of the
        config passes through as --<id> <value> (e.g. --vae_weights, --device, --hu_window, --working_spacing,
        --skip_existing, --figures, --tile_size, --depth_window, --slice_orientation, --hu_rounding, --depth_last);
        an id the config does not have is refused.
        """
        output_dir = output_dir or options.pop("o", None)  # fire leaves -o among the free options
        if output_dir is None:
            sys.exit("fvae recon: give an output folder with -o / --output_dir")
        _check_options("recon", "fvae_recon", ["inference.yaml"], options)
        _run_cli("recon", "inference.yaml", input=_path(input), output_dir=_path(output_dir), vae=vae, **options)

    def analyze(
        self,
        input: str | None = None,
        output_dir: str | None = None,
        labels: str | None = None,
        vae: str = "taef2",
        vae_weights: str | None = None,
        methods=None,
        hu_window=None,
        working_spacing: float | None = None,
        hf_cutoff: float | None = None,
        device: str | None = None,
        figures: bool = True,
        insert_noise=None,
    ) -> None:
        """Is the VAE a boundary-preserving denoiser? The VAE and classical denoisers scored side by side.

        Writes analysis.csv, denoising.csv, analysis.json and <case>_analysis.png into OUTPUT_DIR (-o). LABELS: a
        label map (one case) or a folder of <case>[_seg].nii.gz; without it, boundaries are image edges.
        INSERT_NOISE: the known noises added for the denoising test, e.g. "[white10,ct20]" ("[]": none).
        """
        if output_dir is None:
            sys.exit("fvae analyze: give an output folder with -o / --output_dir")
        _run_cli(
            "analyze",
            ["inference.yaml", "analysis.yaml"],
            input=_path(input),
            output_dir=_path(output_dir),
            labels=labels,
            vae=vae,
            vae_weights=vae_weights,
            methods=methods,
            hu_window=hu_window,
            working_spacing=working_spacing,
            hf_cutoff=hf_cutoff,
            device=device,
            figures=figures,
            insert_noise=insert_noise,
        )

    def ablate_seg(
        self,
        datalist: str,
        arms: str = "none,union,gaussian",
        output_dir: str | None = None,
        recon_dir: str | None = None,
        seeds: str = "0,1,2",
        split_seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.3,
        num_samples: int = 2,
        lesion_classes=None,
        n_boot: int = 10000,
        **overrides,
    ) -> None:
        """Train the fvae_aug_seg bundle per arm (none, union, prob, online; controls gaussian, nlm) and seed on one
        train / validation / test split with the same steps and crops per step; score the held-out test split;
        write ablation.csv / .md / .json (Dice, NSD, detection, empty-label counts, paired differences to the first
        arm with bootstrap 95 % CIs over seeds and cases) and print ablation.md. Extra --key value pairs override the
        bundle config. One ablation per output folder at a time; a failed run is listed at the end (exit 1) and a
        rerun reuses the finished runs (--skip_existing false: train them all again)."""
        from pathlib import Path

        from .aug_seg.ablation import ablate_seg

        output_dir = output_dir or overrides.pop("o", None)  # fire leaves -o among the free overrides
        if output_dir is None:
            sys.exit("fvae ablate-seg: give an output folder with -o / --output_dir")
        if "seed" in overrides:
            sys.exit("fvae ablate-seg: training seeds are --seeds (e.g. --seeds 0,1,2); the split's is --split_seed")
        if isinstance(arms, (list, tuple)):
            arms = ",".join(arms)
        with _user_errors("ablate-seg", "finished runs are kept; rerun the same command to resume"):
            ablate_seg(datalist, arms, _path(output_dir), recon_dir, seeds, split_seed, val_fraction, test_fraction,
                       num_samples, lesion_classes, n_boot, **overrides)  # fmt: skip
        print((Path(output_dir) / "ablation.md").read_text(), end="")

    def make_lesion_set(
        self, output_dir: str, n_cases: int = 6, ct: str | None = None, seg: str | None = None, seed: int = 0
    ) -> None:
        """Write a small MSD-style set: a real CT (default: the TotalSegmentator sample) with one synthetic
        lesion per case (labels 1 organ, 2 lesion) and dataset.json. For the CPU ablation demo and tests."""
        from .assets import resolve
        from .aug_seg.lesions import make_lesion_set

        with _user_errors("make-lesion-set"):
            ct = ct or str(resolve("totalseg_ct_sm_3mm", download=True))
            seg = seg or str(resolve("totalseg_ct_sm_3mm_seg", download=True))
            path = make_lesion_set(_path(output_dir), ct, seg, n_cases=n_cases, seed=seed)
        print(path)

    def evaluate_gen(
        self,
        gen_dir: str,
        real_dir: str,
        output_dir: str | None = None,
        masks_dir: str | None = None,
        real_labels_dir: str | None = None,
        segmenter: str | None = None,
        classes=None,
        nsd_tolerance_mm: float | None = None,
    ) -> None:
        """Generated vs. real CT (the fvae_ldm bundle's evaluate.yaml): FVD, organ median HU, mask adherence."""
        if output_dir is None:
            sys.exit("fvae evaluate-gen: give an output folder with --output_dir")
        _run_cli(
            "evaluate-gen",
            "evaluate.yaml",
            bundle="fvae_ldm",
            gen_dir=gen_dir,
            real_dir=real_dir,
            output_dir=output_dir,
            masks_dir=masks_dir,
            real_labels_dir=real_labels_dir,
            segmenter=segmenter,
            classes=classes,
            nsd_tolerance_mm=nsd_tolerance_mm,
        )

    def compare_vaes(
        self,
        input: str,
        vaes: str = "taef2,identity",
        output_dir: str | None = None,
        weights: dict | None = None,
        labels: str | None = None,
        **overrides,
    ) -> None:
        """Reconstruct INPUT with every VAE of --vaes (comma-separated) through the recon bundle, each in a process
        of its own; one table (PSNR, SSIM, MSE, seconds, peak memory of that process, noise ratio, boundary shift,
        edge-width ratio, signed edge offset, HF error) in compare.csv / compare.md. --weights '{"wan2.1":
        "/path/to/diffusers/folder"}' gives weights per VAE; other options go to every `fvae recon` run. Prints the
        table (compare.md). One comparison per output folder at a time; a failed VAE is listed at the end (exit 1)
        and --skip_existing true reuses the VAEs done with the same settings."""
        from .errors import BatchFailure
        from .recon.compare import compare_vaes, markdown_table

        output_dir = output_dir or overrides.pop("o", None)
        if output_dir is None:
            sys.exit("fvae compare-vaes: give an output folder with -o / --output_dir")
        if isinstance(vaes, (list, tuple)):
            vaes = ",".join(vaes)
        with _user_errors("compare-vaes", "finished VAEs are kept; rerun with --skip_existing true to resume"):
            try:
                rows = compare_vaes(_path(input), vaes, _path(output_dir), weights, _path(labels), **overrides)
            except BatchFailure as e:
                done = getattr(e, "rows", None)  # the VAEs that ran (compare_vaes sets it)
                if done:
                    print(markdown_table(done))
                raise
        print(markdown_table(rows))

    def list_vaes(self) -> None:
        """Print every registered VAE: what it is, the weights it needs and where they come from."""
        from .vae import list_vaes

        for v in list_vaes():
            print(
                f"{v['name']}\n  kind:    {v['kind']}\n  weights: {v['weights']}\n  source:  {v['source']}\n"
                f"  licence: {v['licence']}"
            )


def main() -> None:
    import fire

    fire.Fire(CLI, name="fvae")


if __name__ == "__main__":
    main()
