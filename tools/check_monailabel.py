"""Does MONAI Label's bundle infer task load the fvae_aug_seg bundle and segment an image?

Runs in a separate virtual environment with monailabel (see `make monailabel-check`, which also trains the
small model it uses). Assembles a bundle folder (the repository's configs + a trained models/model.pt, with
the network size the model was trained with), loads it with
monailabel.tasks.infer.bundle.BundleInferTask, segments --image on the CPU and checks the label map: same
shape and affine as the image, only label ids of the bundle.

    python tools/check_monailabel.py --model runs/x/models/model.pt --image ct.nii.gz --out outputs/mlcheck \
        --network '{"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1], "patch_size": [48, 48, 16]}'
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--network", default="{}", help="JSON of inference.yaml values the model was trained with")
    a = ap.parse_args()

    import monailabel
    from monailabel.tasks.infer.bundle import BundleInferTask

    out = Path(a.out)
    bundle = out / "fvae_aug_seg"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(REPO / "bundles" / "fvae_aug_seg", bundle)
    (bundle / "models").mkdir(exist_ok=True)
    shutil.copy(a.model, bundle / "models" / "model.pt")
    cfg_path = bundle / "configs" / "inference.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.update(json.loads(a.network))
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    task = BundleInferTask(str(bundle), {}, load_strict=True)
    assert task.is_valid(), "BundleInferTask did not accept the bundle"
    print("monailabel", monailabel.__version__, "| labels:", task.labels, "| type:", task.type)
    label_file, result = task({"image": str(Path(a.image).resolve()), "device": "cpu"})
    img, lab = nib.load(a.image), nib.load(label_file)
    ids = set(np.unique(np.asarray(lab.dataobj)).astype(int).tolist())
    print("label map:", label_file, lab.shape, "ids", sorted(ids))
    ok = lab.shape[:3] == img.shape[:3] and np.allclose(lab.affine, img.affine, atol=1e-3) and ids <= {0, 1, 2}
    shutil.copy(label_file, out / "monailabel_seg.nii.gz")
    print("MONAI Label check:", "PASSED" if ok else "FAILED", json.dumps({k: str(v) for k, v in result.items()})[:300])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
