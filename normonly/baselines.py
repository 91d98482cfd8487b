"""Frankle et al.'s control for BatchNorm-only training: train as many *random* weights per channel instead.

``train_random_per_channel`` freezes the whole model and makes ``per_channel`` randomly chosen weights of every
output channel of every convolution trainable (2 per channel = the γ and β each BatchNorm channel has), so the
trainable-parameter count matches BatchNorm-only training of a ResNet exactly. The chosen entries become a small
parameter through ``torch.nn.utils.parametrize``: the optimizer, weight decay and ``count_parameters`` see only
them, and every other weight stays bit-for-bit at its initial value.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["RandomEntries", "train_random_per_channel"]


class RandomEntries(nn.Module):
    """Parametrization ``weight = frozen weight with the entries at flat ``index`` replaced by the trainable vector``."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.register_buffer("frozen", weight.detach().clone())
        self.register_buffer("index", index)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        flat = self.frozen.reshape(-1).index_put((self.index,), values)
        return flat.view(self.frozen.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().reshape(-1)[self.index].clone()


def train_random_per_channel(
    model: nn.Module, per_channel: int = 2, *, seed: int = 0, layer_types: tuple[type, ...] = (nn.Conv2d,)
) -> nn.Module:
    """Freeze ``model`` except ``per_channel`` random weights in each output channel of every ``layer_types`` layer.

    In place; returns the model. With ``per_channel=2`` on a CIFAR ResNet the trainable count equals its BatchNorm
    γ/β count (1,120 for ResNet-14), Frankle et al.'s "same number of random parameters per channel" baseline.
    The choice depends only on ``seed``. Raises ``ValueError`` (changing nothing) if a layer has fewer than
    ``per_channel`` weights per channel or the model has no such layer.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_types)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no {[t.__name__ for t in layer_types]} layer to train")
    if per_channel < 1:
        raise ValueError(f"per_channel must be >= 1, got {per_channel}")
    for name, m in layers:
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"{name}.weight is already parametrized; call train_random_per_channel once per model")
        fan = m.weight[0].numel()
        if fan < per_channel:
            raise ValueError(f"{name} has only {fan} weights per output channel, fewer than per_channel={per_channel}")
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in layers:
        out_channels, fan = m.weight.shape[0], m.weight[0].numel()
        picks = torch.stack([torch.randperm(fan, generator=generator)[:per_channel] for _ in range(out_channels)])
        index = (picks + fan * torch.arange(out_channels)[:, None]).reshape(-1).to(m.weight.device)
        parametrize.register_parametrization(m, "weight", RandomEntries(m.weight, index), unsafe=True)
        m.parametrizations.weight.original.requires_grad_(True)
    return model
