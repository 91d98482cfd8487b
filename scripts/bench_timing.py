"""The timer shared by the benchmark scripts (imported by name: scripts/ is on sys.path when they run)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed_both(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall-clock, this process's CPU) seconds of ``fn()``; on a shared machine CPU time leaves out waiting."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu
