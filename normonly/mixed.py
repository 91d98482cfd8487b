"""Many adapters in one batch (inference): each sample normalized with its own adapter's γ/β and statistics.

A norm-only adapter differs from its base only in per-channel scales and shifts (and BatchNorm statistics), so one
forward serves many tasks: the frozen convolutions and matmuls run once on the whole batch, and every layer an
adapter changes applies each sample's own values. torch's BatchNorm, LayerNorm, GroupNorm, RMSNorm and affine
InstanceNorm get a vectorized per-sample affine; every other such layer (timm's norm+act layers, Llama/Gemma/T5
norms found by the structural rule, ``modules_to_save`` heads) runs its own forward once per adapter group of the
batch with that adapter's tensors. ``NormOnlyModel.forward(..., adapter_names=[...])`` uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import NormOnlyModel

__all__ = ["BASE_ADAPTER", "mixed_adapters"]

BASE_ADAPTER = "__base__"  # peft's name for "no adapter": the base model's own values
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@contextmanager
def mixed_adapters(wrapper: NormOnlyModel, adapter_names: list[str]) -> Iterator[None]:
    """Inside the block, every layer an adapter changes computes sample ``i`` with adapter ``adapter_names[i]``.

    Raises before anything runs in training mode, inside ``disable_adapter()``, or with an unknown adapter name.
    """
    names = _check(wrapper, adapter_names)
    slots = sorted(set(names))
    slot_of = {name: i for i, name in enumerate(slots)}
    with torch.no_grad():
        wrapper._sync_active()  # values trained in place belong to the active adapter's store
    owners: dict[nn.Module, dict[str, str]] = {}  # module -> {attribute: qualified name} of what adapters change
    for qualified in wrapper._base_values:
        module, key, _ = wrapper._slots[qualified]
        owners.setdefault(module, {})[key] = qualified
    device = next((t.device for t in wrapper._base_values.values()), torch.device("cpu"))
    index = torch.tensor([slot_of[n] for n in names], device=device)
    module_names = {m: n for n, m in wrapper.base_model.named_modules()}
    originals = {}
    try:
        for module, keys in owners.items():
            values = {key: [_value(wrapper, qualified, name) for name in slots] for key, qualified in keys.items()}
            for key in ("weight", "bias", "running_mean", "running_var"):  # what no adapter changes: shared
                shared = getattr(module, key, None)
                if key not in values and isinstance(shared, torch.Tensor):
                    values[key] = [shared.detach()] * len(slots)
            originals[module] = module.__dict__.get("forward")
            module.forward = _per_sample_forward(module, values, index, module_names.get(module, ""))
        yield
    finally:
        for module, forward in originals.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _check(wrapper: NormOnlyModel, adapter_names) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r:.100}")
    names = list(adapter_names)
    if not names:
        raise ValueError("adapter_names is empty: give one adapter name per sample of the batch")
    if wrapper.training or wrapper.base_model.training:
        raise RuntimeError("adapter_names is for inference: call model.eval() first (training mixes no adapters)")
    if wrapper._disabled:
        raise RuntimeError("adapter_names inside disable_adapter(): leave the `with` block first")
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in wrapper._adapters})
    if unknown:
        raise ValueError(f"adapter_names holds unknown adapter(s) {unknown}; loaded: {list(wrapper._adapters)} "
                         f"(and {BASE_ADAPTER!r} for the base model)")
    return names


def _value(wrapper: NormOnlyModel, qualified: str, adapter: str) -> torch.Tensor:
    base = wrapper._base_values[qualified]
    return base if adapter == BASE_ADAPTER else wrapper._adapters[adapter].values.get(qualified, base)


def _per_sample_forward(module: nn.Module, values: dict[str, list[torch.Tensor]], index: torch.Tensor, name: str):
    """A forward for ``module`` that applies adapter slot ``index[i]``'s ``values`` to sample ``i``."""
    batch = len(index)

    def check(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
            size = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RuntimeError(
                f"{name or 'the model'} ({type(module).__name__}) gets an input of shape {size} whose first dimension "
                f"is not the batch of {batch} samples (the model folds windows, heads or tokens into dimension 0), "
                "so per-sample adapters cannot be told apart there: run each adapter's samples with set_adapter"
            )

    kind = type(module)
    if kind in _BATCHNORMS and module.track_running_stats:
        stacked = {k: torch.stack(v).float() for k, v in values.items() if k != "num_batches_tracked"}
        alpha = torch.rsqrt(stacked["running_var"] + module.eps)
        if module.affine:
            alpha = alpha * stacked["weight"]
        shift = (stacked["bias"] if module.affine else 0) - stacked["running_mean"] * alpha
        stacked = {"alpha": alpha, "shift": shift}

        def batchnorm(x):
            check(x)
            return _batchnorm(module, x, stacked, index)

        return batchnorm
    if kind in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) or (kind in _INSTANCENORMS and not module.track_running_stats):
        stacked = {k: torch.stack(v) for k, v in values.items() if k in ("weight", "bias")}

        def normalize_then_scale(x):
            check(x)
            return _normalize_then_scale(module, x, stacked, index)

        return normalize_then_scale

    managed = {k: v for k, v in values.items() if k in module._parameters or k in module._buffers}

    def grouped(x, *args, **kwargs):  # any other layer: its own forward, once per adapter group
        check(x)
        out = None
        for slot in index.unique().tolist():
            rows = (index == slot).nonzero().squeeze(1)
            part = _forward_with(module, {k: v[slot] for k, v in managed.items()}, x[rows], args, kwargs)
            if not isinstance(part, torch.Tensor) or part.shape[:1] != rows.shape:
                raise RuntimeError(f"{name} returns {type(part).__name__}, not one tensor row per sample: "
                                   "per-sample adapters need layers that map a batch to a batch")
            if out is None:
                out = part.new_empty((batch, *part.shape[1:]))
            out[rows] = part
        return out

    return grouped


