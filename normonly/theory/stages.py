"""Solve one stage: γ from the Khatri-Rao system, β from interval bounds on the stage's input box."""

from __future__ import annotations

import torch
from torch import Tensor

from .khatri_rao_system import pair_map, solve_pair
from .structure import Layer
from .target import interval

__all__ = ["solve_stage"]


def _gamma(A: Layer, B: Layer, F: Tensor) -> tuple[Tensor, Tensor]:
    gamma, _ = solve_pair(A.W, B.W, F)
    return gamma, pair_map(A.W, B.W, gamma)


def _betas(A: Layer, B: Layer, gamma: Tensor, f: Tensor, lo: Tensor, hi: Tensor, margin: float) -> list:
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


def solve_stage(kind: str, stage, F: Tensor, f: Tensor, lo: Tensor, hi: Tensor, margin: float):
    """γ/β making a stage compute ``F h + f`` (before the target's ReLU) for ``lo <= h <= hi``.

    Returns the linear map F̂ the stage realizes (F up to rounding, or its least-squares
    approximation) and a list of ``(batchnorm, scale, shift)`` to write.
    """
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
        gamma, F_block = _gamma(A, B, F[:, a:b])
        F_hat[:, a:b] = F_block
        low_sum = low_sum + interval(F_hat[:, a:b], torch.zeros_like(f), lo[a:b], hi[a:b])[0]
        # the residual stream y_i = sum_{j<=i} F_j h_j + shift_i passes a ReLU after every addition
        shift = (-low_sum).clamp(min=0) * (1 + margin) if i < len(pairs) - 1 else f
        assignments += _betas(A, B, gamma, shift - shift_prev, lo[a:b], hi[a:b], margin)
        shift_prev = shift
    return F_hat, assignments
