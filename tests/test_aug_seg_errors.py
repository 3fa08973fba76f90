"""fvae_aug_seg: datalists through the one reader (fvae_ct.datalist.read_datalist), and a bad option or input is one
line naming it (OptionError / InputError), raised by the component that owns it."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

from fvae_ct.aug_seg import RandReconViewd, build_datalists, recon_inputs, split_cases, view_mixer
from fvae_ct.aug_seg.nnunet_data import arm_views, dataset_folder_name, make_folds
from fvae_ct.aug_seg.scoring import score_case, scoring_settings
from fvae_ct.errors import InputError, OptionError

CLASSES = ["background", "organ", "lesion"]


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _one_line(excinfo, kind) -> str:
    assert type(excinfo.value) is kind, type(excinfo.value)
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


# ---- datalists: one reader ------------------------------------------------------------------------------------
def test_msd_and_list_datalists_give_absolute_paths_and_the_own_validation_list(tmp_path):
    items = [{"image": f"im{i}.nii.gz", "label": f"lb{i}.nii.gz", "id": f"x{i}"} for i in range(5)]
    val = [{"image": "/abs/v.nii.gz", "label": "v_seg.nii.gz", "image_recon": "r/v_recon.nii.gz"}]
    msd = _write(tmp_path / "msd.json", {"training": items, "validation": val, "test": ["t.nii.gz"]})
    s = split_cases(msd, None, 0.2, 0.0, seed=0)
    assert s["val"] == [{"image": "/abs/v.nii.gz", "label": str(tmp_path / "v_seg.nii.gz"),
                         "image_recon": str(tmp_path / "r" / "v_recon.nii.gz")}]  # fmt: skip
    assert sorted(d["image"] for d in s["train"]) == [str(tmp_path / f"im{i}.nii.gz") for i in range(5)]
    assert {d["id"] for d in s["train"]} == {f"x{i}" for i in range(5)}  # not a path key: kept as it is
    # dataset_dir: the base of relative paths instead of the JSON's folder; files are not checked here
    other = split_cases(msd, "/data/set", 0.2, 0.0, seed=0)
    assert sorted(d["label"] for d in other["train"]) == [f"/data/set/lb{i}.nii.gz" for i in range(5)]
    assert recon_inputs(msd) == [str(tmp_path / f"im{i}.nii.gz") for i in range(5)] + ["/abs/v.nii.gz"]
    # a plain list: no validation list, a seeded draw of val_fraction
    plain = _write(tmp_path / "list.json", items)
    s = build_datalists(plain, val_fraction=0.2, seed=0)
    assert [len(s["train"]), len(s["val"])] == [4, 1] and "image_recon" not in s["val"][0]
    # an explicit empty validation list: no validation cases (not a draw)
    empty = _write(tmp_path / "empty_val.json", {"training": items, "validation": []})
    assert [len(v) for v in split_cases(empty, None, 0.2).values()] == [5, 0, 0]


@pytest.mark.parametrize(
    "content,problem",
    [
        ({"validation": []}, "datalist JSON needs a list of {'image', ...} items under 'training'"),
        ([{"image": "a.nii.gz"}], "item 0 needs 'image' and 'label' path(s), got {'image': 'a.nii.gz'}"),
        ({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}], "validation": [{"label": "c.nii.gz"}]},
         "item 0 needs 'image' and 'label' path(s)"),
        ("not json", "not valid JSON"),
        (None, "datalist JSON does not exist"),
    ],
)
def test_a_bad_datalist_is_one_line_naming_it(tmp_path, content, problem):
    p = tmp_path / "dl.json"
    if isinstance(content, str):
        p.write_text(content)
    elif content is not None:
        _write(p, content)
    with pytest.raises(InputError) as e:
        build_datalists(str(p))
    assert _one_line(e, InputError).startswith(f"{p}: {problem}")


# ---- options of the training config -----------------------------------------------------------------------
def test_view_options_are_checked_with_one_line_naming_them(tmp_path):
    dl = _write(tmp_path / "list.json", [{"image": "a.nii.gz", "label": "b.nii.gz"}])
    with pytest.raises(OptionError) as e:
        build_datalists(dl, recon_mode="precomputd")
    assert _one_line(e, OptionError) == "recon_mode 'precomputd': must be one of none, precomputed, online"
    with pytest.raises(OptionError) as e:
        view_mixer("precomputed", "mix")
    assert _one_line(e, OptionError) == "recon_mix 'mix': must be one of union, prob"
    with pytest.raises(OptionError) as e:
        view_mixer("precomputed", "prob", 1.5)
    assert _one_line(e, OptionError) == "recon_prob 1.5: give a probability in [0, 1]"
    assert RandReconViewd(0.25).prob == 0.25 and type(view_mixer("none", "prob", 7)).__name__ == "_Passthrough"
    with pytest.raises(OptionError) as e:
        split_cases(dl, None, val_fraction=-0.1)
    assert _one_line(e, OptionError) == "val_fraction -0.1: give a fraction of the cases in [0, 1)"
    with pytest.raises(OptionError) as e:
        split_cases(dl, None, 0.2, 0.5)
    assert _one_line(e, OptionError) == (
        f"val_fraction 0.2 / test_fraction 0.5: the 1 labelled case(s) of {dl} cannot give 1 test, 0 validation "
        "and 1 training case; lower them"
    )


def test_nnunet_options_are_checked_with_one_line_naming_them():
    assert arm_views("union") == ("original", "recon")
    with pytest.raises(OptionError) as e:
        arm_views("mixup")
    assert _one_line(e, OptionError) == "nnunet_arm 'mixup': must be one of none, recon, union, gaussian, nlm"
    with pytest.raises(OptionError) as e:
        dataset_folder_name(1000, "x")
    assert _one_line(e, OptionError) == "nnunet_dataset_id 1000: nnU-Net dataset ids are 1..999"
    assert dataset_folder_name(7, "x") == "Dataset007_x"
    for k in (0, 3):
        with pytest.raises(OptionError) as e:
            make_folds(["a"], ["b"], k, 0)
        assert _one_line(e, OptionError) == (
            f"nnunet_folds {k}: give 1 (the bundle's split) or k folds with at least k labelled cases "
            "(the datalist has 2)"
        )
    assert make_folds(["a"], ["b"], 2, 0) in ([(["b"], ["a"]), (["a"], ["b"])], [(["a"], ["b"]), (["b"], ["a"])])


def test_a_second_nnunet_dir_in_one_process_is_refused(monkeypatch, tmp_path):
    from fvae_ct.aug_seg.nnunet import set_paths

    monkeypatch.setitem(sys.modules, "nnunetv2.paths", types.SimpleNamespace(nnUNet_raw="/elsewhere/nnUNet_raw"))
    with pytest.raises(OptionError) as e:
        set_paths(str(tmp_path / "w"))
    assert _one_line(e, OptionError).startswith(
        f"nnunet_dir {tmp_path / 'w'}: this process already imported nnU-Net with nnUNet_raw=/elsewhere/nnUNet_raw"
    )
    assert not (tmp_path / "w").exists()


# ---- scoring ----------------------------------------------------------------------------------------------
def test_scoring_settings_defaults_and_one_line_errors():
    assert scoring_settings(CLASSES, [1, 2]) == {"scored_classes": [1, 2], "tolerances_mm": [2.0, 2.0],
                                                 "lesion_classes": [2]}  # fmt: skip
    assert scoring_settings(["bg", "Pancreas", "Tumour"], 2, 1.5, None)["lesion_classes"] == [2]
    assert scoring_settings(CLASSES, "1", [3], [])["tolerances_mm"] == [3.0]
    for args, msg in [
        (([0, 1],), "scored_classes [0, 1]: give classes among 1..2 of class_names ['background', 'organ', 'lesion']"),
        (([1, 2], [2.0]), "nsd_tolerance_mm [2.0]: give one positive tolerance (mm) per scored class [1, 2]"),
        (([1], [0.0]), "nsd_tolerance_mm [0.0]: give one positive tolerance (mm) per scored class [1]"),
        (([1], None, [3]), "lesion_classes [3]: give classes among 1..2 of class_names"),
        (([1], None, ["x"]), "lesion_classes ['x']: give a number or a list of numbers"),
    ]:
        with pytest.raises(OptionError) as e:
            scoring_settings(CLASSES, *args)
        assert _one_line(e, OptionError).startswith(msg)


def test_score_case_refuses_a_tolerance_list_of_another_length(tmp_path):
    import nibabel as nib

    lab = np.zeros((6, 6, 4), np.int16)
    lab[1:4, 1:4, 1:3] = 1
    p = str(tmp_path / "l.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), p)
    with pytest.raises(OptionError) as e:
        score_case(p, p, [1, 2], [2.0])
    assert _one_line(e, OptionError) == "nsd_tolerance_mm [2.0]: give one tolerance per scored class [1, 2]"
    assert score_case(p, p, [1], [1.0])["dice_1"] == 1.0


# ---- the synthetic lesion set ----------------------------------------------------------------------------------
def test_lesion_set_refuses_bad_organs_and_a_label_map_without_them(tmp_path):
    import nibabel as nib

    from fvae_ct.aug_seg.lesions import insert_lesion, make_lesion_set

    ct, seg = np.zeros((20, 20, 10), np.int16), np.zeros((20, 20, 10), np.int16)
    seg[4:16, 4:16, 2:8] = 5  # a liver only
    paths = [str(tmp_path / n) for n in ("ct.nii.gz", "seg.nii.gz")]
    for a, p in zip((ct, seg), paths):
        nib.save(nib.Nifti1Image(a, np.eye(4)), p)
    with pytest.raises(OptionError) as e:
        make_lesion_set(tmp_path / "out", *paths, organs=("liver", "brain"))
    assert _one_line(e, OptionError) == "organs ['liver', 'brain']: ['brain'] not among liver, spleen, kidney_right, kidney_left"
    with pytest.raises(InputError) as e:
        make_lesion_set(tmp_path / "out", *paths, n_cases=2)
    assert _one_line(e, InputError) == f"{paths[1]}: no voxel of organ label(s) spleen (1): not a TotalSegmentator label map?"
    assert not os.path.exists(tmp_path / "out" / "dataset.json")
    with pytest.raises(OptionError) as e:
        insert_lesion(ct, seg == 5, (1.0, 1.0, 1.0), radius_mm=20.0)
    msg = _one_line(e, OptionError)
    assert msg.startswith("radius_mm 20: no place in the organ is") and "(its deepest point is 3.0 mm deep)" in msg