def _forward_with(module: nn.Module, tensors: dict[str, torch.Tensor], x, args, kwargs):
    """The module class's own forward (not this instance's override, nor its hooks) with ``tensors`` swapped in."""
    saved = {}
    try:
        for key, t in tensors.items():
            store = module._parameters if key in module._parameters else module._buffers
            saved[key] = (store, store[key])
            store[key] = t
        return type(module).forward(module, x, *args, **kwargs)
    finally:
        for key, (store, t) in saved.items():
            store[key] = t


def _channel_shape(x: torch.Tensor, channels_dim: int = 1) -> tuple[int, ...]:
    shape = [1] * x.dim()
    shape[0], shape[channels_dim] = x.shape[0], x.shape[channels_dim]
    return tuple(shape)


def _batchnorm(module, x: torch.Tensor, stacked: dict, index: torch.Tensor) -> torch.Tensor:
    """Eval BatchNorm with per-sample statistics and affine, as torch's inference kernel computes it:
    x * α + β' with α = γ / sqrt(var + eps) and β' = β - mean * α, one fused multiply-add."""
    shape = _channel_shape(x)
    alpha, shift = stacked["alpha"], stacked["shift"]
    return torch.addcmul(shift[index].view(shape).to(x.dtype), x, alpha[index].view(shape).to(x.dtype))


def _normalize_then_scale(module, x: torch.Tensor, stacked: dict, index: torch.Tensor) -> torch.Tensor:
    """The norm without its affine, then each sample's own γ (and β)."""
    if isinstance(module, nn.LayerNorm):
        y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1 - len(module.normalized_shape)) + tuple(module.normalized_shape)
    elif isinstance(module, nn.RMSNorm):
        y = F.rms_norm(x, module.normalized_shape, None, module.eps)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1 - len(module.normalized_shape)) + tuple(module.normalized_shape)
    elif isinstance(module, nn.GroupNorm):
        y = F.group_norm(x, module.num_groups, None, None, module.eps)
        shape = _channel_shape(x)
    else:  # InstanceNorm without running statistics
        y = F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        shape = _channel_shape(x)
    if stacked.get("weight") is not None:
        y = y * stacked["weight"][index].view(shape).to(y.dtype)
    if stacked.get("bias") is not None:
        y = y + stacked["bias"][index].view(shape).to(y.dtype)
    return y
