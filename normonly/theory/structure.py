"""Read a frozen random network as one stage per target layer: pairs, chains of two pairs, or SkipLayers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .skip import SkipLayer
from .target import TargetLayer

__all__ = ["Layer", "stages", "check_stage"]

SUPPORTED = (
    "fit supports nets whose Linear layers are each followed by a BatchNorm1d (affine, with running "
    "statistics) and optionally a ReLU, with 2 such layers per target layer (wide/sparse), 4 (low rank) "
    "or one SkipLayer per target layer, as theory.random_network builds them"
)


@dataclass(frozen=True)
class Layer:
    """One frozen ``Linear``, the ``BatchNorm1d`` after it, and whether a ``ReLU`` follows."""

    linear: nn.Linear
    bn: nn.BatchNorm1d
    relu: bool

    @property
    def W(self) -> Tensor:
        return self.linear.weight.detach().to(torch.float64)

    @property
    def c(self) -> Tensor:
        b = self.linear.bias
        return b.detach().to(torch.float64) if b is not None else self.W.new_zeros(self.linear.out_features)


def _layers(modules: list[nn.Module], where: str) -> list[Layer]:
    """Parse Linear, BatchNorm1d[, ReLU] runs; raise a clear error on anything else."""
    out, i = [], 0
    while i < len(modules):
        lin = modules[i]
        bn = modules[i + 1] if i + 1 < len(modules) else None
        if not isinstance(lin, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
            found = type(lin).__name__ if not isinstance(lin, nn.Linear) else f"Linear then {type(bn).__name__}"
            raise ValueError(f"{where}: module {i} is a {found}. {SUPPORTED}")
        if not bn.affine or bn.running_var is None or bn.num_features != lin.out_features:
            raise ValueError(
                f"{where}: module {i + 1} must be BatchNorm1d({lin.out_features}, affine=True, "
                f"track_running_stats=True), got {bn}. {SUPPORTED}"
            )
        relu = i + 2 < len(modules) and isinstance(modules[i + 2], nn.ReLU)
        out.append(Layer(lin, bn, relu))
        i += 3 if relu else 2
    return out


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [m for child in module for m in _flatten(child)]
    return [module]


def stages(net: nn.Module, targets: list[TargetLayer]) -> list[tuple[str, object]]:
    """Group the net into one stage per target layer: ('pair', 2 layers), ('chain', 4) or ('skip', SkipLayer)."""
    modules = _flatten(net)
    n = len(targets)
    if any(isinstance(m, SkipLayer) for m in modules):
        if not all(isinstance(m, SkipLayer) for m in modules) or len(modules) != n:
            raise ValueError(f"a net with SkipLayers needs exactly one SkipLayer per target layer ({n}). {SUPPORTED}")
        stages = []
        for j, s in enumerate(modules):
            pairs = [_layers(_flatten(b), f"SkipLayer {j} branch {i}") for i, b in enumerate(s.branches)]
            if any(len(p) != 2 or not p[0].relu or p[1].relu for p in pairs):
                raise ValueError(f"SkipLayer {j}: each branch must be Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d")
            stages.append(("skip", (s, pairs)))
        return stages
    layers = _layers(modules, type(net).__name__)
    per = len(layers) // n
    if per not in (2, 4) or per * n != len(layers):
        raise ValueError(
            f"the net has {len(layers)} Linear+BatchNorm1d layers for a target of {n} layers; "
            f"need {2 * n} (two per target layer) or {4 * n} (four, low rank). {SUPPORTED}"
        )
    return [("pair" if per == 2 else "chain", layers[per * j : per * (j + 1)]) for j in range(n)]


def check_stage(kind: str, stage, t: TargetLayer, j: int) -> None:
    d_out, d_in = t.shape
    if kind == "skip":
        layer, pairs = stage
        cover = [i for a, b in layer.blocks for i in range(a, b)]
        ins = [p[0].linear.in_features for p in pairs]
        ok = cover == list(range(d_in)) and ins == [b - a for a, b in layer.blocks]
        ok = ok and all(p[0].linear.out_features == p[1].linear.in_features and p[1].linear.out_features == d_out
                        for p in pairs)
        relu = layer.relu
    else:
        ok = stage[0].linear.in_features == d_in and stage[-1].linear.out_features == d_out
        ok = ok and all(a.linear.out_features == b.linear.in_features for a, b in zip(stage, stage[1:]))
        relu = stage[-1].relu
    if not ok:
        raise ValueError(f"the net's stage {j} does not map {d_in} -> {d_out} features like target layer {j}")
    if relu != t.relu:
        have = "applies" if relu else "does not apply"
        raise ValueError(
            f"the net's stage {j} {have} a ReLU at its output but target layer {j} "
            f"{'has' if t.relu else 'has no'} ReLU; the ReLU pattern must match"
        )
