"""The segmentation ablation on the one batch runner: one ablation per folder, a failed run listed and the others
kept, a rerun that runs only what is missing; the table's values; the command's one-line errors. Training and
inference are replaced by a stand-in that writes known predictions (the real bundle runs: tests/test_seg.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvae_ct.aug_seg import ablation
from fvae_ct.errors import BatchFailure, InputError, OptionError
from fvae_ct.io import folder_lock

AFF = np.diag([1.5, 1.5, 3.0, 1.0])


def _save(path, data) -> str:
    nib.save(nib.Nifti1Image(data, AFF), str(path))
    return str(path)


@pytest.fixture
def datalist(tmp_path) -> str:
    """Six cases (24 x 20 x 8 voxels): an organ (1) holding a lesion (2); an MSD dict with relative paths."""
    d = tmp_path / "data"
    d.mkdir()
    items = []
    for i in range(6):
        seg = np.zeros((24, 20, 8), np.int16)
        seg[6:16, 5:15, 2:6] = 1
        seg[9 + i % 3 : 12 + i % 3, 8:11, 3:5] = 2
        ct = np.random.default_rng(i).normal(40, 30, seg.shape).astype(np.int16)
        _save(d / f"c{i}.nii.gz", ct)
        _save(d / f"c{i}_seg.nii.gz", seg)
        items.append({"image": f"c{i}.nii.gz", "label": f"c{i}_seg.nii.gz"})
    (d / "dataset.json").write_text(json.dumps({"training": items}))
    return str(d / "dataset.json")


class _Made(list):
    fail: set


@pytest.fixture
def fake_runs(monkeypatch, datalist):
    """Stand-in training + inference: arm ``none`` predicts the label exactly, ``online`` misses the lesion (class 2);
    ``fail`` holds run names to fail once. Returns the list of runs made (``<arm>/seed<k>``)."""
    made, fail = _Made(), set()
    labels = {Path(datalist).parent / f"c{i}.nii.gz": Path(datalist).parent / f"c{i}_seg.nii.gz" for i in range(6)}

    def train_and_segment(run_root, trainval, test_dir, overrides, infer):
        name = f"{run_root.parent.name}/{run_root.name}"
        made.append(name)
        assert overrides["seed"] == int(run_root.name[4:]) and json.loads(Path(trainval).read_text())["training"]
        if name in fail:
            fail.discard(name)
            raise RuntimeError("boom")
        pred_dir = run_root / "test_pred"
        pred_dir.mkdir(parents=True, exist_ok=True)
        for img in Path(test_dir).iterdir():
            lab = np.asarray(nib.load(str(labels[Path(img.readlink())])).dataobj)
            if overrides["recon_mode"] == "online":
                lab = np.where(lab == 2, 1, lab).astype(np.int16)
            _save(pred_dir / img.name.replace(".nii.gz", "_seg.nii.gz"), lab)
        return pred_dir

    monkeypatch.setattr(ablation, "_train_and_segment", train_and_segment)
    made.fail = fail
    return made


def _ablate(datalist, out, **kw):
    args = dict(arms="none,online", output_dir=str(out), seeds="0,1", val_fraction=0.2, test_fraction=0.34,
                n_boot=200, max_epochs=3)  # fmt: skip
    return ablation.ablate_seg(datalist, **{**args, **kw})


def test_a_failed_run_is_listed_the_others_kept_and_a_rerun_runs_only_it(datalist, fake_runs, tmp_path):
    out = tmp_path / "abl"
    fake_runs.fail.add("online/seed1")
    with pytest.raises(BatchFailure) as e:
        _ablate(datalist, out)
    msg = str(e.value)
    assert msg.startswith("1 of 4 case(s) failed; no table: rerun the same command")
    assert f"online/seed1 ({out / 'online' / 'seed1'}): RuntimeError: boom" in msg
    assert fake_runs == ["none/seed0", "none/seed1", "online/seed0", "online/seed1"]
    with open(out / "per_case.csv") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == 3 * 2 and {(r["arm"], r["seed"]) for r in kept} == {("none", "0"), ("none", "1"), ("online", "0")}
    assert not (out / "ablation.csv").exists() and not (out / ".fvae.lock").exists()
    # the rerun trains only the failed run; the table has every arm and seed
    fake_runs.clear()
    table = _ablate(datalist, out)
    assert fake_runs == ["online/seed1"]
    rows = {r["arm"]: r for r in table}
    assert rows["none"]["dice"] == 1.0 and rows["none"]["nsd"] == 1.0 and rows["none"]["dice_diff"] == 0.0
    # online misses every lesion: class 2 scores 0, class 1 (organ + lesion predicted as organ) is below 1
    assert rows["online"]["dice_2"] == 0.0 and rows["online"]["sensitivity_2"] == 0.0 and rows["online"]["nsd_2"] == 0
    assert 0.5 < rows["online"]["dice_1"] < 1.0
    assert rows["online"]["dice_diff"] == pytest.approx((rows["online"]["dice_1"] + 0.0) / 2 - 1.0)
    assert rows["online"]["dice_ci_low"] <= rows["online"]["dice_diff"] <= rows["online"]["dice_ci_high"]
    # compute-matched: 3 training cases, batch 2 -> 2 steps per epoch; 2 crops per step in both arms (online: 1 x 2)
    assert {(r["steps"], r["crops_per_step"]) for r in table} == {(3 * 2, 2 * 2)}
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(table)) and [len(saved["split"][k]) for k in saved["split"]] == [3, 1, 2]
    assert "| online |" in (out / "ablation.md").read_text()
    with open(out / "per_case.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 2
    # skip_existing false: every run again
    fake_runs.clear()
    _ablate(datalist, out, skip_existing="false")
    assert len(fake_runs) == 4
    # another split: the finished runs were made on other test cases, so they run again
    fake_runs.clear()
    _ablate(datalist, out, split_seed=1)
    assert len(fake_runs) == 4 and len(list((out / "splits" / "test").iterdir())) == 2


def test_a_second_ablation_into_the_same_folder_is_refused(datalist, fake_runs, tmp_path):
    out = tmp_path / "abl"
    with folder_lock(out, "fvae ablate-seg, pid 1"):
        with pytest.raises(InputError, match=r"abl: another run is writing into this output folder \(fvae ablate-seg"):
            _ablate(datalist, out)
    assert fake_runs == [] and not (out / "splits").exists()  # nothing written, nothing trained
    assert len(_ablate(datalist, out)) == 2  # the lock is gone with its holder


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(arms="none,mixup"), "arms mixup: not an arm; valid: none, union"),
        (dict(seeds=""), "seeds '': give at least one"),
        (dict(seeds="0,x"), "seeds '0,x': give a comma-separated list"),
        (dict(arms="none,union", num_samples=3), "num_samples 3: arm union trains two views per crop"),
        (dict(scored_classes=[1, 3]), r"scored_classes \[1, 3\]: give classes among 1..2 of class_names"),
        (dict(nsd_tolerance_mm=[2.0]), r"nsd_tolerance_mm \[2.0\]: give one positive tolerance \(mm\) per scored"),
        (dict(lesion_classes=[5]), r"lesion_classes \[5\]: give classes among 1..2"),
        (dict(nnunet_mirroring="maybe"), "nnunet_mirroring: expected true or false"),
        (dict(test_fraction=1.5), r"test_fraction 1.5: give a fraction of the cases in \[0, 1\)"),
        (dict(test_fraction=0.7, val_fraction=0.5), "the 6 labelled case.*cannot give 4 test, 3 validation and 1"),
    ],
)
def test_bad_options_are_one_line_before_anything_runs(datalist, fake_runs, tmp_path, kw, message):
    with pytest.raises(OptionError, match=message) as e:
        _ablate(datalist, tmp_path / "abl", **kw)
    assert "\n" not in str(e.value) and fake_runs == []


def test_the_command_prints_the_table_and_ends_user_errors_in_one_line(datalist, fake_runs, tmp_path, capsys):
    from fvae_ct.cli import CLI

    CLI().ablate_seg(datalist, "none,online", str(tmp_path / "abl"), seeds="0", n_boot=50, max_epochs=1)
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "abl" / "ablation.md").read_text() and "| online |" in printed
    with pytest.raises(SystemExit) as e:
        CLI().ablate_seg(datalist, "none,bogus", str(tmp_path / "abl"))
    assert str(e.value.code).startswith("fvae ablate-seg: arms bogus: not an arm")
    with pytest.raises(SystemExit) as e:
        CLI().ablate_seg(str(tmp_path / "nope.json"), "none", str(tmp_path / "abl"))
    assert e.value.code == f"fvae ablate-seg: {tmp_path / 'nope.json'}: datalist JSON does not exist"
    fake_runs.fail.add("none/seed0")
    with pytest.raises(SystemExit) as e:
        CLI().ablate_seg(datalist, "none", str(tmp_path / "abl2"), seeds="0")
    assert str(e.value.code).startswith("fvae ablate-seg: 1 of 1 case(s) failed") and "boom" in str(e.value.code)
