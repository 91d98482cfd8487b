"""Khatri-Rao products and the linear system that sets γ between two random layers.

For frozen ``W_a`` (m × d_in) and ``W_b`` (d_out × m), ``W_b @ diag(γ) @ W_a`` is linear in γ:

    (W_b diag(γ) W_a).flatten() == khatri_rao(W_b, W_a.T) @ γ        (row-major flatten)

which is the paper's ``vec(W_b diag(γ) W_a) = (W_aᵀ ⊙ W_b) γ`` with column-major ``vec``. With
m = d_in·d_out the system is square and, for continuous random draws, invertible with probability 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["khatri_rao", "pair_system", "pair_map", "pair_rmatvec", "solve_pair", "pair_condition"]


def khatri_rao(A: Tensor, B: Tensor) -> Tensor:
    """Column-wise Kronecker product: column k of the result is ``kron(A[:, k], B[:, k])``.

    ``A`` is (I, K), ``B`` is (J, K), the result is (I·J, K); the same as ``scipy.linalg.khatri_rao``.

    >>> khatri_rao(torch.eye(2), torch.ones(3, 2)).shape
    torch.Size([6, 2])
    """
    if not (isinstance(A, Tensor) and isinstance(B, Tensor)):
        raise TypeError(f"khatri_rao expects two tensors, got {type(A).__name__} and {type(B).__name__}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"khatri_rao expects 2-D matrices, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            f"khatri_rao needs the same number of columns, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    # contiguous inputs give a contiguous product, so the reshape is a view
    return (A.contiguous()[:, None, :] * B.contiguous()[None, :, :]).reshape(A.shape[0] * B.shape[0], A.shape[1])


def pair_system(W_a: Tensor, W_b: Tensor) -> Tensor:
    """The (d_out·d_in × m) matrix K with ``K @ γ == (W_b @ diag(γ) @ W_a).flatten()``."""
    return khatri_rao(W_b, W_a.T)


def pair_map(W_a: Tensor, W_b: Tensor, gamma: Tensor) -> Tensor:
    """``W_b @ diag(gamma) @ W_a`` (the map a pair of layers realizes), in O(d_out·m·d_in)."""
    return W_b @ (gamma[:, None] * W_a)


def pair_rmatvec(W_a: Tensor, W_b: Tensor, F: Tensor) -> Tensor:
    """``pair_system(W_a, W_b).T @ F.flatten()`` without forming the system: ``diag(W_bᵀ F W_aᵀ)``."""
    return ((W_b.T @ F) * W_a).sum(1)


def _relative(residual: Tensor, F: Tensor) -> float:
    scale = torch.linalg.norm(F)
    r = torch.linalg.norm(residual)
    return float(r / scale) if scale > 0 else float(r)


def _orthogonal_scale(W_a: Tensor, W_b: Tensor) -> float | None:
    """c if KᵀK = c·I (checked on a random probe, O(d⁴)), else None. True for init='orthobasis'."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(W_a.shape[0], generator=g, dtype=W_a.dtype).to(W_a.device)
    kz = pair_rmatvec(W_a, W_b, pair_map(W_a, W_b, z))
    c = float(z @ kz / (z @ z))
    if c > 0 and float(torch.linalg.norm(kz - c * z)) <= 1e-12 * c * float(torch.linalg.norm(z)):
        return c
    return None


def _refine(K: Tensor, v: Tensor, LU: Tensor, pivots: Tensor, x: Tensor, max_steps: int) -> tuple[Tensor, bool]:
    """Iterative refinement with residuals in K's precision and corrections through the (maybe
    float32) LU, until the residual stops shrinking. Converged means backward stable (LAPACK
    dsgesv's test: ‖r‖ ≤ √m·eps·‖K‖·‖x‖)."""
    tol = K.shape[0] ** 0.5 * torch.finfo(K.dtype).eps * float(torch.linalg.norm(K, ord=float("inf")))
    best, best_r = x, float("inf")
    for _ in range(max_steps + 1):
        r = v - K @ x
        size = float(r.abs().max())
        if not size < 0.5 * best_r:  # stagnated (or not finite)
            break
        best, best_r = x, size
        x = x + torch.linalg.lu_solve(LU, pivots, r.to(LU.dtype)).to(K.dtype)
    return best, best_r <= tol * float(best.abs().max())


