"""Optimizers (SGD with momentum/Nesterov, Adam, AdamW, RMSprop), L2 as weight decay, and an L1 penalty."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.config import setting
from runner.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

NAMES = ["sgd", "adam", "adamw", "rmsprop"]


@dataclass
class OptimConfig:
    name: str = setting("sgd", choices=NAMES, fingerprint=True)
    lr: float = setting(0.01, above=0.0, fingerprint=True)
    momentum: float = setting(0.0, min=0.0, max=1.0, fingerprint=True)  # sgd, rmsprop
    nesterov: bool = setting(False, fingerprint=True)  # sgd
    weight_decay: float = setting(0.0, min=0.0, fingerprint=True)  # L2
    l1: float = setting(0.0, min=0.0, fingerprint=True)  # L1 penalty on weights, added to the loss
    betas: list[float] = setting([0.9, 0.999], fingerprint=True)  # adam, adamw
    eps: float = setting(1e-8, above=0.0, fingerprint=True)
    alpha: float = setting(0.99, above=0.0, max=1.0, fingerprint=True)  # rmsprop smoothing
    decay_norm_and_bias: bool = setting(True, fingerprint=True)  # false: no weight decay on 1-d parameters

    def validate(self):
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas}: expected two numbers in [0, 1)")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    if cfg.decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    import torch

    groups = param_groups(model, cfg)
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, betas=tuple(cfg.betas), eps=cfg.eps, **common)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, **common)
    return torch.optim.RMSprop(groups, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, **common)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over weight matrices and kernels (biases and norm scales are left alone)."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim > 1)
