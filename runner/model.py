"""Building the model: by name or `package.module:Class`, checked against the data before training."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.config import setting
from runner.errors import ConfigError, UserError, first_line, shown

if TYPE_CHECKING:
    from torch import nn

# models.REGISTRY's names and models.USER_MODEL's pattern, here so that a config check needs no torch.
BUILT_IN = ["linear", "simple_cnn", "resnet9"]
USER_MODEL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass
class ModelConfig:
    name: str = setting("linear", fingerprint=True)
    kwargs: dict = setting({}, fingerprint=True)
    channels_last: bool = False      # NHWC memory format: faster convolutions with AMX/oneDNN and tensor cores
    compile: bool = False            # torch.compile, applied before the DDP wrap
    sync_batchnorm: bool = False     # BatchNorm statistics over all ranks (several processes only)

    def validate(self):
        if self.name not in BUILT_IN and not USER_MODEL.fullmatch(self.name):
            raise ConfigError(f"model.name={shown(self.name)} is not a known model ({', '.join(BUILT_IN)}) "
                              "nor a user model written as package.module:Class")


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int, data_name: str) -> nn.Module:
    import torch

    import models

    if cfg.sync_batchnorm and not torch.cuda.is_available():
        raise UserError("model.sync_batchnorm=true needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU")
    try:
        model = models.create(cfg.name, cfg.kwargs, in_shape, num_classes)
    except models.ModelNameError as e:
        raise UserError(str(e)) from None
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
