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
    backbone_lr_factor: float = setting(1.0, min=0.0, fingerprint=True)  # lr of all but the classifier head, x lr

    def validate(self):
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas}: expected two numbers in [0, 1)")


def param_groups(model: nn.Module, cfg: OptimConfig, head: list[str] | None = None) -> list[dict]:
    """The parameter groups: the classifier head first (its lr is the one reported), then the backbone at
    optim.backbone_lr_factor x lr when a head is given; each split by weight decay when
    decay_norm_and_bias=false. Every parameter is included, frozen ones too: they have no gradient while
    frozen, so the optimizer skips them (no state, no weight decay) until they train."""
    from runner.finetune import is_head

    named = list(model.named_parameters())
    parts = [(named, 1.0)]
    if head is not None:
        parts = [([(n, p) for n, p in named if is_head(n, head)], 1.0),
                 ([(n, p) for n, p in named if not is_head(n, head)], cfg.backbone_lr_factor)]
    groups = []
    for params, factor in parts:
        lr = {"lr": cfg.lr * factor}
        if cfg.decay_norm_and_bias:
            groups.append({"params": [p for _, p in params], **lr})
        else:
            groups += [{"params": [p for _, p in params if p.ndim > 1], **lr},
                       {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0, **lr}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, head: list[str] | None = None) -> torch.optim.Optimizer:
    import torch

    groups = param_groups(model, cfg, head)
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
