"""Building the model: a built-in name (models/) or a user's `package.module:Class`, imported, built and
checked against the data before training. Naming and checking a model needs no torch, so that the config
check answers before the slow import."""
from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models import REGISTRY
from runner.config import setting
from runner.errors import ConfigError, UserError, first_line, shown

if TYPE_CHECKING:
    from torch import nn

# `package.module:Class`: dotted Python names only, so `:X`, `.foo:X` or `a/b:X` get a clear line rather than
# whatever importlib makes of them (relative imports, empty names).
USER_MODEL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass
class ModelConfig:
    name: str = setting("linear", fingerprint=True)
    kwargs: dict = setting({}, fingerprint=True)
    channels_last: bool = False      # NHWC memory format: faster convolutions with AMX/oneDNN and tensor cores
    compile: bool = False            # torch.compile, applied before the DDP wrap
    sync_batchnorm: bool = False     # BatchNorm statistics over all ranks (several processes only)
    freeze: list[str] | str = setting([], fingerprint=True)  # parameter-name prefixes, or backbone (runner/finetune.py)
    unfreeze_epoch: int = setting(0, min=0, fingerprint=True)  # frozen parameters train from this epoch on (0: never)

    def validate(self):
        check_model_name(self.name)
        check_freeze(self.freeze, self.unfreeze_epoch)


def check_model_name(name: str) -> None:
    if name not in REGISTRY and not USER_MODEL.fullmatch(name):
        raise ConfigError(f"model.name={shown(name)} is not a known model ({', '.join(REGISTRY)}) "
                          "nor a user model written as package.module:Class")


def model_class(name: str) -> type[nn.Module]:
    """The class a model name stands for: a built-in one, or a user's, imported from the current directory."""
    from torch import nn

    check_model_name(name)  # before importlib sees it
    if name in REGISTRY:
        module_name, _, attr = REGISTRY[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:  # `mynet:MyNet` next to the user, under every entry point
        sys.path.append(os.getcwd())
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise UserError(f"model.name={shown(name)}: cannot import it ({type(e).__name__}: "
                        f"{first_line(e)})") from None
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UserError(f"model.name={shown(name)} is not a torch.nn.Module class")
    return cls


def create_model(name: str, kwargs: dict, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the model, passing `in_shape`/`num_classes` only to constructors that accept them."""
    cls = model_class(name)
    params = inspect.signature(cls).parameters
    extra = {k: v for k, v in (("in_shape", tuple(in_shape)), ("num_classes", num_classes))
             if k in params and k not in kwargs}
    try:
        return cls(**extra, **kwargs)
    # A constructor refuses bad sizes in its own way: unknown names (TypeError), a negative width
    # (RuntimeError from torch), its own checks (ValueError).
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"model {name} rejected model.kwargs={shown(kwargs)}: {first_line(e)}") from None


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int, data_name: str) -> nn.Module:
    import torch

    if cfg.sync_batchnorm and not torch.cuda.is_available():
        raise UserError("model.sync_batchnorm=true needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU")
    model = create_model(cfg.name, cfg.kwargs, in_shape, num_classes)
    check_fits(model, cfg.name, in_shape, num_classes, data_name)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_weights(model: nn.Module, checkpoint, name: str) -> nn.Module:
    """A checkpoint's safetensors weights into `model`, or one line naming what does not fit."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(checkpoint / "model.safetensors"), device="cpu")
    except Exception as e:  # safetensors and torch report mismatches with several types
        raise UserError(f"cannot load {checkpoint / 'model.safetensors'} into model {name} "
                        f"({first_line(e)})") from None
    return model


def check_fits(model: nn.Module, name: str, in_shape, num_classes: int, data_name: str) -> None:
    """One forward pass on a dummy batch, so a mismatch is one line now rather than a traceback later."""
    import torch

    shape = "x".join(map(str, in_shape))
    probe = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(2, *in_shape))
    except Exception as e:
        raise UserError(f"model {name} does not accept {data_name} images of shape {shape} "
                        f"({first_line(e)})") from None
    if tuple(out.shape) != (2, num_classes):
        raise UserError(f"model {name} outputs shape {tuple(out.shape[1:])} per image, but {data_name} has "
                        f"{num_classes} classes: expected ({num_classes},)")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: nn.Module, in_shape) -> float:
    """Forward + backward FLOPs of the matrix products (linear and convolution layers) for one sample, as
    torch's FlopCounterMode counts them: forward, weight gradient, and input gradient where one is needed.
    Counted with hooks on one forward pass: FlopCounterMode's import and dispatch cost seconds of start-up."""
    import torch

    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            forward = 2.0 * output[0].numel() * module.weight[0].numel()
            total += forward * (2 + bool(inputs[0].requires_grad))

    probe = copy.deepcopy(model).float().train()
    hooks = [m.register_forward_hook(count) for m in probe.modules()]
    try:
        with torch.enable_grad():
            probe(torch.zeros(1, *in_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def check_freeze(freeze: list[str] | str, unfreeze_epoch: int) -> None:
    """model.freeze holds names (`backbone` alone), and model.unfreeze_epoch needs something frozen."""
    from runner.finetune import BACKBONE, freeze_entries

    entries = freeze_entries(freeze)
    if any(not entry.strip() for entry in entries):
        raise ConfigError(f"model.freeze={shown(freeze)}: expected parameter-name prefixes or backbone, not an "
                          f"empty name")
    if BACKBONE in entries and len(entries) > 1:
        raise ConfigError(f"model.freeze={shown(freeze)}: backbone (everything but the classifier head) stands "
                          f"alone; or list parameter-name prefixes")
    if unfreeze_epoch and not entries:
        raise ConfigError(f"model.unfreeze_epoch={unfreeze_epoch} needs model.freeze (nothing is frozen)")
