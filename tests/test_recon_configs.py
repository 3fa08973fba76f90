"""The fvae_recon configs build their workflow from the properties MONAI checks: the evaluator is the workflow, which
runs the ``dataset`` (data ``datalist``, transform ``preprocessing``) through ``inferer`` and ``network_def``; the
options of the preprocessing are one-line OptionErrors (checked by the transform that takes each)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from monai.bundle import ConfigParser

from fvae_ct.errors import OptionError
from fvae_ct.recon import ReconWorkflow, recon_chain
from fvae_ct.recon.preprocessing import chain_settings
from fvae_ct.vae import IdentityVAE

CONF = ROOT / "bundles" / "fvae_recon" / "configs"
AFF = np.diag([1.5, 1.5, 2.0, 1.0])


def _cts(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        v = rng.normal(30, 20, (10, 12, 4)).astype(np.int16)
        v[:2] = -1000
        nib.save(nib.Nifti1Image(v, AFF), str(folder / f"c{i}.nii.gz"))
    return folder


def _parser(configs, **overrides):
    p = ConfigParser()
    p.read_config([str(CONF / c) for c in configs])
    p.update({"vae": "identity", "figures": False, "device": "cpu", **overrides})
    return p


def test_the_workflow_is_built_from_the_checked_properties(tmp_path):
    src, out = _cts(tmp_path / "in"), tmp_path / "out"
    p = _parser(["inference.yaml"], input=str(src), output_dir=str(out), working_spacing=1.0, hu_window=[-500, 700])
    wf, dataset, pre = (p.get_parsed_content(k) for k in ("evaluator", "dataset", "preprocessing"))
    assert wf is p.get_parsed_content("workflow") and isinstance(wf, ReconWorkflow)
    assert wf.dataset is dataset and dataset.transform is pre and wf.preprocessing is pre
    assert wf.network is p.get_parsed_content("network_def") and wf.inferer is p.get_parsed_content("inferer")
    assert dataset.data == p.get_parsed_content("datalist") == [
        {"image": str(src / "c0.nii.gz"), "case": "c0"},
        {"image": str(src / "c1.nii.gz"), "case": "c1"},
    ]
    assert (wf.hu_window, wf.working_spacing, wf.arithmetic) == ((-500.0, 700.0), 1.0, "ours")
    item = dataset[0]["image"]  # a dataset item is the preprocessed volume: [1, D, H, W] in the VAE's range
    assert tuple(item.shape) == (1, 4, 18, 15) and float(item.min()) >= 0.0 and float(item.max()) <= 1.0
    summary = wf.run()  # the run list's $@evaluator.run(): the dataset's cases
    assert [c["case"] for c in summary["cases"]] == ["c0", "c1"] and summary["working_spacing_mm"] == 1.0
    assert summary["hu_window"] == [-500.0, 700.0] and summary["arithmetic"] == "ours"
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["mae_hu"]["mean"] > 0  # resampled to 1 mm and back: not the identity any more
    # our own outputs in the output folder are not cases of a rerun into the input folder
    p = _parser(["inference.yaml"], input=str(src), output_dir=str(src))
    p.get_parsed_content("evaluator").run()
    again = _parser(["inference.yaml"], input=str(src), output_dir=str(src)).get_parsed_content("datalist")
    assert [d["case"] for d in again] == ["c0", "c1"]


def test_analysis_is_the_evaluator_of_the_analysis_overlay(tmp_path):
    src = _cts(tmp_path / "in", 1)
    p = _parser(["inference.yaml", "analysis.yaml"], input=str(src / "c0.nii.gz"), output_dir=str(tmp_path / "out"),
                methods=["vae", "median3"], insert_noise=[])
    a = p.get_parsed_content("evaluator")
    assert a is p.get_parsed_content("analysis") and a.recon is p.get_parsed_content("workflow")
    rows = a.run()
    assert [r["method"] for r in rows] == ["vae:identity", "median3"] and rows[0]["psnr"] == float("inf")


def test_the_run_lists_call_the_evaluator_without_arguments():
    import yaml

    for name in ("inference.yaml", "analysis.yaml", "multi_gpu_inference.yaml"):
        run = yaml.safe_load((CONF / name).read_text())["run"]
        assert run[0] == "$fvae_ct.bundle.check_command_line()" and run[-1] == "$@evaluator.run()", name


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hu_window": [1000, -1000]}, r"^hu_window \[1000, -1000\]: give \[low, high\] in HU with low < high"),
        ({"hu_window": "wide"}, r"^hu_window 'wide': give \[low, high\] in HU with low < high"),
        ({"hu_window": [0, 1, 2]}, r"^hu_window \[0, 1, 2\]: give \[low, high\]"),
        ({"working_spacing": "abc"}, r"^working_spacing 'abc': give a positive in-plane spacing in mm, or none$"),
        ({"working_spacing": 0}, r"^working_spacing 0: give a positive in-plane spacing"),
        ({"slice_orientation": "sagittal"}, r"^slice_orientation 'sagittal': give one of display, file$"),
        ({"hu_rounding": "floor"}, r"^hu_rounding 'floor': give one of round, truncate$"),
        ({"arithmetic": "exact"}, r"^arithmetic 'exact': give one of ours, script$"),
    ],
)
def test_bad_preprocessing_options_are_one_line_option_errors(options, message):
    with pytest.raises(OptionError, match=message):
        recon_chain(**options)


def test_chain_settings_read_back_what_the_chain_was_built_from():
    s = chain_settings(recon_chain((-160, 240), (-1, 1), "0.8", "file", "truncate"))
    assert s == {"hu_window": (-160.0, 240.0), "input_range": (-1.0, 1.0), "hu_rounding": "truncate",
                 "arithmetic": "ours", "working_spacing": 0.8, "slice_orientation": "file"}
    s = chain_settings(recon_chain(input_range=(-1, 1), arithmetic="script"))
    assert s["arithmetic"] == "script" and s["hu_window"] == (-1000.0, 1000.0) and s["working_spacing"] is None


def test_a_workflow_takes_its_settings_from_one_place(tmp_path):
    net = IdentityVAE()
    pre = recon_chain((-200, 300), net.input_range, hu_rounding="truncate")
    wf = ReconWorkflow(net, str(tmp_path), preprocessing=pre, progress=False)
    assert wf.hu_window == (-200.0, 300.0) and wf.hu_rounding == "truncate" and wf.preprocessing is pre
    with pytest.raises(ValueError, match=r"\['hu_window'\]: set them in the preprocessing"):
        ReconWorkflow(net, str(tmp_path), hu_window=(-1000, 1000), preprocessing=pre)
    with pytest.raises(OptionError, match=r"^preprocessing: it maps HU to \[-1.0, 1.0\], identity takes \[0.0, 1.0\]"):
        ReconWorkflow(net, str(tmp_path), preprocessing=recon_chain(input_range=(-1, 1)))
    with pytest.raises(ValueError, match=r"give the input, or build the workflow with a dataset"):
        ReconWorkflow(net, str(tmp_path), progress=False).run()
