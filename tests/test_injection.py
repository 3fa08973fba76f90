"""No user string reaches MONAI's config evaluator on any bundle: file names on the
``python -m monai.bundle run`` route are refused before MONAI evaluates them, and paths and report text inside
datalists are data on every bundle."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import PY, ROOT, run
from monai.bundle import ConfigParser

from fvae_ct.bundle import check_command_line
from fvae_ct.errors import OptionError

CODE = "$__import__('os').system('touch MARKER')"
BUNDLE_ARGV0 = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"
PREFIXED = [CODE, "@input", "%configs#x"]  # code, a reference, a macro


def _ct(path, value=100, shape=(8, 9, 5)):
    img = np.full(shape, value, np.int16)
    img[2:6, 3:7, 1:4] = -300
    nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return img


def _argv(*args):
    return [BUNDLE_ARGV0, "run", "--config_file", "configs/inference.yaml", *args]


def test_guard_refuses_file_names_and_text_that_monai_would_evaluate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for stem in PREFIXED:
        (tmp_path / f"{stem}.nii.gz").write_bytes(b"x")
        for argv in (_argv("--input", f"{stem}.nii.gz"), _argv(f"--input={stem}.nii.gz")):
            with pytest.raises(OptionError, match=r"--input .* is a file, but MONAI would have it"):
                check_command_line(argv)
        if "#" not in stem:
            check_command_line(_argv("--input", f"./{stem}.nii.gz"))  # the way round it that the message gives
    (tmp_path / "$d").mkdir()
    with pytest.raises(OptionError, match=r"--output_dir '\$d' is a folder, .* run as Python: pass it as \./\$d"):
        check_command_line(_argv("--output_dir", "$d"))
    # '#' is rewritten by MONAI in any plain string (paths and text alike)
    with pytest.raises(OptionError, match=r"--output_dir 'out#1'.*it would read 'out::1'"):
        check_command_line(_argv("--output_dir", "out#1"))
    with pytest.raises(OptionError, match=r"--report 'lesion #2'"):
        check_command_line(_argv("--report", "lesion #2"))
    # report text is never config syntax, whether or not such a file exists
    for text in PREFIXED:
        with pytest.raises(OptionError, match=r"--report .* is text, .*put it in a \.txt file"):
            check_command_line(_argv("--report", text))
    # several problems: all named in one message
    with pytest.raises(OptionError, match=r"--input .*; --output_dir 'a#b'"):
        check_command_line(_argv("--input", f"{CODE}.nii.gz", "--output_dir", "a#b"))
    # the user's own config expressions (not file names) and ordinary values pass
    check_command_line(
        _argv(
            "--input",
            "$@dataset_dir + '/ct.nii.gz'",
            "--output_dir",
            "@bundle_root",
            "--hu_window",
            "[-1000,1000]",
            "--skip_existing",
            "false",
            "--report",
            "Liver normal.",
        )
    )
    # the runner's own options are not overrides; other programs' argv are not checked
    check_command_line(_argv("--config_file", "a#b.yaml", "--bundle_root", "x#y"))
    check_command_line(["/usr/bin/fvae", "recon", f"{CODE}.nii.gz", "-o", "a#b"])
    assert not (tmp_path / "MARKER").exists()


def _configs_with_run():
    return sorted(p for p in (ROOT / "bundles").glob("*/configs/*.yaml") if "run" in yaml.safe_load(p.read_text()))


def test_every_bundle_run_checks_the_command_line_first():
    """MONAI resolves ``run`` in list order, so the guard runs before any override is evaluated."""
    files = _configs_with_run()
    assert len(files) == 14  # the multi-GPU overlays and the nnU-Net overlay included
    for p in files:
        assert yaml.safe_load(p.read_text())["run"][0] == "$fvae_ct.bundle.check_command_line()", p


@pytest.mark.parametrize(
    "bundle,config,args",
    [
        ("fvae_recon", "inference.yaml", ["--input", f"{CODE}.nii.gz", "--vae", "identity"]),
        ("fvae_aug_seg", "train.yaml", ["--datalist", f"{CODE}.json"]),
        ("fvae_ldm", "prepare.yaml", ["--datalist", "@datalist.json", "--vae", "identity"]),
        ("fvae_ldm", "inference.yaml", ["--report", CODE]),
    ],
)
def test_bundle_route_never_runs_a_file_name(bundle, config, args, tmp_path):
    """The real ``python -m monai.bundle run``: the file exists, MONAI would evaluate its name; it is refused
    before anything runs (without the guard MONAI would create MARKER)."""
    _ct(tmp_path / f"{CODE}.nii.gz")
    for name in (f"{CODE}.json", "@datalist.json"):
        (tmp_path / name).write_text(json.dumps([{"image": f"{CODE}.nii.gz", "label": f"{CODE}.nii.gz"}]))
    conf = ROOT / "bundles" / bundle / "configs" / config
    r = run(
        [PY, "-m", "monai.bundle", "run", "--config_file", str(conf), *args, "--bundle_root", str(tmp_path)],
        cwd=tmp_path,
    )
    assert not (tmp_path / "MARKER").exists()
    assert r.returncode != 0
    assert "OptionError: python -m monai.bundle run: --" in r.stderr, r.stderr[-2000:]


NAMES = [CODE, "@input", "%configs#x", "a#b", "sp ace"]


def test_recon_datalist_entries_are_paths(tmp_path):
    """A datalist handed over on the bundle route: its entries are file names, never config."""
    src = tmp_path / "data"
    src.mkdir()
    imgs = {n: _ct(src / f"{n}.nii.gz", value=10 * i) for i, n in enumerate(NAMES)}
    (src / "list.json").write_text(json.dumps([{"image": f"{n}.nii.gz"} for n in NAMES]))
    conf = ROOT / "bundles" / "fvae_recon" / "configs" / "inference.yaml"
    r = run(
        [
            PY,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(conf),
            "--input",
            "data/list.json",
            "--output_dir",
            "out",
            "--vae",
            "identity",
            "--figures",
            "false",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "MARKER").exists()
    for n, img in imgs.items():  # identity VAE: each output is its own input, so no file was mixed up
        out = np.asarray(nib.load(str(tmp_path / "out" / f"{n}_recon.nii.gz")).dataobj)
        assert np.array_equal(out, img), n


def test_seg_datalist_entries_are_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = []
    for i, n in enumerate(NAMES):
        img = _ct(tmp_path / f"{n}.nii.gz", value=10 * i, shape=(16, 16, 8))
        nib.save(
            nib.Nifti1Image((img < 0).astype(np.uint8), np.diag([1.5, 1.5, 2.0, 1.0])),
            str(tmp_path / f"{n}_seg.nii.gz"),
        )
        items.append({"image": f"{n}.nii.gz", "label": f"{n}_seg.nii.gz"})
    (tmp_path / "list.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    p = ConfigParser()
    p.read_config(str(ROOT / "bundles" / "fvae_aug_seg" / "configs" / "train.yaml"))
    p.update(
        {
            "datalist": str(tmp_path / "list.json"),
            "bundle_root": str(tmp_path),
            "patch_size": [16, 16, 8],
            "num_samples": 1,
            "train#aug_transforms": [],
        }
    )
    dl = p.get_parsed_content("datalists")
    assert [d["image"] for d in dl["train"]] == [str(tmp_path / f"{n}.nii.gz") for n in NAMES]
    pre = p.get_parsed_content("train#preprocessing")
    for i, d in enumerate(dl["train"]):  # each item loads its own file (values 0, 10, 20, ... before scaling)
        out = pre(d)
        out = out[0] if isinstance(out, list) else out
        assert out["label"].sum() > 0 and len(np.unique(out["image"].numpy())) == 2, NAMES[i]
    assert not (tmp_path / "MARKER").exists()


def test_ldm_datalist_reports_are_text(tmp_path, monkeypatch):
    """Report strings of the LDM datalist are embedded as written (the cached text embedding equals the
    encoder's embedding of the literal string)."""
    from fvae_ct.ldm.diffusion import FrozenTextEncoder

    monkeypatch.chdir(tmp_path)
    reports = [CODE, "@report", "%configs#x", "Lesion #2 in segment 4."]
    items = []
    for i, rep in enumerate(reports):
        img = _ct(tmp_path / f"c{i}.nii.gz", shape=(16, 16, 4))
        nib.save(
            nib.Nifti1Image((img < 0).astype(np.uint8), np.diag([1.5, 1.5, 2.0, 1.0])),
            str(tmp_path / f"c{i}_seg.nii.gz"),
        )
        items.append({"image": f"c{i}.nii.gz", "label": f"c{i}_seg.nii.gz", "report": rep})
    (tmp_path / "datalist.json").write_text(json.dumps(items))
    p = ConfigParser()
    p.read_config(str(ROOT / "bundles" / "fvae_ldm" / "configs" / "prepare.yaml"))
    p.update({"bundle_root": str(tmp_path), "vae": "identity", "mask_classes": [1], "device": "cpu"})
    p.get_parsed_content("run")
    assert not (tmp_path / "MARKER").exists()
    import torch

    enc = FrozenTextEncoder(None)
    for i, rep in enumerate(reports):
        cached = torch.load(tmp_path / "latents" / f"c{i}.pt", weights_only=True)
        t, m = enc.encode([rep])
        assert torch.allclose(cached["text"], t[0], atol=1e-6) and torch.equal(cached["text_mask"], m[0]), rep
    # the check can fail: MONAI's rewriting of '#' would have changed the embedding
    c3, rewritten = (
        torch.load(tmp_path / "latents" / "c3.pt", weights_only=True)["text"],
        enc.encode(["Lesion ::2 in segment 4."])[0][0],
    )
    assert c3.shape != rewritten.shape or not torch.allclose(c3, rewritten, atol=1e-3)
