"""Building the model: a built-in name (models/), a timm or torchvision model by name, or a user's
`package.module:callable`, imported, built, started from weights if asked, and checked against the data
before training. Naming and checking a model needs no torch, so that the config check answers before the
slow import."""
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

# `package.module:callable`: dotted Python names only, so `:X`, `.foo:X` or `a/b:X` get a clear line rather
# than whatever importlib makes of them (relative imports, empty names).
USER_MODEL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
# `timm:<name>` (tagged names such as resnet18.a1_in1k too) and `torchvision:<name>`: the libraries' own names.
LIBRARY_MODEL = re.compile(r"(timm|torchvision):([A-Za-z0-9_][A-Za-z0-9_.\-]*)")


@dataclass
class ModelConfig:
    name: str = setting("linear", fingerprint=True)
    kwargs: dict = setting({}, fingerprint=True)
    weights: str = ""                # start from: a weights file, a run or one of its checkpoints (path)
    weights_sha256: str = setting("", fingerprint=True)  # recorded when training starts: the weights' identity
    pretrained: bool = setting(False, fingerprint=True)  # timm/torchvision models: their own pretrained weights
    channels_last: bool = False      # NHWC memory format: faster convolutions with AMX/oneDNN and tensor cores
    compile: bool = False            # torch.compile, applied before the DDP wrap
    sync_batchnorm: bool = False     # BatchNorm statistics over all ranks (several processes only)
    freeze: list[str] | str = setting([], fingerprint=True)  # parameter-name prefixes, or backbone (runner/finetune.py)
    unfreeze_epoch: int = setting(0, min=0, fingerprint=True)  # frozen parameters train from this epoch on (0: never)

    def validate(self):
        check_model_name(self.name)
        check_freeze(self.freeze, self.unfreeze_epoch)
        if self.pretrained and not LIBRARY_MODEL.fullmatch(self.name):
            raise ConfigError(f"model.pretrained=true needs a timm:<name> or torchvision:<name> model, not "
                              f"{shown(self.name)}; start another model from a file with model.weights=PATH")
        if self.pretrained and self.weights:
            raise ConfigError("model.pretrained=true and model.weights are both set: start from one of them")


def check_model_name(name: str) -> None:
    if name not in REGISTRY and not LIBRARY_MODEL.fullmatch(name) and not USER_MODEL.fullmatch(name):
        raise ConfigError(f"model.name={shown(name)} is not a known model ({', '.join(REGISTRY)}), "
                          "timm:<name>, torchvision:<name>, nor a user model written as package.module:Class or "
                          "package.module:function")


