"""Transfer-learning controls: the classifier head, and freezing part of a model until an epoch.

`model.freeze` names parameter-name prefixes (a prefix matches whole dotted components: `net.1` matches
`net.1.0.weight`, not `net.10.weight`), or `backbone`: everything but the classifier head. The head is
`model.get_classifier()` where the model has one (timm), else the last nn.Linear with out_features, or
nn.Conv2d with out_channels, equal to the number of classes (the built-in models, torchvision's classifiers,
squeezenet's 1x1 convolution).

Frozen parameters have requires_grad=False, so they get no gradient, hence no optimizer state and no weight
decay (the optimizer skips parameters without a gradient), and their BatchNorm modules stay in eval mode
(running statistics fixed), even after model.train(). After `model.unfreeze_epoch` epochs (0: never) they
train again. DDP builds its gradient buckets from the parameters that require a gradient when it wraps the
model, so on several processes the model is wrapped again at that moment; the loop checks it at every epoch
start, including the first one after a resume, so a resumed run unfreezes exactly where the original did.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from runner.errors import UserError, shown

if TYPE_CHECKING:
    from torch import nn

BACKBONE = "backbone"


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def classifier_head(model: nn.Module, num_classes: int, model_name: str) -> list[str]:
    """The module names of the classifier head (see the module docstring), or one line saying none was found."""
    from torch import nn

    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        names = [n for n, m in model.named_modules() if n and any(m is h for h in heads)]
        if names and any(p.numel() for n in names for p in model.get_submodule(n).parameters()):
            return names
    outputs = [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) and m.out_features == num_classes)
               or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    if not outputs:
        raise UserError(f"cannot find the classifier head of model {model_name} (no get_classifier(), no "
                        f"nn.Linear or nn.Conv2d with {num_classes} outputs); name the frozen parts in "
                        f"model.freeze=[prefix, ...]")
    return outputs[-1:]


def is_head(name: str, head: list[str]) -> bool:
    return any(under(name, h) for h in head)


class Freezing:
    """Which parameters and norm modules model.freeze holds fixed, and until which epoch (0: the whole run).
    Without model.freeze it is disabled: it freezes nothing and the header says nothing of it."""

    def __init__(self, model: nn.Module, entries: list[str], head: list[str] | None, until_epoch: int,
                 model_name: str):
        from torch.nn.modules.batchnorm import _NormBase

        self.enabled, self.until_epoch, self.hooks, self.active = bool(entries), until_epoch, [], False
        self.params, self.norms = [], []
        if not self.enabled:
            return

        def frozen(name: str) -> bool:
            return not is_head(name, head) if entries == [BACKBONE] else any(under(name, p) for p in entries)

        names = [n for n, _ in model.named_parameters()]
        unmatched = [p for p in entries if p != BACKBONE and not any(under(n, p) for n in names)]
        if unmatched:
            tops = sorted({n.split(".")[0] for n in names})
            raise UserError(f"model.freeze: {shown(unmatched[0])} matches no parameter of model {model_name} "
                            f"(its parameter names start with: {', '.join(tops)})")
        self.params = [p for n, p in model.named_parameters() if frozen(n)]
        if len(self.params) == len(names):
            raise UserError(f"model.freeze={shown(entries)} freezes every parameter of model {model_name}; "
                            f"nothing would train")
        # A norm module under a frozen prefix keeps its statistics too (a prefix naming only its weight does not).
        self.norms = [m for n, m in model.named_modules() if n and isinstance(m, _NormBase) and frozen(n)]
        self.total = sum(p.numel() for p in model.parameters())

    def freeze(self) -> None:
        if not self.enabled:
            return
        for p in self.params:
            p.requires_grad_(False)
        self.hooks = [m.register_forward_pre_hook(keep_in_eval_mode) for m in self.norms]
        self.active = True

    def describe(self) -> str:
        """For the header, after the parameter count: how many train, and for how long the others wait."""
        if not self.enabled:
            return ""
        fixed = sum(p.numel() for p in self.params)
        until = f"until epoch {self.until_epoch + 1}" if self.until_epoch else "for the whole run"
        return f" ({self.total - fixed:,} train, {fixed:,} frozen {until})"

    def at_epoch(self, model, epoch: int, acc):
        """At the start of an epoch: unfreeze if it is time; returns the model to train (re-wrapped for DDP)."""
        if not (self.active and self.until_epoch and epoch >= self.until_epoch):
            return model
        for hook in self.hooks:
            hook.remove()
        for p in self.params:
            p.requires_grad_(True)
        self.active = False
        return rewrap_ddp(model, acc)


def keep_in_eval_mode(module, args) -> None:
    """A frozen norm module normalises with its running statistics and never updates them."""
    module.training = False


def rewrap_ddp(model, acc):
    """A new DDP wrapper around the same module, so that its buckets include the parameters that now train
    (a collective: every rank calls it at the same step). Accelerate keeps the unwrapped module for saving."""
    import torch

    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    kwargs = acc.ddp_handler.to_kwargs() if acc.ddp_handler is not None else {}
    wrapped = torch.nn.parallel.DistributedDataParallel(model.module, device_ids=model.device_ids,
                                                        output_device=model.output_device, **kwargs)
    if acc.ddp_handler is not None:
        acc.ddp_handler.register_comm_hook(wrapped)
    return wrapped


def freeze_entries(freeze: list[str] | str) -> list[str]:
    """model.freeze as a list (a single prefix or `backbone` may be given as a string)."""
    return [freeze] if isinstance(freeze, str) and freeze else list(freeze or [])


def fine_tuning(model: nn.Module, model_name: str, num_classes: int, freeze: list[str] | str, unfreeze_epoch: int,
                backbone_lr_factor: float):
    """(model.freeze applied; the classifier head where the backbone is frozen or has its own lr)."""
    entries = freeze_entries(freeze)
    head = None
    if entries == [BACKBONE] or backbone_lr_factor != 1:
        head = classifier_head(model, num_classes, model_name)
    freezing = Freezing(model, entries, head, unfreeze_epoch, model_name)
    freezing.freeze()
    return freezing, head
