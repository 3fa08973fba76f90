"""Bad input on every bundle route (aug_seg inference / train / evaluate, ldm prepare / inference / evaluate) ends in
the project's one-line error naming the file and the problem, as on the recon route: an
unreadable file, a 2D image, NaN voxels, a missing file in a datalist, a malformed datalist JSON, a label map on
another grid. Batch routes check every case first and list all bad ones (one line each) in one error."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import PY, ROOT, run

from fvae_ct.bundle import run_bundle
from fvae_ct.errors import BatchFailure, FvaeError, InputError, user_error

AFF = np.diag([1.5, 1.5, 3.0, 1.0])
SHAPE = (24, 20, 8)
BAD = ("unreadable", "2d", "nan", "missing", "json", "grid")


def _ct(shape=SHAPE, seed=0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(40, 30, shape).astype(np.int16)
    v[:3] = -1000
    return v


def _seg(shape=SHAPE) -> np.ndarray:
    s = np.zeros(shape, np.int16)
    s[6:16, 5:15, 2:6] = 1
    s[9:12, 8:11, 3:5] = 2
    return s


def _save(path, data, aff=AFF) -> str:
    nib.save(nib.Nifti1Image(data, aff), str(path))
    return str(path)


def _bad_case(kind: str, d) -> tuple[str, str | None, str]:
    """(image, label or None, the bad file) for one bad-input class, written in ``d``."""
    img, lab = d / f"{kind}.nii.gz", d / f"{kind}_seg.nii.gz"
    _save(lab, _seg())
    if kind == "unreadable":
        img.write_bytes(np.random.default_rng(1).bytes(3000))
        return str(img), str(lab), str(img)
    if kind == "2d":
        return _save(img, _ct()[..., 0]), str(lab), str(img)
    if kind == "nan":
        v = _ct().astype(np.float32)
        v[5, 5, 2] = np.nan
        return _save(img, v), str(lab), str(img)
    if kind == "missing":
        return str(img), str(lab), str(img)
    if kind == "grid":  # a label map of another shape, 30 cm away
        far = AFF.copy()
        far[:3, 3] = 300.0
        _save(img, _ct())
        return str(img), _save(lab, _seg((20, 20, 8)), far), str(lab)
    raise ValueError(kind)


PROBLEM = {
    "unreadable": "cannot read the",
    "2d": "2D",
    "nan": "NaN/Inf voxels",
    "missing": "does not exist",
    "json": "not valid JSON",
    "grid": "",  # segmentation: "label map on another grid"; generation (resampled): "does not overlap"
}


def _datalist(path, items, msd=False) -> str:
    if msd:
        items = {"training": items}
    path.write_text(json.dumps(items))
    return str(path)


def _route(route: str, kind: str, tmp) -> tuple[dict, str]:
    """(run_bundle arguments, the bad file) of ``route`` with one good case and one bad case of class ``kind``."""
    d = tmp / "data"
    d.mkdir()
    good = {"image": _save(d / "good.nii.gz", _ct()), "label": _save(d / "good_seg.nii.gz", _seg())}
    good2 = {"image": _save(d / "good2.nii.gz", _ct(seed=2)), "label": _save(d / "good2_seg.nii.gz", _seg())}
    broken = d / "list.json"
    if kind == "json":
        broken.write_text('[{"image": "good.nii.gz", "label": ')
    else:
        img, lab, bad = _bad_case(kind, d)
    root = str(tmp / "root")
    if route.startswith("aug_seg"):
        if kind == "json":
            listing, bad = str(broken), str(broken)
        else:
            listing = _datalist(broken, [good, {"image": img, "label": lab}, good2], msd=True)
        if route == "aug_seg_inference":
            if kind == "grid":
                pytest.skip("segmentation inference reads no label map")
            return dict(name="fvae_aug_seg", config="inference.yaml", input=listing, bundle_root=root,
                        output_dir=str(tmp / "out")), bad
        if route == "aug_seg_train":
            return dict(name="fvae_aug_seg", config="train.yaml", datalist=listing, bundle_root=root, max_epochs=1,
                        num_workers=0), bad
        return dict(name="fvae_aug_seg", config=["train.yaml", "evaluate.yaml"], datalist=listing,
                    eval_datalist=listing, bundle_root=root, num_workers=0), bad
    if route == "ldm_prepare":
        if kind == "json":
            return dict(name="fvae_ldm", config="prepare.yaml", datalist=str(broken), bundle_root=root,
                        vae="identity"), str(broken)
        listing = _datalist(broken, [good, {"image": img, "label": lab}])
        return dict(name="fvae_ldm", config="prepare.yaml", datalist=listing, bundle_root=root, vae="identity"), bad
    if route == "ldm_inference":  # the mask is the input (its grid is the output grid); the stats file the datalist
        if kind == "grid":
            pytest.skip("generation's only input grid is the mask's own")
        (tmp / "root" / "latents").mkdir(parents=True)
        stats = tmp / "root" / "latents" / "latent_stats.json"
        if kind == "json":
            stats.write_text('{"scale_factor": 1.0,')
            return dict(name="fvae_ldm", config="inference.yaml", bundle_root=root, mask=good["label"],
                        vae="identity"), str(stats)
        stats.write_text("{}")
        mask = lab if kind == "missing" else img if kind == "unreadable" else None
        if mask is None:  # a mask with the image's defect
            mask = str(d / f"{kind}_mask.nii.gz")
            _save(mask, _seg()[..., 0] if kind == "2d" else np.where(np.isnan(nib.load(img).get_fdata()), np.nan, 1.0))
            bad = mask
        else:
            bad = mask
        if kind == "missing":
            d.joinpath(f"{kind}_seg.nii.gz").unlink()
        return dict(name="fvae_ldm", config="inference.yaml", bundle_root=root, mask=mask, vae="identity"), bad
    # ldm_evaluate: folders of generated and real volumes (+ masks); the "datalist" is the folder
    if kind == "json":
        pytest.skip("the generation evaluation reads folders, no datalist JSON")
    gen, real, masks = tmp / "gen", tmp / "real", tmp / "masks"
    for f in (gen, real, masks):
        f.mkdir()
    for i in range(2):
        _save(real / f"r{i}.nii.gz", _ct(seed=i))
        _save(gen / f"c{i}_generated.nii.gz", _ct(seed=5 + i))
        _save(masks / f"c{i}_seg.nii.gz", _seg())
    args = dict(name="fvae_ldm", config="evaluate.yaml", gen_dir=str(gen), real_dir=str(real),
                masks_dir=str(masks), output_dir=str(tmp / "eval"), classes=[1, 2])
    if kind == "missing":
        args["gen_dir"] = str(tmp / "no_such_folder")
        return args, args["gen_dir"]
    if kind == "grid":
        (masks / "c9_seg.nii.gz").write_bytes(open(lab, "rb").read())
        _save(gen / "c9_generated.nii.gz", _ct())
        return args, str(masks / "c9_seg.nii.gz")
    (gen / "c9_generated.nii.gz").write_bytes(open(img, "rb").read())
    return args, str(gen / "c9_generated.nii.gz")


ROUTES = ("aug_seg_inference", "aug_seg_train", "aug_seg_evaluate", "ldm_prepare", "ldm_inference", "ldm_evaluate")


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("route", ROUTES)
def test_bad_input_is_one_line_naming_the_file(route, kind, tmp_path):
    args, bad = _route(route, kind, tmp_path)
    with pytest.raises(Exception) as e:
        run_bundle(args.pop("name"), args.pop("config"), **args)
    cause = user_error(e.value)
    assert isinstance(cause, FvaeError), f"{type(e.value).__name__}: {str(e.value)[-2000:]}"
    msg = str(cause)
    line = msg.splitlines()[-1]  # the bad case's own line (a BatchFailure lists one line per bad case)
    assert bad in line and PROBLEM[kind] in line, msg
    if kind == "grid":
        assert "another grid" in line or "does not overlap" in line, msg
    if isinstance(cause, InputError):
        assert "\n" not in msg and len(msg) < 500, msg
    else:  # a batch: the header and one line per bad case, never a traceback
        assert isinstance(cause, BatchFailure) and len(msg.splitlines()) <= 3 and "Traceback" not in msg, msg
    assert not list((tmp_path / "root").glob("models/*.pt"))  # nothing trained


def test_a_batch_lists_every_bad_case_before_anything_runs(tmp_path):
    """Segmentation training with three bad cases among good ones: one error listing the three, nothing trained."""
    d = tmp_path / "data"
    d.mkdir()
    items = [{"image": _save(d / f"ok{i}.nii.gz", _ct(seed=i)), "label": _save(d / f"ok{i}_seg.nii.gz", _seg())}
             for i in range(3)]
    bads = []
    for kind in ("unreadable", "nan", "grid"):
        img, lab, bad = _bad_case(kind, d)
        items.append({"image": img, "label": lab})
        bads.append(bad)
    listing = _datalist(tmp_path / "list.json", items, msd=True)
    with pytest.raises(Exception) as e:
        run_bundle("fvae_aug_seg", "train.yaml", datalist=listing, bundle_root=str(tmp_path / "root"), max_epochs=1,
                   num_workers=0)
    cause = user_error(e.value)
    assert isinstance(cause, BatchFailure), e.value
    lines = str(cause).splitlines()
    assert lines[0] == "3 of 6 case(s) have unusable input (nothing was trained):", lines
    assert len(lines) == 4 and all(sum(b in ln for ln in lines[1:]) == 1 for b in bads), lines  # one line each
    assert not (tmp_path / "root" / "models").exists()


@pytest.mark.parametrize(
    "route, kind",
    [("aug_seg_inference", "unreadable"), ("aug_seg_train", "grid"), ("aug_seg_evaluate", "nan"),
     ("ldm_prepare", "json"), ("ldm_inference", "2d"), ("ldm_evaluate", "missing")],
)
def test_monai_bundle_run_ends_in_that_one_line(route, kind, tmp_path):
    """``python -m monai.bundle run`` itself: stderr ends in the one line naming the file, no traceback."""
    args, bad = _route(route, kind, tmp_path)
    bundle, config = args.pop("name"), args.pop("config")
    configs = [config] if isinstance(config, str) else config
    files = [str(ROOT / "bundles" / bundle / "configs" / c) for c in configs]
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else str(files)]
    for k, v in args.items():
        cmd += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    r = run(cmd)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("  " if "BatchFailure" in r.stderr else "python -m monai.bundle run: ") and bad in last, (
        r.stderr[-3000:]
    )
    assert PROBLEM[kind] in last, r.stderr[-3000:]


def test_a_missing_or_broken_checkpoint_is_one_line_naming_it(tmp_path):
    from fvae_ct.checked_io import read_checkpoint

    with pytest.raises(InputError, match=r"model_3d.pt: trained model \(train.yaml --stage 3d\) does not exist"):
        read_checkpoint(tmp_path / "model_3d.pt", "trained model (train.yaml --stage 3d)")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"bad.pt: cannot read the checkpoint, truncated or not a checkpoint\?"):
        read_checkpoint(tmp_path / "bad.pt")
