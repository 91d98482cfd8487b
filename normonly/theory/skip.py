"""The residual layer of the "skip" construction (Case 2: width traded for depth)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SkipLayer"]


class SkipLayer(nn.Module):
    """One target layer realized by k branches, one per block of input coordinates.

    Branch i (Linear → BatchNorm1d → ReLU → Linear → BatchNorm1d) reads only its block
    ``h[..., a:b]`` through a skip connection and adds its output to a residual stream
    ``y ← ReLU(y + branch_i(h[a:b]))``; the last addition is followed by a ReLU only when ``relu``.
    Laid out in sequence this is 2k layers of width d_out·d_in/k instead of 2 of width d_out·d_in.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]], branches: Sequence[nn.Module], relu: bool):
        super().__init__()
        if len(blocks) != len(branches) or not blocks:
            raise ValueError(f"need one branch per block, got {len(blocks)} blocks and {len(branches)} branches")
        self.blocks = tuple((int(a), int(b)) for a, b in blocks)
        self.branches = nn.ModuleList(branches)
        self.relu = bool(relu)

    def forward(self, h: Tensor) -> Tensor:
        y = None
        last = len(self.branches) - 1
        for i, ((a, b), branch) in enumerate(zip(self.blocks, self.branches)):
            z = branch(h[..., a:b])
            y = z if y is None else y + z
            if i < last or self.relu:
                y = torch.relu(y)
        return y

    def extra_repr(self) -> str:
        return f"blocks={list(self.blocks)}, relu={self.relu}"
