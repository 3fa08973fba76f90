"""Ignite handlers shared by the bundles' trainers."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from monai.handlers import from_engine

from .errors import OptionError
from .outputs import write_text_atomic

__all__ = ["LossHistory", "WarmupEMA", "SaveFinalModel"]

log = logging.getLogger("fvae_ct")


class LossHistory:
    """Ignite handler writing the training loss of every iteration to ``<output_dir>/train_loss.json``."""

    def __init__(self, output_dir: str, loss_transform=None):
        self.path = Path(output_dir) / "train_loss.json"
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.losses: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _iteration(self, engine) -> None:
        self.losses.append(float(self.loss_transform(engine.state.output)))
        if engine.state.iteration % 50 == 0:
            self._write(engine)

    def _write(self, engine=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"loss": self.losses}))


class WarmupEMA:
    """Exponential moving average of a network's weights with a warm-up: after update ``n`` the decay is
    ``min(decay, (1 + n) / (10 + n))``, so the average follows the weights early on instead of staying at their
    random initial values (a fixed 0.9999 would still hold 61 % of them after 5000 updates).

    ``ema_model``: the averaged copy (buffers copied as they are). ``attach(engine)`` updates it after every
    iteration; ``warmup=False`` gives the plain fixed decay; ``decay=0`` makes the copy follow the weights exactly.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        try:
            rate = float(decay)
        except (TypeError, ValueError):
            rate = float("nan")
        if not 0.0 <= rate < 1.0:
            raise OptionError(f"ema_decay {decay!r}: give a decay in [0, 1) (0: the copy follows the weights)")
        self.model, self.decay, self.warmup = model, rate, bool(warmup)
        self.ema_model = copy.deepcopy(model).eval()
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, engine=None) -> None:
        self.updates += 1
        d = self.current_decay()
        for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
        for eb, b in zip(self.ema_model.buffers(), self.model.buffers()):
            eb.copy_(b)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)


def _file_state(p: Path):
    return (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None


class SaveFinalModel:
    """Trainer handler: training always ends with a model in ``<ckpt_dir>/<filename>`` and its network record
    ``model.json``, also when validation never ran (an empty validation split: e.g. MONAI Label's default
    ``val_split`` 0.2 of 1 or 2 labelled images, where the best-Dice ``CheckpointSaver`` saves nothing).

    - at the start: one warning line when ``val_data`` (the validation list) is empty;
    - at the end: when validation ran and saved a model during this run (``evaluator.state.best_metric_epoch`` set
      and the file rewritten), ``model.pt`` stays that validation-selected best model; else the network's last-epoch
      weights are saved there (a flat ``state_dict``, written atomically). Either way one log line says which, and
      ``model.json`` (``config`` plus ``selected_by``: ``validation`` | ``last_epoch``, ``best_metric``,
      ``best_epoch``, ``epochs``) records it.

    Args:
        network: the trained network (DDP / DataParallel unwrapped).
        ckpt_dir: folder of ``model.pt`` / ``model.json``.
        config: the network record (sizes, class names, ...) written to ``model.json``.
        evaluator: the validation evaluator (its ``state.best_metric*``), or None.
        val_data: the validation list (for the empty-validation warning), or None.
        key_metric: name of the validation metric, for the log.
    """

    def __init__(
        self,
        network,
        ckpt_dir: str,
        config: dict,
        evaluator=None,
        val_data=None,
        filename: str = "model.pt",
        key_metric: str = "val_mean_dice",
    ):
        self.network = network
        self.path = Path(ckpt_dir) / filename
        self.json_path = Path(ckpt_dir) / "model.json"
        self.config = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dict(config).items()}
        self.evaluator = evaluator
        self.val_data = val_data
        self.key_metric = key_metric
        self._before = None
        self.selected_by: str | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._before = _file_state(self.path)
        if self.val_data is not None and len(self.val_data) == 0:
            n_train = len(getattr(getattr(engine.state, "dataloader", None), "dataset", None) or [])
            log.warning(
                "validation is empty (0 validation cases, %d training cases; e.g. val_split 0.2 of fewer than 3 "
                "labelled images): no validation-selected model, %s will be the last epoch's weights",
                n_train,
                self.path,
            )

    def _completed(self, engine) -> None:
        state = getattr(self.evaluator, "state", None)
        best_epoch = int(getattr(state, "best_metric_epoch", -1) or -1)
        best = getattr(state, "best_metric", None)
        after = _file_state(self.path)
        epochs = int(engine.state.epoch)
        if best_epoch > 0 and after is not None and after != self._before:
            self.selected_by = "validation"
            assert best is not None  # best_metric_epoch > 0: the evaluator recorded its best metric
            record = {"selected_by": "validation", "best_metric": float(best), "best_epoch": best_epoch}
            log.info(
                "%s: the validation-selected model (best %s %.4f at epoch %d of %d); the last epoch is not saved",
                self.path,
                self.key_metric,
                float(best),
                best_epoch,
                epochs,
            )
        else:
            self.selected_by = "last_epoch"
            net = getattr(self.network, "module", self.network)  # DDP / DataParallel
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            torch.save(net.state_dict(), tmp)
            os.replace(tmp, self.path)
            record = {"selected_by": "last_epoch", "best_metric": None, "best_epoch": None}
            log.info(
                "%s: the last epoch's weights (epoch %d; %s), not selected by validation",
                self.path,
                epochs,
                "validation never ran" if best_epoch <= 0 else "validation saved no model",
            )
        write_text_atomic(self.json_path, json.dumps({**self.config, **record, "epochs": epochs}, indent=1))
