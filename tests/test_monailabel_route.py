"""fvae_aug_seg as MONAI Label 0.8.5 drives it (BundleTrainTask / BundleInferTask), fast and on tiny synthetic cases:
a model is always saved (also with an empty validation split), label ids are checked and mappable (label_map),
partial displayable options keep their defaults, and the label map MONAI Label writes is an integer type."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PY, ROOT, run
from monai.bundle import ConfigParser

from fvae_ct.errors import InputError

CONF = ROOT / "bundles" / "fvae_aug_seg" / "configs"
TINY = {"patch_size": [32, 32, 16], "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1],
        "num_workers": 0, "batch_size": 2, "num_samples": 1, "learning_rate": 0.003}


def _case(d, i: int, ids=(1, 2), shape=(40, 40, 16)):
    """A tiny CT-like volume (HU) with an 'organ' block and a 'lesion' inside it, labelled with ``ids``."""
    rng = np.random.default_rng(i)
    img = rng.normal(-800, 20, shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    x0 = 8 + i
    lab[x0 : x0 + 20, 10:30, 4:12] = ids[0]
    lab[x0 + 6 : x0 + 12, 16:22, 6:10] = ids[1]
    img[lab == ids[0]] = 60
    img[lab == ids[1]] = 0
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    (d / "imagesTr").mkdir(parents=True, exist_ok=True)
    (d / "labelsTr").mkdir(parents=True, exist_ok=True)
    ip, lp = d / "imagesTr" / f"case{i}.nii.gz", d / "labelsTr" / f"case{i}.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(ip))
    nib.save(nib.Nifti1Image(lab, aff), str(lp))
    return {"image": str(ip), "label": str(lp)}


# ---- what monailabel 0.8.5 (monailabel/tasks/train/bundle.py, BundleTrainTask) does, step by step ---------------
def _displayable(conf_dir=CONF):
    p = ConfigParser()
    p.read_config(str(conf_dir / "train.yaml"))
    return p, p.get_parsed_content("displayable_configs", instantiate=True)


def ml_config():
    """BundleTrainTask.config(): MONAI Label's own options updated with the bundle's displayable_configs."""
    opts = {"device": ["cpu"], "pretrained": True, "max_epochs": 50, "val_split": 0.2, "multi_gpu": True,
            "gpus": "all", "tracking": ["None", "mlflow"], "tracking_uri": "", "tracking_experiment_name": "",
            "run_id": "", "model_filename": ["model.pt"]}
    opts.update(_displayable()[1])
    return opts


def ml_overrides(bundle_path, request: dict, datalist: list[dict]) -> dict:
    """BundleTrainTask.__call__'s overrides (single GPU) for ``request``, as 0.8.5 builds them."""
    from monai.data import partition_dataset

    val_split = request.get("val_split", 0.2)
    if val_split > 0.0:
        train_ds, val_ds = partition_dataset(datalist, ratios=[(1 - val_split), val_split], shuffle=False)
    else:
        train_ds, val_ds = datalist, (None if val_split < 0 else [])
    p, displayable = _displayable()
    train_handlers = p.get("train#handlers", [])
    model_pt = os.path.join(bundle_path, "models", "model.pt")
    if request.get("pretrained", True) and os.path.exists(model_pt):
        train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": model_pt,
                                  "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {"bundle_root": str(bundle_path), "train#trainer#max_epochs": request.get("max_epochs", 50),
                 "train#dataset#data": train_ds, "device": request.get("device", "cpu"),
                 "train#handlers": train_handlers}
    overrides["displayable_configs"] = {c: request[c] for c in displayable.keys()}  # MONAI Label's own request[c]
    if val_ds is not None:
        overrides["validate#dataset#data"] = val_ds
    return overrides


def ml_train(bundle_path, overrides: dict, extra: dict | None = None):
    """run_single_gpu: monai.bundle.run("run", meta_file, config_file, **overrides) (in a subprocess)."""
    ov = tmp = bundle_path / "ml_overrides.json"
    tmp.write_text(json.dumps({**overrides, **(extra or {})}))
    code = ("import json, sys, monai.bundle; o = json.load(open(sys.argv[1])); monai.bundle.run(run_id='run', "
            "init_id=None, final_id=None, meta_file=sys.argv[2], config_file=sys.argv[3], **o)")
    return run([PY, "-c", code, str(ov), str(CONF / "metadata.json"), str(CONF / "train.yaml")])


