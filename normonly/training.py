"""Small pieces of a fast norm-only loop: hand the optimizer only trainable tensors, evaluate without autograd."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["trainable_parameters", "eval_mode"]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require grad, each shared tensor once, in ``model.parameters()`` order.

    Give these, not ``model.parameters()``, to the optimizer: its state, ``zero_grad`` and the
    foreach/fused kernels then touch the few hundred γ/β tensors only.

    >>> normonly.freeze_all_but_norm(model)
    >>> opt = torch.optim.AdamW(normonly.trainable_parameters(model), lr=1e-3, fused=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no parameter that requires grad: call normonly.freeze_all_but_norm(model) "
            "(or get_normonly_model) before building the optimizer, not a full freeze"
        )
    return params


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` in eval mode under ``torch.inference_mode()``; every module's train/eval flag is restored.

    Without it, a forward pass of a model with trainable γ/β records an autograd graph and keeps its
    activations alive; ``inference_mode`` skips that and the view/version bookkeeping too. Tensors
    made inside cannot be used in autograd later (compute metrics inside, or ``.clone()`` outside).

    >>> with normonly.eval_mode(model):
    ...     accuracy = (model(x).argmax(-1) == y).float().mean().item()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        for m, training in flags:
            m.training = training
