"""Starting a model from weights: `model.weights=PATH` (a safetensors file, a PyTorch state dict or
checkpoint read with weights_only=True, or a run of this runner and its checkpoints) and
`model.pretrained=true` (timm's and torchvision's own weights, from their usual caches).

Keys are matched by name once the usual wrappers (`module.`, `_orig_mod.`, `model.`) are stripped. A
classifier head that differs only in its class count is re-initialised and named; any other missing,
unexpected or mis-shaped key is one line. Naming and hashing the source needs no torch (the run's
fingerprint includes the file's sha256, computed once per process).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import UserError, first_line, shown
from runner.yaml_files import not_a_regular_file

if TYPE_CHECKING:
    from torch import Tensor, nn

WRAPPERS = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning-style and EMA wrappers
NESTED = ("state_dict", "model_state_dict", "model", "module")  # where checkpoints keep the weights
SHOWN_KEYS = 3


@dataclass(frozen=True)
class WeightsSource:
    file: Path      # the file read: the weights file itself, or a checkpoint's model.safetensors
    sha256: str


def weights_source(path: str) -> WeightsSource:
    """The file `model.weights` names and its sha256 (a checkpoint's from its verified manifest), hashed once
    per version of the path (its size and mtime)."""
    try:
        version = Path(path).stat()
    except OSError:
        raise UserError(f"model.weights={shown(path)} does not exist") from None
    return hashed_source(path, version.st_size, version.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def hashed_source(path: str, size: int, mtime_ns: int) -> WeightsSource:
    from runner.checkpoint import CheckpointError, find, read_manifest, sha256

    given = Path(path)
    if given.is_dir():
        try:
            checkpoint = find(given)
        except CheckpointError as e:
            raise UserError(f"model.weights={shown(path)}: {e}") from None
        return WeightsSource(checkpoint / "model.safetensors",
                             read_manifest(checkpoint)["files"]["model.safetensors"]["sha256"])
    kind = not_a_regular_file(given)
    if kind:
        raise UserError(f"model.weights={shown(path)} is {kind}, not a weights file")
    try:
        return WeightsSource(given, sha256(given))
    except OSError as e:
        raise UserError(f"model.weights={shown(path)}: cannot read it ({e.strerror})") from None


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of `model.weights`: safetensors, or torch.load with weights_only (never code)."""
    import torch
    from safetensors.torch import load_file

    file = weights_source(path).file
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and torch each raise their own types
        raise UserError(f"model.weights={shown(path)} is neither a safetensors file nor a state dict that loads "
                        f"with weights_only=True; nothing in it was run ({first_line(e)})") from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights={shown(path)} holds no state dict (a mapping of names to tensors)")
    return state


def plain_name(key: str) -> str:
    while key.startswith(WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def is_head(target: Tensor, source: Tensor, num_classes: int) -> bool:
    """A classifier head's tensor that differs only in its class count (its first dimension)."""
    return (target.shape[0] == num_classes and source.dim() == target.dim() and source.shape[0] != num_classes
            and source.shape[1:] == target.shape[1:])


def start_from(model: nn.Module, state: dict[str, Tensor], num_classes: int, where: str) -> list[str]:
    """Load `state` into `model`, leaving a differing classifier head as initialised; returns the lines
    that say so. Anything else that does not fit is one UserError naming the first keys."""
    target = {plain_name(k): k for k in model.state_dict()}
    shapes = {plain: model.state_dict()[key].shape for plain, key in target.items()}
    source = {plain_name(k): v for k, v in state.items()}
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    misshaped = [k for k in target if k in source and source[k].shape != shapes[k]]
    head = [k for k in misshaped if is_head(model.state_dict()[target[k]], source[k], num_classes)]
    wrong = [(what, keys) for what, keys in (("missing", missing), ("unexpected", unexpected),
             ("mis-shaped", [k for k in misshaped if k not in head])) if keys]
    if wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:SHOWN_KEYS])}{' ...' if len(keys) > SHOWN_KEYS else ''}"
                           f" ({len(keys)})" for what, keys in wrong)
        raise UserError(f"{where} does not fit the model ({detail})")
    model.load_state_dict({target[k]: source[k] for k in target if k not in head}, strict=False)
    classes_before = {k.rsplit(".", 1)[0]: source[k].shape[0] for k in head}
    return [f"{where}: classifier head {layer} re-initialised for {num_classes} classes (the weights have {n})"
            for layer, n in sorted(classes_before.items())]


def timm_head_note(model: nn.Module, arch: str, num_classes: int) -> list[str]:
    """timm re-initialises a head of another class count itself; say so as start_from does."""
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(arch)
    if pretrained is None or pretrained.num_classes in (None, num_classes):
        return []
    return [f"timm:{arch} pretrained weights: classifier head {pretrained.classifier} re-initialised for "
            f"{num_classes} classes (the weights have {pretrained.num_classes})"]


def torchvision_pretrained(arch: str) -> dict[str, Tensor]:
    """torchvision's default weights for `arch`, from torch hub's cache (downloaded only where allowed)."""
    import torch
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file() and os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes"):
        raise missing_pretrained(f"torchvision:{arch}", weights.url, cached)
    try:
        return weights.get_state_dict(progress=False)
    except OSError:  # no network (URLError is an OSError)
        raise missing_pretrained(f"torchvision:{arch}", weights.url, cached) from None


def timm_pretrained_missing(arch: str) -> UserError:
    """timm found neither the weights in the Hugging Face cache nor a network to fetch them."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from timm.models import get_pretrained_cfg

    hub_id = getattr(get_pretrained_cfg(arch), "hf_hub_id", None) or arch
    folder = Path(HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    return missing_pretrained(f"timm:{arch}", f"https://huggingface.co/{hub_id} (model.safetensors)", folder)


def missing_pretrained(name: str, source: str, cached: Path) -> UserError:
    return UserError(f"model.pretrained=true: the weights of {name} are not cached at {cached} and cannot be "
                     f"downloaded here; fetch {source} once on a machine with network (into that cache), or "
                     f"save the file and pass model.weights=FILE")