def _request(**changes):
    body = {k: (v[0] if isinstance(v, list) and v else v) for k, v in ml_config().items() if v != ""}
    body.update({"device": "cpu", "max_epochs": 2, "multi_gpu": False})
    body.update(changes)
    return body


# ---- 4. every exposed option has a default; a partial set keeps the others' ------------------------------------
def test_every_displayable_option_has_a_default_and_partial_sets_keep_the_others():
    p, displayable = _displayable()
    assert set(displayable) >= {"recon_mode", "recon_mix", "label_map"}
    assert all(v not in (None, "") for v in displayable.values()), displayable  # MONAI Label shows each with a value
    # what a client sends: the /info/ config with one option changed, through MONAI Label's own request[c]
    ov = ml_overrides(ROOT / "unused", _request(recon_mode="online", val_split=0.0), [])
    assert ov["displayable_configs"] == {**displayable, "recon_mode": "online"}
    # a partial dict reaching the bundle (command line, exported multi-GPU config): the others keep their defaults
    for partial in ({"recon_mode": "online"}, {"recon_mix": "prob"}, {"label_map": '{"5": 1}'}, {}):
        q = ConfigParser()
        q.read_config(str(CONF / "train.yaml"))
        q["displayable_configs"] = partial
        assert q.get_parsed_content("recon_mode") == partial.get("recon_mode", "none")
        assert q.get_parsed_content("recon_mix") == partial.get("recon_mix", "union")
        from fvae_ct.aug_seg.labels import parse_label_map

        assert parse_label_map(q.get_parsed_content("label_map")) == ({5: 1} if "label_map" in partial else None)
        q.get_parsed_content("train#mixer")  # view_mixer(recon_mode, recon_mix, recon_prob) builds


def test_label_map_setting_is_parsed_never_evaluated():
    from fvae_ct.aug_seg.labels import parse_label_map
    from fvae_ct.errors import OptionError

    names = ["background", "organ", "lesion"]
    assert parse_label_map('{"5": 1, "117": 2}', names) == {5: 1, 117: 2}
    assert parse_label_map({"5": 1, 6: "2"}, names) == {5: 1, 6: 2}
    assert parse_label_map("{}", names) is None and parse_label_map("", names) is None
    for bad in ("__import__('os').system('true')", '{"5": 3}', "[1, 2]", '{"x": 1}'):
        with pytest.raises(OptionError):
            parse_label_map(bad, names)


# ---- 3. label ids checked against the classes; label_map maps a multi-organ map ---------------------------------
def test_label_ids_outside_the_classes_are_refused_in_one_line(tmp_path):
    from fvae_ct.aug_seg.labels import MapLabelsd, check_label_files

    items = [_case(tmp_path, 0), _case(tmp_path, 1, ids=(5, 117))]
    names = ["background", "organ", "lesion"]
    with pytest.raises(InputError) as e:
        check_label_files(items, names)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(items[1]["label"]), msg
    assert "[0, 5, 117]" in msg and "{0: background, 1: organ, 2: lesion}" in msg and "label_map" in msg, msg
    assert check_label_files(items, names, '{"5": 1, "117": 2}') == 2
    # the same at load time (evaluation, or a list the pre-pass did not see)
    from monai.transforms import LoadImaged

    d = LoadImaged(["label"], ensure_channel_first=True, image_only=True)({"label": items[1]["label"]})
    with pytest.raises(InputError, match=r"case1\.nii\.gz: label ids \[0, 5, 117\]"):
        MapLabelsd("label", names)(d)
    out = MapLabelsd("label", names, {"5": 1})(d)["label"]
    assert set(torch.unique(out).tolist()) == {0, 1}  # 117 not listed -> background


