"""FSDP2 for norm-only training: shard the frozen weights block by block, gather only the few trained tensors.

``torch.distributed.fsdp.fully_shard`` keeps the model's own module tree and parameter names and shards each
parameter on its own, so frozen weights and trainable γ/β can share a block. It runs over NCCL on GPUs and over
gloo on CPUs (Accelerate 1.16 enables its FSDP integration on GPU processes only, so the recipes call
``shard_blocks`` themselves and give Accelerate the sharded model unprepared).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["shard_blocks", "is_sharded", "full_tensor", "shard_like", "block_classes"]


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated blocks to shard: a transformers model's ``_no_split_modules`` classes, else the classes of the
    modules held in ``nn.ModuleList`` containers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m}
    return found


def shard_blocks(model: nn.Module, classes: set[type[nn.Module]] | None = None, **fsdp_kwargs) -> nn.Module:
    """``fully_shard`` every block of ``model`` (see :func:`block_classes`) and then the model itself, in place.

    Call it after ``freeze_all_but_norm`` (or ``get_normonly_model``) and before building the optimizer; a
    process group must be initialized (``Accelerator()`` under ``accelerate launch`` / ``torchrun`` does it).
    ``fsdp_kwargs`` go to ``fully_shard`` (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...).

    >>> normonly.freeze_all_but_norm(model)
    >>> normonly.distributed.shard_blocks(model)   # each rank now holds 1/N of every frozen weight
    """
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_blocks needs an initialized process group: launch with accelerate launch or torchrun")
    classes = block_classes(model) if classes is None else classes
    if not classes:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to shard; pass classes={{BlockClass}}")
    for module in list(model.modules()):
        if isinstance(module, tuple(classes)) and module is not model:
            fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 or tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``whole`` on ``live``'s device and, when ``live`` is a DTensor, cut into ``live``'s placements.

    Every rank must hold the same ``whole`` (read from one file, or kept in an adapter's store): each takes its own
    shard of it without communicating.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(live.device)
    if isinstance(live, DTensor):
        return distribute_tensor(whole, live.device_mesh, live.placements, src_data_rank=None)
    return whole
