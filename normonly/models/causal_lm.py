"""A pretrained Hugging Face causal language model, as the base of ``recipes/finetune_causal_lm.py``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["causal_lm"]


def causal_lm(model: str, *, seed: int = 0) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(model)`` (a hub id or local folder); anything the checkpoint lacks is
    drawn from ``seed`` without touching the global random state, so a rebuild is bit-identical.

    >>> base = causal_lm("Qwen/Qwen3-0.6B")
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_pretrained(model)
