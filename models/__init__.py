"""Models by name, or a user's own class as `package.module:Class`.

Every built-in model takes the data's `in_shape` (C, H, W) and `num_classes` and sizes itself; a kwarg
such as `in_features` pins a size so that a mismatched dataset is caught before training.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from models.cnn import SimpleCNN
from models.linear import LinearClassifier
from models.resnet9 import ResNet9
from runner.errors import first_line, shown
from runner.model import USER_MODEL  # one pattern for the config check and the import

REGISTRY: dict[str, type[nn.Module]] = {
    "linear": LinearClassifier,
    "simple_cnn": SimpleCNN,
    "resnet9": ResNet9,
}


class ModelNameError(ValueError):
    pass


# `package.module:Class`: dotted Python names only, so `:X`, `.foo:X` or `a/b:X` get a clear line rather than
# whatever importlib makes of them (relative imports, empty names).


def resolve(name: str) -> type[nn.Module]:
    if name in REGISTRY:
        return REGISTRY[name]
    if not USER_MODEL.fullmatch(name):
        raise ModelNameError(f"model.name={shown(name)} is not a known model ({', '.join(REGISTRY)}) "
                             "nor a user model written as package.module:Class")
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:  # `mynet:MyNet` next to the user, under every entry point
        sys.path.append(os.getcwd())
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ModelNameError(f"model.name={shown(name)}: cannot import it ({type(e).__name__}: "
                             f"{first_line(e)})") from None
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ModelNameError(f"model.name={shown(name)} is not a torch.nn.Module class")
    return cls


def create(name: str, kwargs: dict, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the model, passing `in_shape`/`num_classes` only to constructors that accept them."""
    cls = resolve(name)
    params = inspect.signature(cls).parameters
    extra = {k: v for k, v in (("in_shape", tuple(in_shape)), ("num_classes", num_classes))
             if k in params and k not in kwargs}
    try:
        return cls(**extra, **kwargs)
    # A constructor refuses bad sizes in its own way: unknown names (TypeError), a negative width
    # (RuntimeError from torch), its own checks (ValueError).
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelNameError(f"model {name} rejected model.kwargs={shown(kwargs)}: {first_line(e)}") from None
