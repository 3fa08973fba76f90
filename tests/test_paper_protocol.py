"""The paper-protocol preset (bundles/fvae_recon/configs/paper.yaml) against a re-implementation of the paper's
reconstruction procedure, on a real CT crop with a tiny random Wan 2.1 (the real diffusers class)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from conftest import ROOT
from diffusers import AutoencoderKLWan
from monai.bundle import ConfigParser

from fvae_ct.tiling import TilingConfig, padded_depth_apply
from fvae_ct.vae import load

CONF = ROOT / "bundles" / "fvae_recon" / "configs"


def test_padded_depth_windows_restart_and_pad_the_last():
    seen = []

    def fn(v):
        seen.append(v[0, 0, :, 0, 0].tolist())
        return v * 2

    x = torch.arange(7.0).view(1, 1, 7, 1, 1).expand(1, 1, 7, 2, 2)
    y = padded_depth_apply(fn, x, 3)
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]  # from slice 0, the last window padded with its last slice
    assert torch.equal(y, 2 * x)


def _paper_script(vol: np.ndarray, affine: np.ndarray, vae) -> np.ndarray:
    """The paper's procedure written out: slices in the file's voxel order, HU [-1000, 1000] -> [-1, 1],
    non-overlapping 65-slice windows each run on its own, the last padded with its last slice, back to HU by
    truncation (astype(int16))."""
    ax = int(np.argmax(np.abs(affine[:3, :3])[2]))  # the axis that runs along the patient's z
    frames = np.moveaxis(vol.astype(np.float32), ax, 0)  # [Z, a, b], in-plane axes in file order
    x = torch.from_numpy((np.clip(frames, -1000, 1000) + 1000) / 2000 * 2 - 1)[None, None]
    out = []
    for a in range(0, x.shape[2], 65):
        chunk = x[:, :, a : a + 65]
        n = chunk.shape[2]
        if n < 65:
            chunk = torch.cat([chunk, chunk[:, :, -1:].repeat(1, 1, 65 - n, 1, 1)], dim=2)
        out.append(vae.reconstruct(chunk, tiling=TilingConfig())[:, :, :n])
    y = torch.cat(out, dim=2)[0, 0]
    hu = (((y + 1) / 2).clamp(0, 1) * 2000 - 1000).numpy().astype(np.int16)  # truncation toward zero
    return np.moveaxis(hu, 0, ax)


def test_paper_preset_is_the_papers_procedure(assets, tmp_path):
    src = nib.load(str(assets / "ct" / "chest_ct_1p5mm.nii.gz"))
    vol = np.asarray(src.dataobj).astype(np.int16)[20:68, 30:78, :70]  # 70 slices: a 65-slice window and 5 padded
    nib.save(nib.Nifti1Image(vol, src.affine), str(tmp_path / "ct.nii.gz"))
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "wan")

    def run(configs, out):
        p = ConfigParser()
        p.read_config([str(CONF / c) for c in configs])
        p.update({"input": str(tmp_path / "ct.nii.gz"), "output_dir": str(tmp_path / out), "vae": "wan2.1",
                  "vae_weights": str(tmp_path / "wan"), "figures": False, "device": "cpu"})
        summary = p.get_parsed_content("workflow").run(str(tmp_path / "ct.nii.gz"))
        return np.asarray(nib.load(str(tmp_path / out / "ct_recon.nii.gz")).dataobj), summary

    paper, s = run(["inference.yaml", "paper.yaml"], "paper")
    assert s["tiling"]["depth_window"] == 65 and s["tiling"]["depth_last"] == "pad"
    assert s["slice_orientation"] == "file" and s["hu_rounding"] == "truncate"
    expected = _paper_script(vol, src.affine, load("wan2.1", weights=str(tmp_path / "wan")))
    assert np.array_equal(paper, expected)
    ours, _ = run(["inference.yaml"], "ours")
    # our default differs: upright slices, one pass over the 70 slices, rounding (a case that could have failed)
    assert (ours != paper).mean() > 0.5