def _lu_solve_refined(K: Tensor, v: Tensor) -> Tensor | None:
    """Solve a square K x = v to the rounding level of K's dtype; None for a singular K.

    Large float64 systems use mixed precision, as LAPACK's dsgesv: a float32 LU (about twice as fast)
    refined in float64, falling back to a float64 LU when the refinement does not converge (ill
    conditioning).
    """
    if K.dtype == torch.float64 and K.shape[0] >= 256:
        LU, pivots, info = torch.linalg.lu_factor_ex(K.float())
        if int(info) == 0:
            x = torch.linalg.lu_solve(LU, pivots, v.float()).double()
            x, converged = _refine(K, v, LU, pivots, x, max_steps=30)
            if converged:
                return x[:, 0]
    LU, pivots, info = torch.linalg.lu_factor_ex(K)
    if int(info) != 0:
        return None
    x, _ = _refine(K, v, LU, pivots, torch.linalg.lu_solve(LU, pivots, v), max_steps=3)
    return x[:, 0] if torch.isfinite(x).all() else None


def solve_pair(W_a: Tensor, W_b: Tensor, F: Tensor) -> tuple[Tensor, float]:
    """γ such that ``W_b @ diag(γ) @ W_a ≈ F``, and the relative residual ‖K γ − vec F‖ / ‖F‖.

    Square systems (m = d_in·d_out, the theorem's width) are solved exactly: γ = Kᵀ vec(F) / c when
    K is a scaled orthogonal matrix (init='orthobasis'), otherwise by LU (O(m³); float32 LU refined in float64 for
    large systems, like LAPACK's dsgesv). Narrower pairs get the least-squares γ, wider ones the minimum-norm γ (SVD-based lstsq).
    Work in float64 for exactness.
    """
    m, d_in = W_a.shape
    d_out = W_b.shape[0]
    if W_b.shape[1] != m or F.shape != (d_out, d_in):
        raise ValueError(f"shapes do not chain: W_a {tuple(W_a.shape)}, W_b {tuple(W_b.shape)}, F {tuple(F.shape)}")
    gamma = None
    if m == d_in * d_out:
        c = _orthogonal_scale(W_a, W_b)
        if c is not None:
            gamma = pair_rmatvec(W_a, W_b, F) / c
        else:
            gamma = _lu_solve_refined(pair_system(W_a, W_b), F.reshape(-1, 1))
    if gamma is None:
        driver = "gelsd" if F.device.type == "cpu" else None
        gamma = torch.linalg.lstsq(pair_system(W_a, W_b), F.reshape(-1, 1), driver=driver).solution[:, 0]
    return gamma, _relative(pair_map(W_a, W_b, gamma) - F, F)


def pair_condition(W_a: Tensor, W_b: Tensor, *, iters: int = 12) -> float:
    """Estimate of the 2-norm condition number of the square system ``pair_system(W_a, W_b)``.

    One LU factorization, then power iteration on KᵀK and inverse iteration through the LU factors
    (both O(m²) a step), so it costs about one solve. Returns ``inf`` for a singular draw. The
    estimate is a lower bound that is usually within a small factor of the true value.
    """
    K = pair_system(W_a, W_b)
    if K.shape[0] != K.shape[1]:
        raise ValueError(f"pair_condition needs a square system, got {tuple(K.shape)}")
    LU, pivots, info = torch.linalg.lu_factor_ex(K)
    if int(info) != 0:
        return float("inf")
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(K.shape[0], 1, generator=g, dtype=K.dtype).to(K.device)
    y = x.clone()
    big = small = 0.0
    for _ in range(iters):
        x = K.T @ (K @ x)
        big = float(torch.linalg.norm(x))
        x = x / big
        y = torch.linalg.lu_solve(LU, pivots, torch.linalg.lu_solve(LU, pivots, y, adjoint=True))
        small = float(torch.linalg.norm(y))
        if not (small < float("inf")) or small == 0.0:
            return float("inf")
        y = y / small
    return (big * small) ** 0.5
