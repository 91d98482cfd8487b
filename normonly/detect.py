"""What counts as a normalization layer: a registry of classes plus one structural rule."""

from __future__ import annotations

import re

from torch import nn

__all__ = ["register_norm_layer", "is_norm_layer", "is_frozen_batchnorm", "norm_layers", "NORM_CLASSES"]

# torch's _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants and InstanceNorm*d;
# timm's BatchNormAct2d, GroupNormAct, LayerNorm2d, ... subclass these and are found by isinstance.
NORM_CLASSES: list[type[nn.Module]] = [
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
]

_NORM_NAME = re.compile(r"norm", re.IGNORECASE)


def register_norm_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Teach detection a custom normalization class; usable as a decorator.

    >>> @normonly.register_norm_layer
    ... class MyNorm(nn.Module): ...
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_norm_layer expects an nn.Module subclass, got {cls!r}")
    if cls not in NORM_CLASSES:
        NORM_CLASSES.append(cls)
    return cls


def _children_hold_parameters(module: nn.Module) -> bool:
    return any(True for child in module.children() for _ in child.parameters())


def _looks_like_norm(module: nn.Module) -> bool:
    """Structural rule for library classes we do not list (LlamaRMSNorm, T5LayerNorm, timm RmsNorm, ...):
    the class name says norm, its own parameters are all 1-D and its children hold none."""
    if not _NORM_NAME.search(type(module).__name__):
        return False
    own = list(module.parameters(recurse=False))
    if not own or _children_hold_parameters(module):
        return False
    return all(p.dim() == 1 for p in own if not isinstance(p, nn.parameter.UninitializedParameter))


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision/timm FrozenBatchNorm2d: a norm whose γ/β are buffers, not parameters."""
    if not _NORM_NAME.search(type(module).__name__) or any(True for _ in module.parameters(recurse=False)):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return all(k in buffers and buffers[k].dim() == 1 for k in ("weight", "bias"))


def is_norm_layer(module: nn.Module) -> bool:
    """True if `module` is a normalization layer (registered class, structural rule, or frozen BN)."""
    if isinstance(module, tuple(NORM_CLASSES)):
        return True
    return _looks_like_norm(module) or is_frozen_batchnorm(module)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All normalization layers of `model` as ``(qualified_name, module)``, in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"norm_layers expects an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if is_norm_layer(m)]
