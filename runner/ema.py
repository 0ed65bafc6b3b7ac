"""An exponential moving average (EMA) of the model's weights, kept in float32 beside the training weights.

After every optimizer step, every floating-point entry of the model's state dict (parameters and BatchNorm
running statistics) moves towards the training value: ema += (1 - decay_t) * (weight - ema), with the
warm-up decay_t = min(train.ema_decay, (1 + t) / (10 + t)), t = optimizer steps before this one. Integer
buffers (BatchNorm's batch counter) are copied. The decay is a function of the run's global step, which
every checkpoint holds, and the averaged tensors are checkpointed exactly (`ema.safetensors`): a resumed run
continues the same average rather than restarting it from the resumed weights. Every rank holds the same
training weights after a step, so every rank computes the same average, on any number of processes.

This module is imported by the config check (EMA_FILE); torch is imported inside the functions.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import UserError, first_line

if TYPE_CHECKING:
    from torch import nn

EMA_FILE = "ema.safetensors"
WEIGHT_CHOICES = ("raw", "ema")


def warmup_decay(decay: float, steps_before: int) -> float:
    """Early averages follow the weights closely (0.1 at the first step), later ones settle at `decay`."""
    return min(decay, (1 + steps_before) / (10 + steps_before))


class EmaWeights:
    """The average of `source`'s weights: a float32 copy of the model, built before it is wrapped or
    compiled (so it has the plain forward), on the same device. With decay 0 (train.ema_decay off) it is
    disabled: it holds no copy and averages, saves and loads nothing."""

    def __init__(self, source: nn.Module | None, decay: float, device):
        self.source, self.decay, self.enabled = source, decay, decay > 0
        self.module = None
        if self.enabled:
            import torch

            self.module = copy.deepcopy(source).to(device=device, dtype=torch.float32).eval()
            self.module.requires_grad_(False)

    def update(self, steps_before: int) -> None:
        if not self.enabled:
            return
        import torch

        averaged, weights = [], []
        with torch.no_grad():
            for avg, value in zip(self.module.state_dict().values(), self.source.state_dict().values()):
                if avg.is_floating_point():
                    averaged.append(avg)
                    weights.append(value.to(torch.float32))
                else:
                    avg.copy_(value)
            torch._foreach_lerp_(averaged, weights, 1.0 - warmup_decay(self.decay, steps_before))

    def save(self, path: Path) -> None:
        if not self.enabled:
            return
        from safetensors.torch import save_model

        save_model(self.module, str(path))

    def load(self, path: Path) -> None:
        """Load averaged weights saved by `save` (the checkpoint was verified before)."""
        if self.enabled:
            load_into(self.module, path, "EMA weights")


def load_into(module: nn.Module, path: Path, what: str) -> None:
    """A safetensors file into `module`, every key and shape matching, or one line naming what is wrong."""
    from safetensors.torch import load_model

    if not path.is_file():
        raise UserError(f"{path.parent} holds no {what} ({path.name}): was it trained with train.ema_decay > 0?")
    try:
        load_model(module, str(path), strict=True, device=str(next(module.parameters()).device))
    except Exception as e:  # safetensors and torch report mismatches with several types
        raise UserError(f"cannot load {path} into the model ({first_line(e)})") from None


def choose_weights(checkpoint: Path, asked: str | None) -> str:
    """`--weights raw|ema`: the EMA weights by default when the checkpoint holds them."""
    if asked is None:
        return "ema" if (checkpoint / EMA_FILE).is_file() else "raw"
    if asked not in WEIGHT_CHOICES:
        raise UserError(f"--weights {asked}: expected one of {', '.join(WEIGHT_CHOICES)}")
    if asked == "ema" and not (checkpoint / EMA_FILE).is_file():
        raise UserError(f"--weights ema: {checkpoint} holds no EMA weights (the run had train.ema_decay=0)")
    return asked


def load_chosen_weights(model: nn.Module, checkpoint: Path, weights: str) -> nn.Module:
    """Replace the raw weights already loaded into `model` by the EMA weights, if those are chosen."""
    if weights == "ema":
        load_into(model, checkpoint / EMA_FILE, "EMA weights")
    return model
