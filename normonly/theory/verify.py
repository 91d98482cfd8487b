"""Check a reconstruction: inputs covering the box ‖x‖∞ ≤ bound (corners included) and the error on them."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

__all__ = ["box_inputs", "max_relative_error"]


def box_inputs(dim: int, n: int = 10_000, *, input_bound: float = 1.0, seed: int = 0) -> Tensor:
    """``n`` float64 points of the box [-bound, bound]^dim: half are corners (all 2^dim of them when
    that fits, else random ones), the rest uniform inside."""
    if dim < 1 or n < 2:
        raise ValueError(f"need dim >= 1 and n >= 2, got dim={dim}, n={n}")
    g = torch.Generator().manual_seed(seed)
    if dim <= 20 and 2**dim <= n // 2:
        corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=dim)), dtype=torch.float64)
    else:
        corners = torch.randint(0, 2, (n // 2, dim), generator=g).to(torch.float64) * 2 - 1
    inside = torch.rand(n - len(corners), dim, generator=g, dtype=torch.float64) * 2 - 1
    return torch.cat([corners, inside]) * input_bound


def max_relative_error(net: nn.Module, target: nn.Module, x: Tensor) -> float:
    """max |net(x) − target(x)| / max |target(x)| over all inputs and outputs, with ``target`` run in
    float64 and ``net`` in its own dtype and in eval mode."""
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            ref = copy.deepcopy(target).to(torch.float64)(x.to(torch.float64).cpu())
            out = net(x.to(device=param.device, dtype=param.dtype)).to("cpu", torch.float64)
    finally:
        net.train(was_training)
    scale = ref.abs().max()
    err = (out - ref).abs().max()
    return float(err / scale) if scale > 0 else float(err)
