"""The work a training step asks of the hardware, counted exactly (imported by name, like bench_timing).

Wall-clock time on a shared machine cannot rank methods that run nearly the same kernels; what each one
dispatches can be counted instead, and the count is the same on every run. A ``TorchDispatchMode`` sees every
aten op of the forward pass, the backward pass (the autograd engine carries the mode over) and the optimizer step:

    ops     aten ops dispatched (views and metadata queries included: each is a call into the framework)
    flops   floating-point operations of convolutions, matrix products and attention (torch's flop formulas)
    bytes   bytes of the tensors each op takes and returns (views and aliases count none): a memory-traffic proxy
    modules nn.Module forward calls (Python work that no aten op shows, such as a wrapper around a layer)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

aten = torch.ops.aten

# torch's formulas (they take tensors) cover the CUDA attention kernels; the CPU one has the same argument order
FLOPS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}


def _tensor_bytes(tree) -> int:
    seen, total = set(), 0
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class WorkCounter(TorchDispatchMode):
    """Counts aten ops, flops and tensor bytes of everything run inside ``with WorkCounter() as work:``."""

    def __init__(self):
        super().__init__()
        self.ops = self.flops = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        packet = func._overloadpacket
        if packet in FLOPS:
            self.flops += FLOPS[packet](*args, **kwargs, out_val=out)
        if not func.is_view and packet not in (aten.detach, aten.alias):
            self.bytes += _tensor_bytes((args, kwargs, out))
        return out

    def as_dict(self) -> dict[str, int]:
        return {"ops": self.ops, "flops": self.flops, "bytes": self.bytes}


def step_work(step: Callable[[], None]) -> dict[str, int]:
    """Ops, flops, bytes and module calls of one call of ``step`` (run it once before: lazy state exists then)."""
    calls = [0]

    def count_call(module, inputs):
        calls[0] += 1

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_call)
    try:
        with WorkCounter() as work:
            step()
    finally:
        hook.remove()
    return {**work.as_dict(), "modules": calls[0]}
