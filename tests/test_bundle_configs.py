"""Configs a model-zoo maintainer would accept : every list that ``python -m monai.bundle run
<id>`` can run starts with the command-line guard, in every config and in every overlay combination the READMEs
use."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT
from monai.bundle import ConfigParser

GUARD = "$fvae_ct.bundle.check_command_line()"
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs").is_dir())


def _readme_combinations(bundle: str) -> set[tuple[str, ...]]:
    """Every ``--config_file`` of the bundle's README: one file or a list of overlays, in the README's order."""
    text = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
    out = set()
    for m in re.finditer(r"--config_file[ =](\"\[[^\]]*\]\"|'\[[^\]]*\]'|\S+)", text):
        v = m.group(1)
        names = re.findall(r"configs/([\w.]+\.yaml)", v)
        if names:
            out.add(tuple(names))
    return out


def _combinations():
    for b in BUNDLES:
        singles = {(p.name,) for p in (ROOT / "bundles" / b / "configs").glob("*.yaml")}
        readme = _readme_combinations(b)
        assert readme, f"{b}: no --config_file found in its README"
        for combo in sorted(singles | readme):
            yield b, combo


def _merged(folder, configs) -> dict:
    """The configs layered as MONAI layers them (a later file's ``a#b`` key patches ``a``); an overlay on its own
    patches nothing that is not there."""
    parser = ConfigParser(config={})
    for c in configs:
        for k, v in yaml.safe_load((folder / c).read_text()).items():
            top = re.split("#|::", k)[0]
            if top != k and top not in parser.config:
                continue
            parser[k] = v
    return parser.config


def _run_lists(config: dict) -> dict[str, list]:
    """Top-level sections MONAI may run as ``run <id>`` (``initialize``, ``run``, ``prepare``, ...): lists of
    expressions. ``imports`` is not run; a ``finalize`` that reads no config entry (``@``) evaluates no override."""
    out = {}
    for k, v in config.items():
        if k == "imports" or not isinstance(v, list) or not v:
            continue
        if not all(isinstance(x, str) and x.startswith("$") for x in v):
            continue
        if k == "finalize" and not any("@" in x for x in v):
            continue
        out[k] = v
    return out


@pytest.mark.parametrize("bundle,configs", list(_combinations()), ids=lambda x: x if isinstance(x, str) else "+".join(x))
def test_every_run_list_starts_with_the_guard(bundle, configs):
    folder = ROOT / "bundles" / bundle / "configs"
    for c in configs:
        assert (folder / c).is_file(), f"{bundle} README names configs/{c}, which does not exist"
    lists = _run_lists(_merged(folder, configs))
    if len(configs) == 1 and "run" not in yaml.safe_load((folder / configs[0]).read_text()):
        return  # an overlay on its own (paper.yaml): its base config's lists are checked with it
    assert "run" in lists, f"{bundle} {configs}: no run list"
    bad = {k: v[0] for k, v in lists.items() if v[0] != GUARD}
    assert not bad, f"{bundle} {configs}: these lists do not start with {GUARD}: {bad}"


def test_the_rule_catches_a_missing_guard():
    """The check can fail: a ``prepare`` without the guard (as aug_seg train.yaml had) is found."""
    lists = _run_lists({"imports": ["$import os"], "prepare": ["$@x.run()"], "run": [GUARD, "$@y"]})
    assert {k: v[0] for k, v in lists.items() if v[0] != GUARD} == {"prepare": "$@x.run()"}
    assert "finalize" not in _run_lists({"finalize": ["$fvae_ct.distributed.destroy()"]})
    assert "finalize" in _run_lists({"finalize": ["$@writer.close()"]})


# ---- user strings: inert for MONAI, readable in its run log ---------------------------------------------------
STRINGS = ["/data/ct 1/case.nii.gz", "$__import__('os').system('touch MARKER')", "@input", "%configs#x", "a#b/c",
           "x@::y", "x%::y", "quote ' and \" and \\\\ back", "line\nbreak", "ü €", "bad\udcffbyte", "", "12345"]


def test_literal_leaves_plain_strings_alone_and_escapes_the_others(tmp_path, monkeypatch):
    from fvae_ct.options import literal

    monkeypatch.chdir(tmp_path)
    assert literal("/data/ct 1/case.nii.gz") == "/data/ct 1/case.nii.gz"  # nothing MONAI acts on: as given
    assert literal("12345") == "12345" and literal("") == ""
    for s in STRINGS:
        v = literal(s)
        assert v == s or (v.startswith("$'") and not any(c in v[1:] for c in "@%#")), (s, v)
        p = ConfigParser({"input": v, "derived": "$@input + '.out'", "nested": {"a": [v]}})
        assert p.get_parsed_content("input") == s and p.get_parsed_content("derived") == s + ".out", s
        assert p.get_parsed_content("nested") == {"a": [s]}
    assert literal("$__import__('os')") == "$'$__import__(\\x27os\\x27)'"  # readable, yet only a string literal
    assert literal("runs/a#b") == "$'runs/a\\x23b'"
    assert not (tmp_path / "MARKER").exists()


def test_the_run_log_shows_a_path_override_as_written(tmp_path):
    """MONAI logs every override (``> input: ...``): a path is shown as the path, not hex-encoded."""
    from pprint import pformat

    import nibabel as nib
    import numpy as np
    from conftest import PY, run

    src = tmp_path / "in_put"  # no blank: pprint would wrap a long string at blanks
    src.mkdir()
    img = np.full((8, 9, 5), 100, np.int16)
    nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 2.0, 1.0])), str(src / "ct.nii.gz"))
    inp, out = str(src / "ct.nii.gz"), str(tmp_path / "out#1")
    code = ("import sys; from fvae_ct.bundle import run_bundle; "
            "run_bundle('fvae_recon', input=sys.argv[1], output_dir=sys.argv[2], vae='identity', figures=False)")
    r = run([PY, "-c", code, inp, out], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    assert f"> input: {pformat(inp, width=1000)}" in log, log[-3000:]
    assert "fromhex" not in log
    assert "> output_dir: " in log and "out\\\\x231" in log  # '#' escaped, the rest as written
    assert (tmp_path / "out#1" / "ct_recon.nii.gz").is_file()


# ---- the LDM: the architecture travels in the checkpoint ------------------------------------------------------
TINY = {"unet_channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
        "norm_num_groups": 8, "consistency_levels": [0, 1]}
STATS = {"latent_channels": 2, "mask_channels": 1, "text_dim": None, "scale_factor": 1.0}


def _ldm_checkpoint(tmp_path, stage, **options):
    """A train.yaml checkpoint (as its CheckpointSaver writes it) of the network train.yaml builds with ``options``."""
    import json

    import torch

    (tmp_path / "latents").mkdir(exist_ok=True)
    (tmp_path / "latents" / "latent_stats.json").write_text(json.dumps(STATS))
    p = ConfigParser()
    p.read_config(str(ROOT / "bundles" / "fvae_ldm" / "configs" / "train.yaml"))
    p.update({"bundle_root": str(tmp_path), "stage": stage, "device": "cpu", **options})
    net = p.get_parsed_content("network")
    saver = next(h for h in p["train"]["handlers"] if isinstance(h, dict) and h["_target_"] == "CheckpointSaver")
    assert saver["save_dict"]["record"] == "@training_record"
    rec = p.get_parsed_content("training_record")
    ckpt = {"model": (net.unet if stage == "2d" else net).state_dict(), "record": rec.state_dict()}
    (tmp_path / "models").mkdir(exist_ok=True)
    torch.save(ckpt, tmp_path / "models" / f"model_{stage}.pt")
    return net, ckpt


def _inference(tmp_path, **options):
    p = ConfigParser()
    p.read_config(str(ROOT / "bundles" / "fvae_ldm" / "configs" / "inference.yaml"))
    p.update({"bundle_root": str(tmp_path), "device": "cpu", **options})
    return p


def test_ldm_inference_builds_the_recorded_network(tmp_path):
    import torch

    from fvae_ct.errors import OptionError

    net3, ckpt = _ldm_checkpoint(tmp_path, "3d", consistency="conv", **TINY)
    arch = ckpt["record"]["architecture"]
    assert arch["channels"] == [8, 16] and arch["mode"] == "conv" and arch["levels"] == [0, 1]
    assert arch["prior_skip"] is True and arch["attention_levels"] == [False, True]
    # inference.yaml with no architecture option: the same network, the trained weights load
    net = _inference(tmp_path).get_parsed_content("network")
    assert type(net) is type(net3) and net.mode == "conv"
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in net3.state_dict().items()}
    assert all(torch.equal(v, net3.state_dict()[k]) for k, v in net.state_dict().items())
    assert _inference(tmp_path).get_parsed_content("workflow#multiple") == 2
    # the same options given again agree; a different one is refused in one line naming it
    _inference(tmp_path, unet_channels=[8, 16], consistency="conv").get_parsed_content("network_def")
    with pytest.raises(RuntimeError) as e:  # MONAI wraps it (the bundle route shows the OptionError's line alone)
        _inference(tmp_path, unet_channels=[16, 32], consistency="attention").get_parsed_content("network_def")
    assert isinstance(e.value.__cause__, OptionError)
    assert re.search(r"unet_channels \[16, 32\] differs from the trained \[8, 16\]; "
                     r"consistency 'attention' differs from the trained 'conv'", str(e.value.__cause__))
    # a stage-2d checkpoint has no 3D blocks: the consistency options do not apply there
    _ldm_checkpoint(tmp_path, "2d", **TINY)
    _inference(tmp_path, stage="2d", consistency="attention").get_parsed_content("network")


def test_ldm_checkpoints_without_the_record_use_the_options():
    """Older checkpoints (no architecture recorded): the given options, else build_denoiser's defaults."""
    from fvae_ct.ldm import recorded_architecture

    old = {"record": {"prior_skip": True}}
    a = recorded_architecture(old, STATS, "3d", unet_channels=[8, 16], consistency=None)
    assert a["channels"] == [8, 16] and a["mode"] == "attention" and a["prior_skip"] is True
    assert a["latent_channels"] == 2 and a["mask_channels"] == 1 and a["text_dim"] is None
    assert recorded_architecture(None, STATS, "2d")["mode"] == "none"
    assert recorded_architecture(None, STATS, "2d")["channels"] == [64, 128, 256]


def test_ldm_multi_gpu_overlay_patches_what_the_checkpoint_saves_by_id():
    """The overlay sets the saved network through its ID, not a handler's list position; every handler is a dict,
    as MONAI's check_properties reads train#handlers."""
    text = (ROOT / "bundles" / "fvae_ldm" / "configs" / "multi_gpu_train.yaml").read_text()
    assert re.search(r"^saved_network:", text, re.M) and not re.search(r"handlers#\d", text)
    train = yaml.safe_load((ROOT / "bundles" / "fvae_ldm" / "configs" / "train.yaml").read_text())
    assert all(isinstance(h, dict) and "_target_" in h for h in train["train"]["handlers"])
    saver = [h for h in train["train"]["handlers"] if h["_target_"] == "CheckpointSaver"]
    assert len(saver) == 1 and saver[0]["save_dict"]["model"] == "@saved_network"
