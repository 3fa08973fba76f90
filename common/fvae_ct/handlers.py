"""Ignite handlers shared by the bundles' trainers."""

from __future__ import annotations

import json
from pathlib import Path

from monai.handlers import from_engine

from .io import write_text_atomic

__all__ = ["LossHistory"]


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
