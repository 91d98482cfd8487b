"""Set the γ/β of a frozen random network so that it computes a given target network.

This is the "theory" initialization: exact when the widths meet the theorem (d_in·d_out units in
each pair), least squares on the Khatri-Rao system when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .stages import solve_stage
from .structure import check_stage, stages
from .target import check_bound, interval, target_layers

__all__ = ["fit", "FitResult"]


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` achieved: per target layer, ‖F̂ − F‖_F / ‖F‖_F of the realized linear map F̂."""

    layer_residuals: tuple[float, ...]

    @property
    def residual(self) -> float:
        """The largest relative residual over the target's layers (≈1e-13 when exact)."""
        return max(self.layer_residuals)

    @property
    def exact(self) -> bool:
        return self.residual <= 1e-8

    def __float__(self) -> float:
        return self.residual

    def __repr__(self) -> str:
        return f"FitResult(residual={self.residual:.3g}, exact={self.exact}, layers={len(self.layer_residuals)})"


def fit(
    net: nn.Module,
    target: nn.Module,
    *,
    input_bound: float = 1.0,
    margin: float = 1e-2,
    bounds: str = "interval",
) -> FitResult:
    """Set the BatchNorm γ/β of ``net`` (its frozen weights untouched) so that it computes ``target``.

    ``net`` is a frozen random network of the shape ``random_network`` builds (two Linear+BatchNorm1d
    layers per target layer, four for low rank, or SkipLayers), e.g. one you built yourself with
    ``nn.Sequential(Linear(d, d*d), BatchNorm1d(d*d), ReLU(), Linear(d*d, d), BatchNorm1d(d), ...)``.
    When each pair is at least d_in·d_out wide the result equals ``target`` for every input with
    ‖x‖∞ ≤ ``input_bound`` (in eval mode, where BatchNorm uses its running statistics); narrower
    pairs get the least-squares γ and a non-zero residual. β values come from interval bounds on
    each layer's input box (``bounds="norm"`` uses one ‖·‖∞ bound per layer instead, looser),
    enlarged by ``margin``. Nothing is changed when it raises. ``net`` may be a ``NormOnlyModel``: the
    γ/β of its active adapter are set (the "theory" init of an adapter).

    >>> result = theory.fit(net, target)
    >>> result.residual, result.exact
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    if callable(getattr(net, "get_base_model", None)):  # a NormOnlyModel: its active adapter's γ/β live in the base
        net = net.get_base_model()
    if bounds not in ("interval", "norm"):
        raise ValueError(f"bounds must be 'interval' or 'norm', got {bounds!r}")
    if not (isinstance(margin, (int, float)) and margin >= 0):
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    targets = target_layers(target)
    bound = check_bound(input_bound)
    plan = stages(net, targets)
    for j, ((kind, stage), t) in enumerate(zip(plan, targets)):
        check_stage(kind, stage, t, j)

    device = next(m for m in net.modules() if isinstance(m, nn.Linear)).weight.device
    lo = torch.full((targets[0].shape[1],), -bound, dtype=torch.float64, device=device)
    hi = -lo
    assignments, residuals = [], []
    for (kind, stage), t in zip(plan, targets):
        F, f = t.weight.to(device), t.bias.to(device)
        if bounds == "norm":
            r = torch.maximum(lo.abs(), hi.abs()).max()
            lo, hi = -r.expand_as(lo), r.expand_as(hi)
        F_hat, new = solve_stage(kind, stage, F, f, lo, hi, margin)
        assignments += new
        scale = torch.linalg.norm(F)
        err = torch.linalg.norm(F_hat - F)
        residuals.append(float(err / scale) if scale > 0 else float(err))
        lo, hi = interval(F_hat, f, lo, hi)
        if t.relu:
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)

    params = []
    for bn, scale, shift in assignments:
        std = (bn.running_var.to(torch.float64) + bn.eps).sqrt()
        params.append((bn, scale * std, shift + scale * bn.running_mean.to(torch.float64)))
    if not all(torch.isfinite(w).all() and torch.isfinite(b).all() for _, w, b in params):
        raise RuntimeError("the solve produced non-finite γ/β (singular Khatri-Rao system?); nothing was changed")
    with torch.no_grad():
        for bn, w, b in params:
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    return FitResult(tuple(residuals))