def model_builder(name: str):
    """The callable a built-in or user model name stands for, imported from the current directory."""
    check_model_name(name)  # before importlib sees it
    if name in REGISTRY:
        module_name, _, attr = REGISTRY[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:  # `mynet:MyNet` next to the user, under every entry point
        sys.path.append(os.getcwd())
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise UserError(f"model.name={shown(name)}: cannot import it ({type(e).__name__}: "
                        f"{first_line(e)})") from None
    if not callable(builder):
        raise UserError(f"model.name={shown(name)} is a {type(builder).__name__}, not a class or function "
                        f"that returns a torch.nn.Module")
    return builder


def sizes_for(builder, kwargs: dict, in_shape: tuple[int, int, int], num_classes: int) -> dict:
    """The data's sizes under the names the builder declares (`in_shape`, `num_classes`, `in_chans`,
    `in_channels`); a builder that forwards **kwargs (torchvision's factories) gets `num_classes`."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        params = {}
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = {"in_shape": tuple(in_shape), "num_classes": num_classes, "in_chans": in_shape[0],
               "in_channels": in_shape[0]}
    return {k: v for k, v in offered.items()
            if k not in kwargs and (k in params or (forwards and k == "num_classes"))}


def library_model(name: str, kwargs: dict, in_shape: tuple[int, int, int], num_classes: int,
                  pretrained: bool) -> nn.Module:
    """`timm:<name>` through timm.create_model, `torchvision:<name>` through torchvision.models.get_model."""
    library, arch = LIBRARY_MODEL.fullmatch(name).groups()
    if library == "timm":
        import timm

        if not timm.is_model(arch):
            raise UserError(f"model.name={shown(name)}: timm has no model {arch} (timm.list_models() lists them)")
        try:
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_shape[0],
                                     **kwargs)
        except OSError:  # the Hugging Face cache lacks the file and there is no network
            if not pretrained:
                raise
            from runner.weights import timm_pretrained_missing

            raise timm_pretrained_missing(arch) from None
    import torchvision

    if arch not in torchvision.models.list_models():
        raise UserError(f"model.name={shown(name)}: torchvision has no model {arch} "
                        f"(torchvision.models.list_models() lists them)")
    if in_shape[0] != 3:
        raise UserError(f"model {name} takes 3-channel images, but the data has {in_shape[0]}: set "
                        f"data.channels=3 (image folders), or use a timm:<name> model, which takes in_chans")
    return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)


def create_model(name: str, kwargs: dict, in_shape: tuple[int, int, int], num_classes: int,
                 pretrained: bool = False) -> nn.Module:
    """Build the model, passing the data's sizes only to builders that take them."""
    from torch import nn

    try:
        if LIBRARY_MODEL.fullmatch(name):
            model = library_model(name, kwargs, in_shape, num_classes, pretrained)
        else:
            builder = model_builder(name)
            model = builder(**sizes_for(builder, kwargs, in_shape, num_classes), **kwargs)
    # A builder refuses bad sizes in its own way: unknown names (TypeError), a negative width
    # (RuntimeError from torch), its own checks (ValueError).
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"model {name} rejected model.kwargs={shown(kwargs)}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name={shown(name)} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int, data_name: str,
                initial_weights: bool = False, log=print) -> nn.Module:
    """The model, checked against the data. With `initial_weights`, started from model.weights or the
    library's pretrained weights (and `log` says which head was re-initialised); without, the architecture
    only, for a caller that loads a checkpoint."""
    import torch

    if cfg.sync_batchnorm and not torch.cuda.is_available():
        raise UserError("model.sync_batchnorm=true needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU")
    model = create_model(cfg.name, cfg.kwargs, in_shape, num_classes, cfg.pretrained and initial_weights)
    if initial_weights:
        for line in start_weights(model, cfg, num_classes):
            log(line)
    check_fits(model, cfg.name, in_shape, num_classes, data_name)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def record_weights_identity(cfg: ModelConfig) -> None:
    """Put model.weights' sha256 into the config, so a changed file is a changed experiment."""
    if not cfg.weights:
        return
    from runner.weights import weights_source

    digest = weights_source(cfg.weights).sha256
    if cfg.weights_sha256 and cfg.weights_sha256 != digest:
        raise UserError(f"model.weights={shown(cfg.weights)} has sha256 {digest}, but model.weights_sha256="
                        f"{cfg.weights_sha256}: the file changed since the run started; use the file it started "
                        f"from, or another run.name")
    cfg.weights_sha256 = digest


def start_weights(model: nn.Module, cfg: ModelConfig, num_classes: int) -> list[str]:
    """Load model.weights, or torchvision's pretrained weights (timm loads its own in create_model);
    returns the lines that say which classifier head was re-initialised."""
    from runner import weights

    if cfg.weights:
        state = weights.read_state_dict(cfg.weights)
        return weights.start_from(model, state, num_classes, f"model.weights={cfg.weights}")
    if not cfg.pretrained:
        return []
    library, arch = LIBRARY_MODEL.fullmatch(cfg.name).groups()
    if library == "timm":
        return weights.timm_head_note(model, arch, num_classes)
    return weights.start_from(model, weights.torchvision_pretrained(arch), num_classes,
                              f"torchvision:{arch} pretrained weights")


def pretrained_preprocessing(cfg: ModelConfig) -> dict | None:
    """With model.pretrained: the input size, mean and std the library's weights were trained with, which
    become the data's defaults (None otherwise)."""
    if not cfg.pretrained:
        return None
    library, arch = LIBRARY_MODEL.fullmatch(cfg.name).groups()
    if library == "timm":
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(arch)
        if pretrained is None:
            raise UserError(f"model.pretrained=true: timm has no pretrained weights for {arch}")
        return {"image_size": list(pretrained.input_size[1:]), "mean": list(pretrained.mean),
                "std": list(pretrained.std)}
    from torchvision.models import get_model_weights

    try:
        transform = get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):  # an unknown name, or a model without weights
        raise UserError(f"model.pretrained=true: torchvision has no pretrained weights for {arch}") from None
    return {"image_size": list(transform.crop_size) * (2 // len(transform.crop_size)),
            "mean": list(transform.mean), "std": list(transform.std)}


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
    Counted with hooks on one forward pass: FlopCounterMode's import and dispatch cost seconds of start-up.
    The pass runs in eval mode on two samples (counting the first): in train mode BatchNorm refuses a batch
    whose feature maps shrink to one value per channel."""
    import torch

    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            forward = 2.0 * output[0].numel() * module.weight[0].numel()
            total += forward * (2 + bool(inputs[0].requires_grad))

    probe = copy.deepcopy(model).float().eval()
    hooks = [m.register_forward_hook(count) for m in probe.modules()]
    try:
        with torch.enable_grad():
            probe(torch.zeros(2, *in_shape))
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
