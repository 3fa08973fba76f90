"""nnU-Net v2 through MONAI's integration on CPU: plan + preprocess (nnUNetV2Runner), a tiny training
(get_nnunet_trainer driven by MONAI's SupervisedTrainer), MONAI's bundle layout, ModelnnUNetWrapper inference.

Needs ``nnunetv2`` (not yet in the pinned test environment: skipped without it)."""

import json
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nnunetv2")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, nibabel as nib, torch
    from monai.data import list_data_collate
    from monai.transforms import LoadImage
    from fvae_ct.aug_seg import nnunet as N
    from fvae_ct.aug_seg.nnunet_data import export_arm

    def main():
        work, data = sys.argv[1], json.loads(sys.argv[2])
        N.set_paths(work)
        export_arm(data, "gaussian", work + "/nnUNet_raw", work + "/nnUNet_preprocessed", 21,
                   ["background", "organ", "lesion"], view_dir=work + "/views")
        N.plan_and_preprocess(work, 21, n_proc=1)
        model = N.train(work, 21, work + "/bundle/models", max_epochs=1, epoch_length=2, progress=False)
        x = LoadImage(image_only=True, ensure_channel_first=True)(data["test"][0]["image"])
        y = N.predictor(work + "/bundle/models", mirroring=False)(list_data_collate([{"image": x}])["image"])
        aff = y.affine[0] if y.affine.ndim == 3 else y.affine
        print(json.dumps({"model": str(model), "shape": list(y.shape), "dtype": str(y.dtype),
                          "ids": torch.unique(y).tolist(), "affine_equal": bool(np.allclose(aff, x.affine)),
                          "in_shape": list(x.shape)}))

    if __name__ == "__main__":
        main()
    """
)


def _crop(src, dst, box):
    img = nib.load(str(src))
    (x0, x1), (y0, y1), (z0, z1) = box
    data = np.asarray(img.dataobj)[x0:x1, y0:y1, z0:z1]
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ np.array([x0, y0, z0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, aff, img.header), str(dst))


def test_tiny_nnunet_plans_trains_and_serves_on_cpu(assets, tmp_path):
    from fvae_ct.aug_seg.lesions import make_lesion_set

    dl = make_lesion_set(tmp_path / "les", assets / "ct" / "totalseg_ct_sm_3mm.nii.gz",
                         assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz", n_cases=4, seed=2)
    items = json.loads(open(dl).read())["training"]
    crops = []
    for i, it in enumerate(items):  # small crops around the lesion: a tiny plan (patch) keeps this a CPU test
        lab = np.asarray(nib.load(str(tmp_path / "les" / it["label"])).dataobj)
        c = np.argwhere(lab == 2).mean(0).astype(int)
        box = [(max(0, c[0] - 20), max(0, c[0] - 20) + 40), (max(0, c[1] - 20), max(0, c[1] - 20) + 40), (0, 30)]
        pair = {}
        for k in ("image", "label"):
            out = tmp_path / f"{k}_{i}.nii.gz"
            _crop(tmp_path / "les" / it[k], out, box)
            pair[k] = str(out)
        crops.append(pair)
    data = {"train": crops[:2], "val": crops[2:3], "test": crops[3:]}
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "w"), json.dumps(data)], env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    models = tmp_path / "w" / "bundle" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["dataset.json", "fold_0", "nnunet_checkpoint.pth", "plans.json"]
    assert json.loads((models / "dataset.json").read_text())["fvae_arm"] == "gaussian"
    assert out["shape"] == [1, *out["in_shape"]] and out["affine_equal"]
    assert out["dtype"] == "torch.uint8" and set(out["ids"]) <= {0, 1, 2}