def test_bundle_refuses_a_multi_organ_map_before_training(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    data = [_case(tmp_path / "data", i, ids=(5, 117)) for i in range(3)]
    r = ml_train(bundle, ml_overrides(bundle, _request(val_split=0.34), data), TINY)
    assert r.returncode != 0
    assert "index 100 is out of bounds" not in r.stderr
    assert "label ids [0, 5, 117] found" in r.stderr and "set label_map" in r.stderr, r.stderr[-3000:]
    assert not (bundle / "eval" / "train_loss.json").exists()  # refused before the first iteration


# ---- 1. a model is always saved; 3. a training on a mapped multi-organ map ---------------------------------------
@pytest.fixture(scope="module")
def two_case_run(tmp_path_factory):
    """MONAI Label's default val_split 0.2 with 2 labelled images: no validation case."""
    tmp = tmp_path_factory.mktemp("two")
    bundle = tmp / "bundle"
    bundle.mkdir()
    data = [_case(tmp / "data", i) for i in range(2)]
    ov = ml_overrides(bundle, _request(), data)
    assert ov["validate#dataset#data"] == [] and len(ov["train#dataset#data"]) == 2
    return bundle, ml_train(bundle, ov, TINY)


def test_empty_validation_still_saves_the_last_epoch_and_says_so(two_case_run):
    bundle, r = two_case_run
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert sum("validation is empty" in line for line in log.splitlines()) == 1, log[-3000:]
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert "convInit.conv.weight" in state and state["convInit.conv.weight"].shape[0] == 8
    rec = json.loads((bundle / "models" / "model.json").read_text())
    assert rec["selected_by"] == "last_epoch" and rec["epochs"] == 2 and rec["init_filters"] == 8
    assert "the last epoch's weights (epoch 2; validation never ran)" in log


def test_mapped_multi_organ_training_keeps_the_validation_selected_model(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    data = [_case(tmp_path / "data", i, ids=(5, 117)) for i in range(3)]
    req = _request(val_split=0.34, max_epochs=2, label_map='{"5": 1, "117": 2}')  # a JSON string, as a form sends
    ov = ml_overrides(bundle, req, data)
    assert len(ov["validate#dataset#data"]) == 1
    r = ml_train(bundle, ov, {**TINY, "val_interval": 1})
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((bundle / "models" / "model.json").read_text())
    assert rec["selected_by"] == "validation" and 1 <= rec["best_epoch"] <= 2, rec
    log = r.stdout + r.stderr
    assert "the validation-selected model" in log and 'label_map {"5": 1, "117": 2}' in log, log[-3000:]
    # the same mapping as a dict (a JSON client), fine-tuning the saved model
    before = (bundle / "models" / "model.pt").stat().st_mtime_ns
    ov = ml_overrides(bundle, _request(val_split=0.0, max_epochs=1, label_map={"5": 1, "117": 2}), data)
    r = ml_train(bundle, ov, TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restored all variables from" in r.stdout + r.stderr
    assert json.loads((bundle / "models" / "model.json").read_text())["selected_by"] == "last_epoch"
    assert (bundle / "models" / "model.pt").stat().st_mtime_ns != before


# ---- 5. the label map MONAI Label writes is an integer type -----------------------------------------------------
def test_inference_label_map_is_uint8_in_the_monailabel_path(two_case_run, tmp_path):
    bundle, r = two_case_run
    assert r.returncode == 0, r.stderr[-3000:]
    src = _case(tmp_path, 7)["image"]
    # BundleInferTask: the config's preprocessing / network / inferer, then its postprocessing without SaveImaged
    # (post_filter), then MONAI Label's writer, which keeps the array's dtype
    from monai.transforms import Compose, SaveImaged

    p = ConfigParser()
    p.read_config(str(CONF / "inference.yaml"))
    p["bundle_root"] = str(bundle)
    p["device"] = "$torch.device('cpu')"
    net = p.get_parsed_content("network")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    d = p.get_parsed_content("preprocessing")({"image": src})
    with torch.no_grad():
        d["pred"] = p.get_parsed_content("inferer")(d["image"][None], net)[0]
    post = p.get_parsed_content("postprocessing")
    post = [t for t in (post.transforms if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)]
    out = Compose(post)(d)["pred"]
    assert out.dtype == torch.uint8, out.dtype
    assert tuple(out.shape[-3:]) == nib.load(src).shape
    # and the bundle's own inference run writes the same type
    res = run([PY, "-m", "monai.bundle", "run", "--config_file", str(CONF / "inference.yaml"), "--input", src,
               "--bundle_root", str(bundle), "--output_dir", str(tmp_path / "seg")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert nib.load(str(tmp_path / "seg" / "case7_seg.nii.gz")).get_data_dtype() == np.uint8
    shutil.rmtree(tmp_path / "seg")
