"""Exact reconstruction of a target MLP by tuning only the BatchNorm γ/β of a frozen random network."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .fit import fit
from .network import METHODS, random_network
from .target import check_bound, target_layers

__all__ = ["reconstruct"]

_COMMON = {"init", "max_cond", "max_redraws", "margin", "bounds", "device"}
_OPTIONS = {
    "wide": _COMMON,
    "skip": _COMMON | {"k"},
    "sparse": (_COMMON - {"init"}) | {"p"},
    "lowrank": _COMMON | {"rank"},
}


def reconstruct(
    target: nn.Module,
    *,
    method: str = "wide",
    input_bound: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **opts,
) -> nn.Sequential:
    """A frozen random network that equals ``target`` on every input with ‖x‖∞ ≤ ``input_bound``.

    ``target`` is an ``nn.Sequential`` of ``nn.Linear`` layers, each optionally followed by an
    ``nn.ReLU``. The result is an ``nn.Sequential`` of Linear (random, frozen, drawn from ``seed``
    alone: ``theory.random_network`` of the target's sizes), BatchNorm1d (eval mode, running mean 0,
    variance 1; its γ/β are the only trainable parameters) and ReLU (plus ``SkipLayer`` for "skip"),
    with γ/β set by ``theory.fit``. Solves run in float64; ``dtype`` is the returned network's.

    Methods (Giannou, Rajput & Papailiopoulos, COLT 2023), for target layers d_in → d_out:

    - ``"wide"``: two layers per target layer, width d_in·d_out (Case 1: width d², depth 2l).
    - ``"skip"``: ``k`` residual branches per target layer (option ``k``, default 2), each on d_in/k
      inputs: width d²/k, depth 2kl (Case 2).
    - ``"sparse"``: as wide, each frozen weight kept with probability ``p`` (default √(log d/d));
      a draw whose Khatri-Rao system has condition number above ``max_cond`` (default 1e8) is
      redrawn from the same seeded stream, never looking at the target (Case 3).
    - ``"lowrank"``: four layers per target layer through a bottleneck of the target's rank r
      (option ``rank``, default: each layer's numerical rank), width r·d.

    Other options: ``init`` ("gaussian" i.i.d., the default and the theorem's setting;
    "orthogonal"; "orthobasis", a structured draw with a perfectly conditioned system solved in
    O(d⁴)), ``max_cond``/``max_redraws`` (redraw ill-conditioned pairs), ``margin`` and ``bounds``
    (see ``fit``), ``device``. ``net.theory_info`` reports width, depth, parameter counts,
    redraws and the residual.

    >>> target = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> net = theory.reconstruct(target, method="wide", input_bound=1.0, seed=0)
    >>> x = torch.rand(8, 4, dtype=torch.float64) * 2 - 1
    >>> torch.allclose(net(x), target.double()(x))
    True
    """
    layers = target_layers(target)
    bound = check_bound(input_bound)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    unknown = set(opts) - _OPTIONS[method]
    if unknown:
        raise TypeError(
            f"reconstruct(method={method!r}) got unexpected option(s) {sorted(unknown)}; "
            f"it accepts {sorted(_OPTIONS[method])}"
        )
    fit_opts = {key: opts.pop(key) for key in ("margin", "bounds") if key in opts}
    if method == "lowrank":
        # numerical rank at the precision the target was stored in
        needed = [
            max(1, int(torch.linalg.matrix_rank(t.weight, rtol=max(t.shape) * torch.finfo(t.dtype).eps)))
            for t in layers
        ]
        rank = opts.get("rank")
        if rank is None:
            opts["rank"] = needed
        else:
            given = [rank] * len(layers) if isinstance(rank, int) else list(rank)
            short = [(i, g, n) for i, (g, n) in enumerate(zip(given, needed)) if g < n]
            if short:
                i, g, n = short[0]
                raise ValueError(f"rank={rank} is below target layer {i}'s rank {n}; the reconstruction would not be exact")

    sizes = [layers[0].shape[1]] + [t.shape[0] for t in layers]
    net = random_network(sizes, [t.relu for t in layers], method=method, seed=seed, dtype=dtype, **opts)
    result = fit(net, target, input_bound=bound, **fit_opts)
    if not result.exact:
        warnings.warn(f"reconstruction residual {result.residual:.2e}: the Khatri-Rao systems are ill-conditioned", stacklevel=2)
    net.theory_info.update(input_bound=bound, residual=result.residual)
    return net
