"""Set the γ/β of a frozen random network so that it computes a given target network.

This is the "theory" initialization: exact when the widths meet the theorem (d_in·d_out units in
each pair), least squares on the Khatri-Rao system when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .khatri_rao_system import pair_map, solve_pair
from .skip import SkipLayer
from .target import TargetLayer, check_bound, interval, target_layers

__all__ = ["fit", "FitResult"]

_SUPPORTED = (
    "fit supports nets whose Linear layers are each followed by a BatchNorm1d (affine, with running "
    "statistics) and optionally a ReLU, with 2 such layers per target layer (wide/sparse), 4 (low rank) "
    "or one SkipLayer per target layer, as theory.random_network builds them"
)


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


@dataclass(frozen=True)
class _Layer:
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


def _layers(modules: list[nn.Module], where: str) -> list[_Layer]:
    """Parse Linear, BatchNorm1d[, ReLU] runs; raise a clear error on anything else."""
    out, i = [], 0
    while i < len(modules):
        lin = modules[i]
        bn = modules[i + 1] if i + 1 < len(modules) else None
        if not isinstance(lin, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
            found = type(lin).__name__ if not isinstance(lin, nn.Linear) else f"Linear then {type(bn).__name__}"
            raise ValueError(f"{where}: module {i} is a {found}. {_SUPPORTED}")
        if not bn.affine or bn.running_var is None or bn.num_features != lin.out_features:
            raise ValueError(
                f"{where}: module {i + 1} must be BatchNorm1d({lin.out_features}, affine=True, "
                f"track_running_stats=True), got {bn}. {_SUPPORTED}"
            )
        relu = i + 2 < len(modules) and isinstance(modules[i + 2], nn.ReLU)
        out.append(_Layer(lin, bn, relu))
        i += 3 if relu else 2
    return out


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [m for child in module for m in _flatten(child)]
    return [module]


def _stages(net: nn.Module, targets: list[TargetLayer]) -> list[tuple[str, object]]:
    """Group the net into one stage per target layer: ('pair', 2 layers), ('chain', 4) or ('skip', SkipLayer)."""
    modules = _flatten(net)
    n = len(targets)
    if any(isinstance(m, SkipLayer) for m in modules):
        if not all(isinstance(m, SkipLayer) for m in modules) or len(modules) != n:
            raise ValueError(f"a net with SkipLayers needs exactly one SkipLayer per target layer ({n}). {_SUPPORTED}")
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
            f"need {2 * n} (two per target layer) or {4 * n} (four, low rank). {_SUPPORTED}"
        )
    return [("pair" if per == 2 else "chain", layers[per * j : per * (j + 1)]) for j in range(n)]


def _check_dims(kind: str, stage, t: TargetLayer, j: int) -> None:
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


def _gamma(A: _Layer, B: _Layer, F: Tensor) -> tuple[Tensor, Tensor]:
    gamma, _ = solve_pair(A.W, B.W, F)
    return gamma, pair_map(A.W, B.W, gamma)


def _betas(A: _Layer, B: _Layer, gamma: Tensor, f: Tensor, lo: Tensor, hi: Tensor, margin: float) -> list:
    """β of the first layer turns its every ReLU on over the box; β of the second cancels the shift and adds f."""
    G, g0 = gamma[:, None] * A.W, gamma * A.c
    beta_a = (-interval(G, g0, lo, hi)[0]).clamp(min=0) * (1 + margin) if A.relu else torch.zeros_like(gamma)
    beta_b = f - (B.W @ (g0 + beta_a) + B.c)
    return [(A.bn, gamma, beta_a), (B.bn, torch.ones_like(beta_b), beta_b)]


def _shift(F: Tensor, lo: Tensor, hi: Tensor, margin: float) -> Tensor:
    """Smallest (plus margin) c with F h + c >= 0 over the box."""
    return (-interval(F, torch.zeros_like(F[:, 0]), lo, hi)[0]).clamp(min=0) * (1 + margin)


def _factor(F: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """F ≈ U V with U (d_out × r), V (r × d_in), balanced through the SVD (exact when r >= rank F)."""
    P, S, Qh = torch.linalg.svd(F, full_matrices=False)
    t = min(r, S.numel())
    root = S[:t].sqrt()
    U, V = F.new_zeros(F.shape[0], r), F.new_zeros(r, F.shape[1])
    U[:, :t], V[:t] = P[:, :t] * root, root[:, None] * Qh[:t]
    return U, V


def _solve_stage(kind: str, stage, F: Tensor, f: Tensor, lo: Tensor, hi: Tensor, margin: float):
    if kind == "pair":
        A, B = stage
        gamma, F_hat = _gamma(A, B, F)
        return F_hat, _betas(A, B, gamma, f, lo, hi, margin)
    if kind == "chain":
        A, B, C, D = stage
        U, V = _factor(F, B.linear.out_features)
        g1, V_hat = _gamma(A, B, V)
        c = _shift(V_hat, lo, hi, margin) if B.relu else torch.zeros_like(V_hat[:, 0])
        lo2, hi2 = interval(V_hat, c, lo, hi)
        if B.relu:
            lo2, hi2 = lo2.clamp(min=0), hi2.clamp(min=0)
        g2, U_hat = _gamma(C, D, U)
        return U_hat @ V_hat, _betas(A, B, g1, c, lo, hi, margin) + _betas(C, D, g2, f - U_hat @ c, lo2, hi2, margin)
    layer, pairs = stage
    F_hat, assignments = torch.zeros_like(F), []
    low_sum, shift_prev = torch.zeros_like(f), torch.zeros_like(f)
    for i, ((a, b), (A, B)) in enumerate(zip(layer.blocks, pairs)):
        gamma, F_hat[:, a:b] = _gamma(A, B, F[:, a:b])
        low_sum = low_sum + interval(F_hat[:, a:b], torch.zeros_like(f), lo[a:b], hi[a:b])[0]
        # the residual stream y_i = sum_{j<=i} F_j h_j + shift_i passes a ReLU after every addition
        shift = (-low_sum).clamp(min=0) * (1 + margin) if i < len(pairs) - 1 else f
        assignments += _betas(A, B, gamma, shift - shift_prev, lo[a:b], hi[a:b], margin)
        shift_prev = shift
    return F_hat, assignments


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
    enlarged by ``margin``. Nothing is changed when it raises.

    >>> result = theory.fit(net, target)
    >>> result.residual, result.exact
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    if bounds not in ("interval", "norm"):
        raise ValueError(f"bounds must be 'interval' or 'norm', got {bounds!r}")
    if not (isinstance(margin, (int, float)) and margin >= 0):
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    targets = target_layers(target)
    bound = check_bound(input_bound)
    stages = _stages(net, targets)
    for j, ((kind, stage), t) in enumerate(zip(stages, targets)):
        _check_dims(kind, stage, t, j)

    device = next(m for m in net.modules() if isinstance(m, nn.Linear)).weight.device
    lo = torch.full((targets[0].shape[1],), -bound, dtype=torch.float64, device=device)
    hi = -lo
    assignments, residuals = [], []
    for (kind, stage), t in zip(stages, targets):
        F, f = t.weight.to(device), t.bias.to(device)
        if bounds == "norm":
            r = torch.maximum(lo.abs(), hi.abs()).max()
            lo, hi = -r.expand_as(lo), r.expand_as(hi)
        F_hat, new = _solve_stage(kind, stage, F, f, lo, hi, margin)
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
