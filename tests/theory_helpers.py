"""Target MLPs shared by the theory tests."""

import torch
from torch import nn


def mlp(sizes, seed=0, last_relu=False, bias=True, dtype=torch.float32) -> nn.Sequential:
    """Linear layers of ``sizes`` with torch's default init from ``seed``, a ReLU after each but the last."""
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2 or last_relu:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(dtype)
