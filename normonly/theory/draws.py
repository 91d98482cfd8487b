"""Random frozen weights for a pair of layers, drawn from a generator alone (never from a target)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["INITS", "draw_pair", "default_sparsity"]

INITS = ("gaussian", "orthogonal", "orthobasis")


def default_sparsity(d: int) -> float:
    """The paper's keep probability p = √(log d / d) for a layer of width d (1 for d ≤ 2)."""
    return 1.0 if d <= 2 else min(1.0, math.sqrt(math.log(d) / d))


def _haar(n: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _orthonormal_columns(rows: int, cols: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def draw_pair(d_in: int, d_out: int, width: int, *, init: str, g: torch.Generator, p: float = 1.0) -> tuple[Tensor, Tensor]:
    """Frozen weights ``W_a`` (width × d_in) and ``W_b`` (d_out × width) for one pair of layers, float64.

    - ``"gaussian"``: i.i.d. N(0, 1/fan_in), the theorem's setting; with ``p < 1`` each entry is kept
      with probability p (and rescaled by 1/√p), the sparse case.
    - ``"orthogonal"``: ``W_a`` with orthonormal columns, ``W_b`` with orthonormal rows (Haar).
    - ``"orthobasis"``: a structured random draw whose rank-one terms ``W_b[:, k] W_a[k, :]`` form an
      orthonormal basis of the d_out × d_in matrices (``W_a`` repeats the rows of a Haar rotation
      d_out times, ``W_b`` concatenates d_in Haar rotations), so the Khatri-Rao system is orthogonal:
      condition number 1 and a solve in O(d⁴). Needs width = d_in·d_out.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    if not 0 < p <= 1:
        raise ValueError(f"the keep probability p must be in (0, 1], got {p}")
    if init == "gaussian":
        W_a = torch.randn(width, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        W_b = torch.randn(d_out, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    elif init == "orthogonal":
        if width < max(d_in, d_out):
            raise ValueError(f"init='orthogonal' needs width >= max(d_in, d_out) = {max(d_in, d_out)}, got {width}")
        W_a = _orthonormal_columns(width, d_in, g)
        W_b = _orthonormal_columns(width, d_out, g).T.contiguous()
    else:
        if width != d_in * d_out:
            raise ValueError(f"init='orthobasis' needs width = d_in·d_out = {d_in * d_out}, got {width}")
        W_a = _haar(d_in, g).T.repeat_interleave(d_out, dim=0)
        W_b = torch.cat([_haar(d_out, g) for _ in range(d_in)], dim=1)
    if p < 1:
        if init != "gaussian":
            raise ValueError(f"sparse draws (p={p}) use init='gaussian', got init={init!r}")
        W_a = W_a * (torch.rand(W_a.shape, generator=g, dtype=torch.float64) < p) / math.sqrt(p)
        W_b = W_b * (torch.rand(W_b.shape, generator=g, dtype=torch.float64) < p) / math.sqrt(p)
    return W_a, W_b
