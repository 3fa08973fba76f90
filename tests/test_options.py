"""User strings never reach MONAI's evaluator on the `fvae` route; booleans are parsed strictly; junk files and our
own temporaries are not cases."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import PY, run
from monai.bundle import ConfigParser

from fvae_ct.errors import OptionError
from fvae_ct.options import literal, literal_overrides, parse_bool

NASTY = ["$__import__('os').system('touch MARKER')", "@input", "%configs/x.yaml", "a#b/c#d", "plain", "sp ace", "ü"]


def test_parse_bool_is_strict():
    for v in (True, 1, "true", "True", " yes", "1", "on"):
        assert parse_bool(v) is True, v
    for v in (False, 0, "false", "FALSE", "no", "0", "off"):
        assert parse_bool(v) is False, v
    for v in ("", "maybe", "none", 2, None, "tru"):
        with pytest.raises(OptionError, match="skip_existing: expected true or false"):
            parse_bool(v, "skip_existing")


@pytest.mark.parametrize("s", NASTY)
def test_literal_survives_monai_config_parsing_exactly(s, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = ConfigParser({"input": None, "other": "x", "derived": "$@input + '.out'", "nested": {"a": None}})
    p["input"] = literal(s)
    p["nested"] = literal_overrides({"a": [s]})
    assert p.get_parsed_content("input") == s
    assert p.get_parsed_content("derived") == s + ".out"
    assert p.get_parsed_content("nested") == {"a": [s]}
    assert not (tmp_path / "MARKER").exists()
    # the check can fail: the same string as a plain override is code, a reference or a rewritten path
    if s.startswith("$"):
        p2 = ConfigParser({"input": None})
        p2["input"] = s
        p2.get_parsed_content("input")
        assert (tmp_path / "MARKER").exists()


def _ct(path, value=100):
    img = np.full((8, 9, 5), value, np.int16)
    img[2:6, 3:7, 1:4] = -300
    nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))


def test_fvae_recon_treats_nasty_paths_as_paths(tmp_path):
    """A file named like code, an output folder with @ % #, a numeric folder name: data, never code."""
    name = "$__import__('os').system('touch MARKER').nii.gz"
    _ct(tmp_path / name)
    (tmp_path / "12345").mkdir()
    _ct(tmp_path / "12345" / "ct.nii.gz")
    for inp, out in ((name, "@out%1#2"), ("12345", "num")):
        r = run([PY, "-m", "fvae_ct.cli", "recon", inp, "-o", out, "--vae", "identity", "--figures", "false"],
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not (tmp_path / "MARKER").exists()
    recon = tmp_path / "@out%1#2" / "$__import__('os').system('touch MARKER')_recon.nii.gz"
    assert recon.is_file() and not list((tmp_path / "@out%1#2").glob("*.png"))  # figures false: none
    assert (tmp_path / "num" / "ct_recon.nii.gz").is_file()


def test_skip_existing_false_recomputes_and_junk_is_ignored(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _ct(src / "ct.nii.gz")
    (src / "._ct.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # not a case
    out = tmp_path / "out"
    cmd = [PY, "-m", "fvae_ct.cli", "recon", str(src), "-o", str(out), "--vae", "identity", "--figures", "0"]
    assert run(cmd).returncode == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["case"] for r in rows] == ["ct"] and float(rows[0]["mae_hu"]) == 0.0
    # a stale, wrong reconstruction and a temporary left by an interrupted run
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5), np.int16), np.diag([1.5, 1.5, 2.0, 1.0])), str(out / "ct_recon.nii.gz"))
    tmp_left = out / ".ct_recon.nii.gz.ab12cd34.tmp.nii.gz"
    tmp_left.write_bytes(b"partial")
    r = run([*cmd, "--skip_existing", "false"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert float(rows[0]["mae_hu"]) == 0.0  # recomputed: 'false' did not switch skipping on
    assert not tmp_left.exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["n_failed"] == 0  # the ._ file was no case
    # 'true' skips: the stale file is scored as it is
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5), np.int16), np.diag([1.5, 1.5, 2.0, 1.0])), str(out / "ct_recon.nii.gz"))
    assert run([*cmd, "--skip_existing", "true"]).returncode == 0
    assert float(list(csv.DictReader(open(out / "metrics.csv")))[0]["mae_hu"]) > 50
    r = run([*cmd, "--skip_existing", "maybe"])
    assert r.returncode != 0 and "skip_existing: expected true or false" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hu_window", "[1000,-1000]"], "hu_window [1000, -1000]: give [low, high] in HU with low < high"),
        (["--slice_batch", "0"], "slice_batch must be >= 1, got 0"),
        (["--working_spacing", "-1"], "working_spacing -1: give a positive in-plane spacing"),
        (["--device", "cuda"], "device cuda: no CUDA GPU is available here"),
        (["--vae", "taef2", "--vae_dtype", "float16"], "vae_dtype torch.float16: taef2 runs in float32, or bfloat16"),
        (["--vae_dtype", "float99"], "vae_dtype 'float99': not a torch dtype"),
        (["-o", "FILE"], "exists and is a file, not a folder"),
        (["-o", "FILE/sub"], "a part of the path is a file, not a folder"),
    ],
)
def test_bad_options_give_one_line_and_a_non_zero_exit(args, message, tmp_path):
    if "--device" in args:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    _ct(tmp_path / "ct.nii.gz")
    (tmp_path / "FILE").write_text("a regular file")
    out = [] if "-o" in args else ["-o", "out"]
    vae = [] if "--vae" in args else ["--vae", "identity"]
    r = run([PY, "-m", "fvae_ct.cli", "recon", "ct.nii.gz", *out, *vae, *args], cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr[-1500:]
    assert (tmp_path / "FILE").read_text() == "a regular file"


@pytest.mark.parametrize("content", [b"not gzip at all", b"\x1f\x8b\x08\x00truncated gzip"])
def test_corrupt_nifti_is_one_line_naming_the_file(content, tmp_path):
    from fvae_ct.errors import InputError
    from fvae_ct.io import load_ct

    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_ct(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: cannot read the image") and "\n" not in msg and len(msg) < 500, msg
    assert "Traceback" not in msg and "registered" not in msg  # not MONAI's list of every reader's failure
