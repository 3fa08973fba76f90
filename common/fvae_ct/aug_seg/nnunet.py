"""nnU-Net v2 through MONAI's integration (``monai.apps.nnunet``): plan, train, save as a bundle model, infer.

- :func:`set_paths`: nnU-Net's three folders (it reads them from the environment when first imported).
- :func:`plan_and_preprocess`: :class:`monai.apps.nnunet.nnUNetV2Runner` ``plan_and_process`` for one configuration.
- :func:`train`: :func:`monai.apps.nnunet.get_nnunet_trainer` builds nnU-Net's trainer (network, loss with deep
  supervision, optimiser, poly learning rate, augmenting loader); MONAI's ``SupervisedTrainer`` runs its exact
  ``train_step`` (grad clipping 12, AMP on CUDA) for ``max_epochs`` x ``epoch_length`` iterations (nnU-Net's
  defaults: 1000 x 250), with MONAI's progress bar and stats. The final weights are written in nnU-Net's layout and
  converted by :func:`monai.apps.nnunet.convert_nnunet_to_monai_bundle` into the bundle's ``models/``: no
  checkpoint is chosen by validation (``best_model.pt`` = the final weights), so the validation split stays unbiased.
- :func:`export_servable`: ``models/model.pt`` + ``models/model.json`` naming the nnU-Net model, so that the bundle's
  ``inference.yaml`` (and MONAI Label, which needs ``models/model.pt``) serves it.
- :func:`predictor`: :class:`monai.apps.nnunet.ModelnnUNetWrapper` on any device (MONAI's
  ``get_nnunet_monai_predictor`` is CUDA-only): nnU-Net's own preprocessing, sliding window and export; input a
  ``MetaTensor`` ``[1, 1, X, Y, Z]`` (HU, the file's voxel order), output ``[1, 1, X, Y, Z]`` label ids, same meta.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from monai.apps.nnunet import ModelnnUNetWrapper
from monai.data import MetaTensor

from ..errors import InputError, OptionError
from ..io import write_text_atomic
from .workflow import spacing_from_affine

__all__ = [
    "set_paths",
    "plan_and_preprocess",
    "train",
    "predictor",
    "export_servable",
    "SpacingnnUNetWrapper",
    "MODEL_FILES",
]

log = logging.getLogger("fvae_ct")

#: what ``models/`` holds for an nnU-Net model (MONAI's bundle layout); ``fold_<k>/model.pt`` per fold
MODEL_FILES = ("plans.json", "dataset.json", "nnunet_checkpoint.pth")


def set_paths(work_dir: str) -> dict[str, str]:
    """``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` under ``work_dir`` (created, exported).

    nnU-Net copies these from the environment when it is first imported, so one process uses one ``work_dir``;
    another one is refused rather than silently ignored.
    """
    paths = {
        "nnUNet_raw": str(Path(work_dir, "nnUNet_raw").resolve()),
        "nnUNet_preprocessed": str(Path(work_dir, "nnUNet_preprocessed").resolve()),
        "nnUNet_results": str(Path(work_dir, "nnUNet_results").resolve()),
    }
    loaded = sys.modules.get("nnunetv2.paths")
    if loaded is not None and getattr(loaded, "nnUNet_raw", None) not in (None, paths["nnUNet_raw"]):
        raise OptionError(
            f"nnunet_dir {work_dir}: this process already imported nnU-Net with nnUNet_raw={loaded.nnUNet_raw}; "
            "one process serves one nnunet_dir (run this one in a new process)"
        )
    for k, v in paths.items():
        Path(v).mkdir(parents=True, exist_ok=True)
        os.environ[k] = v
    os.environ.setdefault("nnUNet_n_proc_DA", "0" if not torch.cuda.is_available() else "8")
    return paths


def _runner(work_dir: str, dataset_id: int):
    from monai.apps.nnunet import nnUNetV2Runner

    p = set_paths(work_dir)
    cfg = {
        "dataset_name_or_id": str(int(dataset_id)),
        "nnunet_raw": p["nnUNet_raw"],
        "nnunet_preprocessed": p["nnUNet_preprocessed"],
        "nnunet_results": p["nnUNet_results"],
    }
    return nnUNetV2Runner(cfg, work_dir=work_dir)


def plan_and_preprocess(work_dir: str, dataset_id: int, configuration: str = "3d_fullres", n_proc: int = 2) -> Path:
    """Fingerprint, plan and preprocess one configuration (dataset integrity checked); returns the plans file."""
    runner = _runner(work_dir, dataset_id)
    threads = os.environ.get("OMP_NUM_THREADS")  # the runner sets 1 for its subprocesses; keep ours
    n_da = os.environ["nnUNet_n_proc_DA"]
    os.environ["nnUNet_n_proc_DA"] = str(max(1, int(n_da)))  # the planner sets torch threads to it (0 fails)
    try:
        runner.plan_and_process(
            npfp=n_proc, verify_dataset_integrity=True, c=(configuration,), n_proc=(n_proc,), verbose=False
        )
    finally:
        os.environ["nnUNet_n_proc_DA"] = n_da
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    plans = Path(os.environ["nnUNet_preprocessed"], maybe_convert_to_dataset_name(int(dataset_id)), "nnUNetPlans.json")
    if not plans.is_file():
        raise RuntimeError(f"nnU-Net planning wrote no {plans}")
    return plans


def train(
    work_dir: str,
    dataset_id: int,
    models_dir: str,
    configuration: str = "3d_fullres",
    fold: int = 0,
    device: str | torch.device = "cpu",
    max_epochs: int | None = None,
    epoch_length: int | None = None,
    progress: bool = True,
) -> Path:
    """Train one fold; writes ``models_dir/{plans.json, dataset.json, nnunet_checkpoint.pth, fold_<k>/model.pt}``.

    ``max_epochs`` / ``epoch_length``: None = nnU-Net's own (``num_epochs`` 1000, ``num_iterations_per_epoch``
    250); the poly learning-rate schedule spans ``max_epochs``.
    """
    from ignite.engine import Events
    from monai.apps.nnunet import get_nnunet_trainer
    from monai.engines import SupervisedTrainer
    from monai.handlers import StatsHandler, from_engine

    set_paths(work_dir)
    device = torch.device(device)
    nt = get_nnunet_trainer(str(int(dataset_id)), configuration, fold, device=str(device))
    max_epochs = int(max_epochs or nt.num_epochs)
    epoch_length = int(epoch_length or nt.num_iterations_per_epoch)
    nt.num_epochs = nt.lr_scheduler.max_steps = max_epochs

    def step(engine, batch):  # nnU-Net's own iteration: forward, deep-supervision loss, clip 12, step
        return nt.train_step(batch)

    engine = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        epoch_length=epoch_length,
        train_data_loader=nt.dataloader_train,
        network=nt.network,
        optimizer=nt.optimizer,
        loss_function=nt.loss,
        iteration_update=step,
    )

    @engine.on(Events.EPOCH_STARTED)
    def _epoch_start(e):
        nt.network.train()
        nt.lr_scheduler.step(e.state.epoch - 1)

    StatsHandler(iteration_log=False, output_transform=from_engine(["loss"], first=True), name="fvae_ct").attach(engine)
    if progress:
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=False).attach(engine, output_transform=lambda o: {"loss": float(o["loss"])})
    log.info(
        "nnU-Net %s fold %s on %s: %d epochs x %d iterations, patch %s, batch %d",
        configuration,
        fold,
        device,
        max_epochs,
        epoch_length,
        list(nt.configuration_manager.patch_size),
        nt.configuration_manager.batch_size,
    )
    try:
        engine.run()
        nt.current_epoch = max_epochs
    finally:
        nt.on_train_end()  # writes checkpoint_final.pth (nnU-Net's layout), stops the loaders
    final = Path(nt.output_folder, "checkpoint_final.pth")
    shutil.copyfile(final, Path(nt.output_folder, "checkpoint_best.pth"))  # no selection: best = final
    models = Path(models_dir)
    (models / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):  # the converter keeps existing ones: this run's must win
        (models / name).unlink(missing_ok=True)
    _convert_into(models, nt, fold)
    log.info("nnU-Net model written to %s (fold_%d/model.pt)", models, fold)
    return models / f"fold_{fold}" / "model.pt"


def _convert_into(models: Path, nt, fold: int) -> None:
    """:func:`monai.apps.nnunet.convert_nnunet_to_monai_bundle` (it writes ``<root>/models``), staged, then moved
    into ``models`` file by file (atomic renames)."""
    import tempfile

    from monai.apps.nnunet import convert_nnunet_to_monai_bundle

    with tempfile.TemporaryDirectory(dir=models.parent) as tmp:
        Path(tmp, "models").mkdir()
        convert_nnunet_to_monai_bundle(
            {"dataset_name_or_id": nt.plans_manager.dataset_name, "nnunet_configuration": nt.configuration_name},
            tmp,
            fold=fold,
        )
        for p in Path(tmp, "models").rglob("*"):
            if p.is_file():
                dst = models / p.relative_to(Path(tmp, "models"))
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, dst)


def _spacing_meta(x) -> dict:
    """``{"pixdim": [[1, sx, sy, sz, 1, 1, 1, 1]]}`` from the image's affine (column norms: voxel sizes in the file's
    order, as nnU-Net's NibabelIO reads them), for a batched or an unbatched ``MetaTensor``."""
    return {"pixdim": torch.tensor([[1.0, *spacing_from_affine(x), 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)}


class SpacingnnUNetWrapper(ModelnnUNetWrapper):
    """MONAI's wrapper, fed the true voxel spacing: it reads ``meta["pixdim"][0]`` (right for a collated batch only;
    MONAI Label sends one unbatched image) or else the affine's diagonal (wrong for a rotated or permuted affine).
    Input / output as :class:`~monai.apps.nnunet.ModelnnUNetWrapper`: ``[1, 1, X, Y, Z]``, the input's meta kept."""

    def forward(self, x):
        y = super().forward(MetaTensor(x.as_tensor(), meta=_spacing_meta(x)))
        return MetaTensor(y.as_tensor(), meta=x.meta)


def predictor(
    models_dir: str, fold: int = 0, device: str | torch.device = "cpu", mirroring: bool = True, tile: float = 0.5
):
    """:class:`SpacingnnUNetWrapper` (MONAI's ``ModelnnUNetWrapper``) for ``models_dir/fold_<k>/model.pt`` on
    ``device``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    models = Path(models_dir)
    missing = [n for n in (*MODEL_FILES, f"fold_{fold}/model.pt") if not (models / n).is_file()]
    if missing:
        raise InputError(
            models, f"not an nnU-Net bundle model: missing {', '.join(missing)} (train with nnunet_train.yaml)"
        )
    device = torch.device(device)
    p = nnUNetPredictor(
        tile_step_size=tile,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    return SpacingnnUNetWrapper(p, str(models / f"fold_{fold}"))


def export_servable(models_dir: str, fold: int, class_names) -> Path:
    """``models_dir/model.pt`` (the fold's network weights under :class:`~monai.apps.nnunet.ModelnnUNetWrapper`'s
    state-dict keys, from ``models_dir/nnunet/fold_<k>/model.pt``) and ``models_dir/model.json``
    (``{"network": "nnunet", "nnunet_fold": k, "class_names": [...]}``), both written atomically."""
    models = Path(models_dir)
    src = models / "nnunet" / f"fold_{fold}" / "model.pt"
    if not src.is_file():
        raise InputError(src, "no trained nnU-Net fold to serve (train with nnunet_train.yaml)")
    weights = torch.load(src, map_location="cpu", weights_only=False)["network_weights"]
    tmp = models / f".model.pt.{os.getpid()}.tmp"
    torch.save({f"network_weights.{k}": v for k, v in weights.items()}, tmp)
    os.replace(tmp, models / "model.pt")
    meta = {"network": "nnunet", "nnunet_fold": int(fold), "class_names": list(class_names)}
    write_text_atomic(models / "model.json", json.dumps(meta, indent=1))
    return models / "model.pt"
