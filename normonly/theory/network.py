"""Frozen random networks with BatchNorm1d after every Linear, built from sizes and a seed alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .draws import INITS, default_sparsity, draw_pair
from .khatri_rao_system import pair_condition
from .skip import SkipLayer

__all__ = ["METHODS", "random_network"]

METHODS = ("wide", "skip", "sparse", "lowrank")


def _layer(W: Tensor, relu: bool, dtype: torch.dtype, device) -> list[nn.Module]:
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(W.to(device=device, dtype=dtype), requires_grad=False)
    bn = nn.BatchNorm1d(W.shape[0], device=device, dtype=dtype)  # running mean 0, var 1
    return [linear, bn, nn.ReLU()] if relu else [linear, bn]


class _Draws:
    """Draws pairs from one generator; with ``max_cond`` it redraws ill-conditioned pairs (seed only)."""

    def __init__(self, seed: int, init: str, max_cond: float | None, max_redraws: int):
        self.g = torch.Generator().manual_seed(seed)
        self.init, self.max_cond, self.max_redraws = init, max_cond, max_redraws
        self.redraws: list[int] = []
        self.conds: list[float] = []

    def pair(self, d_in: int, d_out: int, width: int, p: float = 1.0) -> tuple[Tensor, Tensor]:
        for attempt in range(self.max_redraws + 1):
            W_a, W_b = draw_pair(d_in, d_out, width, init=self.init, g=self.g, p=p)
            if self.max_cond is None:
                return W_a, W_b
            cond = pair_condition(W_a, W_b)
            if cond <= self.max_cond:
                self.redraws.append(attempt)
                self.conds.append(cond)
                return W_a, W_b
        raise RuntimeError(
            f"none of {self.max_redraws + 1} draws of a {d_in}->{width}->{d_out} pair (p={p:.3g}) had a Khatri-Rao "
            f"system with condition number <= max_cond={self.max_cond:g}; raise p, max_cond or max_redraws"
        )


def _check_options(sizes, relus, method, init, k, p, rank, max_cond, max_redraws):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    if len(sizes) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive ints (input, ..., output), got {sizes}")
    if len(relus) != len(sizes) - 1:
        raise ValueError(f"relus needs one flag per layer ({len(sizes) - 1}), got {len(relus)}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k (blocks per layer for method='skip') must be a positive int, got {k!r}")
    if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ValueError(f"p (keep probability for method='sparse') must be in (0, 1], got {p!r}")
    if method == "sparse" and init != "gaussian":
        raise ValueError(f"method='sparse' draws masked Gaussian weights; init={init!r} is not supported")
    if method == "lowrank":
        ranks = [rank] * (len(sizes) - 1) if isinstance(rank, int) else rank
        if ranks is None or len(ranks) != len(sizes) - 1 or not all(isinstance(r, int) and r >= 1 for r in ranks):
            raise ValueError(f"method='lowrank' needs rank=int or one int per layer, got {rank!r}")
    if max_cond is not None and not max_cond > 1:
        raise ValueError(f"max_cond must be > 1 or None, got {max_cond!r}")
    if not (isinstance(max_redraws, int) and max_redraws >= 0):
        raise ValueError(f"max_redraws must be a non-negative int, got {max_redraws!r}")


def random_network(
    sizes: Sequence[int],
    relus: Sequence[bool] | None = None,
    *,
    method: str = "wide",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    init: str = "gaussian",
    k: int = 2,
    p: float | None = None,
    rank: int | Sequence[int] | None = None,
    max_cond: float | None = None,
    max_redraws: int = 100,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """The frozen random network that ``reconstruct`` tunes, for a target with layer sizes ``sizes``.

    A pure function of its arguments: it never sees a target's weights. ``relus[i]`` says whether
    target layer i is followed by a ReLU (default: all but the last). Every Linear (no bias, frozen)
    is followed by a ``BatchNorm1d`` (running mean 0, variance 1, eval mode) whose γ/β are the only
    trainable parameters, and by a ReLU inside each pair. Per target layer of size d_in → d_out:

    - ``"wide"``: two layers, widths d_in·d_out and d_out (Case 1: width d², depth 2l);
    - ``"sparse"``: the same with entries kept with probability ``p`` (default √(log d/d)), redrawing
      a pair whose Khatri-Rao system has condition number above ``max_cond`` (default 1e8);
    - ``"skip"``: a ``SkipLayer`` of ``k`` branches on blocks of d_in/k inputs (Case 2: width d²/k,
      depth 2kl);
    - ``"lowrank"``: two pairs through a ``rank``-dimensional bottleneck, widths rank·d_in and
      rank·d_out (four layers).

    The net carries ``theory_info``, a dict with its width, depth, parameter counts and redraws.
    """
    sizes = list(sizes)
    relus = [i < len(sizes) - 2 for i in range(len(sizes) - 1)] if relus is None else [bool(r) for r in relus]
    if method == "sparse" and max_cond is None:
        max_cond = 1e8
    _check_options(sizes, relus, method, init, k, p, rank, max_cond, max_redraws)
    draws = _Draws(seed, init, max_cond, max_redraws)
    ranks = [rank] * len(relus) if isinstance(rank, int) else rank
    modules: list[nn.Module] = []
    ps = []
    for i, (d_in, d_out, relu) in enumerate(zip(sizes[:-1], sizes[1:], relus)):
        if method in ("wide", "sparse"):
            p_i = 1.0 if method == "wide" else float(p if p is not None else default_sparsity(max(d_in, d_out)))
            ps.append(p_i)
            W_a, W_b = draws.pair(d_in, d_out, d_in * d_out, p_i)
            modules += _layer(W_a, True, dtype, device) + _layer(W_b, relu, dtype, device)
        elif method == "lowrank":
            r = ranks[i]
            V_a, V_b = draws.pair(d_in, r, d_in * r)
            U_a, U_b = draws.pair(r, d_out, r * d_out)
            modules += _layer(V_a, True, dtype, device) + _layer(V_b, True, dtype, device)
            modules += _layer(U_a, True, dtype, device) + _layer(U_b, relu, dtype, device)
        else:
            bounds = torch.tensor_split(torch.arange(d_in), min(k, d_in))
            blocks = [(int(b[0]), int(b[-1]) + 1) for b in bounds]
            branches = []
            for a, b in blocks:
                W_a, W_b = draws.pair(b - a, d_out, (b - a) * d_out)
                branches.append(nn.Sequential(*_layer(W_a, True, dtype, device), *_layer(W_b, False, dtype, device)))
            modules.append(SkipLayer(blocks, branches, relu))
    net = nn.Sequential(*modules).eval()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    frozen = sum(m.weight.numel() for m in linears)
    net.theory_info = {
        "method": method,
        "init": init,
        "seed": seed,
        "sizes": sizes,
        "relus": relus,
        "width": max(m.out_features for m in linears),
        "depth": len(linears),
        "frozen_params": frozen,
        "frozen_nonzero": sum(int(torch.count_nonzero(m.weight)) for m in linears),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        **({"k": k} if method == "skip" else {}),
        **({"p": ps} if method == "sparse" else {}),
        **({"rank": list(ranks)} if method == "lowrank" else {}),
        **({"redraws": draws.redraws, "cond": draws.conds} if max_cond is not None else {}),
    }
    return net
