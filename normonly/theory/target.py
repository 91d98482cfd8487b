"""The target networks the constructions accept, and interval bounds on their activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["TargetLayer", "target_layers", "interval", "check_bound"]


@dataclass(frozen=True)
class TargetLayer:
    """One ``Linear`` of the target (float64 copies), whether a ``ReLU`` follows it, and its own dtype."""

    weight: Tensor
    bias: Tensor
    relu: bool
    dtype: torch.dtype = torch.float64

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [m for child in module for m in _flatten(child)]
    return [module]


def target_layers(target: nn.Module) -> list[TargetLayer]:
    """Validate ``target`` and return its layers.

    ``target`` is an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` layers, each
    optionally followed by one ``nn.ReLU``, or a single ``nn.Linear``. Anything else raises a
    ``TypeError`` (wrong kind of layer) or ``ValueError`` (sizes or order that do not chain).
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Sequential of nn.Linear and nn.ReLU, got {type(target).__name__}")
    modules = _flatten(target)
    layers: list[list] = []
    for i, m in enumerate(modules):
        if isinstance(m, nn.Linear):
            w = m.weight.detach().to("cpu", torch.float64)
            b = m.bias.detach().to("cpu", torch.float64) if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise ValueError(f"target layer {i} ({m}) has non-finite weights")
            if layers and layers[-1][0].shape[0] != w.shape[1]:
                raise ValueError(
                    f"target sizes do not chain: layer {i} ({m}) takes {w.shape[1]} features but the "
                    f"previous Linear gives {layers[-1][0].shape[0]}"
                )
            layers.append([w, b, False, m.weight.dtype])
        elif isinstance(m, nn.ReLU):
            if not layers or layers[-1][2]:
                raise ValueError(f"target module {i} is a ReLU that does not follow a Linear; use Linear, ReLU, Linear, ...")
            layers[-1][2] = True
        else:
            raise TypeError(
                f"target module {i} is a {type(m).__name__}; the constructions support only nn.Linear "
                "layers each optionally followed by nn.ReLU (an MLP such as Sequential(Linear, ReLU, Linear))"
            )
    if not layers:
        raise ValueError("target has no nn.Linear layer")
    return [TargetLayer(w, b, r, dt) for w, b, r, dt in layers]


def interval(F: Tensor, f: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Exact coordinate-wise range of ``F @ h + f`` over the box ``lo <= h <= hi``."""
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    center, spread = F @ mid + f, F.abs() @ rad
    return center - spread, center + spread


def check_bound(input_bound: float) -> float:
    """``input_bound`` as a positive finite float, or a clear error."""
    if isinstance(input_bound, bool) or not isinstance(input_bound, (int, float)):
        raise TypeError(f"input_bound must be a positive number (the ‖x‖∞ radius), got {input_bound!r}")
    if not (0 < float(input_bound) < float("inf")):
        raise ValueError(f"input_bound must be positive and finite (the ‖x‖∞ radius of the inputs), got {input_bound}")
    return float(input_bound)
