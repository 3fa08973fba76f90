"""Ignite handlers shared by the bundles' trainers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from monai.handlers import from_engine

from .io import write_text_atomic

__all__ = ["LossHistory", "WarmupEMA"]


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
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model, self.decay, self.warmup = model, float(decay), bool(warmup)
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
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(b)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
