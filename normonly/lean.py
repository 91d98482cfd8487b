"""Frozen convolutions that keep only what their input gradient needs, for less activation memory.

PyTorch's autograd saves a convolution's input for the weight gradient even when the weight is frozen
(a Linear's input is already skipped when its weight is frozen). In norm-only training that input is
often kept alive only by the convolution: after a SiLU/GELU, a squeeze-excite product or a
normalization without activation (EfficientNet, MobileNetV3, ConvNeXt). Inside ``lean_frozen_convs()``
such convolutions save nothing but their (frozen) weight; the gradients are bit-identical to the plain
path (checked on CPU by tests/test_lean.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["lean_frozen_convs"]

_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


class _FrozenWeightConv(torch.autograd.Function):
    """A convolution whose backward computes the input (and bias) gradient only; it saves the weight alone."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, conv):
        ctx.save_for_backward(weight)  # a frozen parameter: saving it keeps no extra memory alive
        ctx.params = (stride, padding, dilation, groups)
        ctx.input_size = input.shape
        ctx.bias_size = None if bias is None else list(bias.shape)
        return conv(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.params
        # The same backward kernel as the plain path, asked for no weight gradient: it reads only the input's
        # sizes, so a zero-stride stand-in replaces the activation the plain path keeps alive.
        stand_in = grad_output.new_empty(()).expand(ctx.input_size)
        grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, stand_in, weight, ctx.bias_size, stride, padding, dilation, False,
            [0] * len(stride), groups, [ctx.needs_input_grad[0], False, ctx.needs_input_grad[2]],
        )
        return grad_input, None, grad_bias, None, None, None, None, None


def _as_list(value, n: int) -> list[int] | None:
    if isinstance(value, int):
        return [value] * n
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        return None  # e.g. padding="same"
    if len(value) == 1:
        return [value[0]] * n
    return list(value) if len(value) == n else None


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)  # tensor subclasses (DTensor, ...) keep their own path


def _lean_conv(func, n: int, args, kwargs):
    """Run ``func`` through ``_FrozenWeightConv`` when that is exact and saves memory; else return None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    call = {**defaults, **dict(zip(names, args)), **kwargs}
    if set(call) != set(names):
        return None
    x, weight, bias = call["input"], call["weight"], call["bias"]
    if not (_plain(x) and _plain(weight) and x.requires_grad and not weight.requires_grad):
        return None
    if bias is not None and not _plain(bias):
        return None
    padding = [0] * n if call["padding"] == "valid" else _as_list(call["padding"], n)
    stride, dilation = _as_list(call["stride"], n), _as_list(call["dilation"], n)
    if padding is None or stride is None or dilation is None or not isinstance(call["groups"], int):
        return None  # padding="same" and other forms go the plain way
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Do what autocast does for a convolution (cast to the autocast dtype), then run without it.
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _FrozenWeightConv.apply(x, weight, bias, stride, padding, dilation, call["groups"], func)
    return _FrozenWeightConv.apply(x, weight, bias, stride, padding, dilation, call["groups"], func)


class _LeanFrozenConvMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _CONVS.get(func)
        if n is not None and torch.is_grad_enabled():
            out = _lean_conv(func, n, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextmanager
def lean_frozen_convs():
    """Inside this context, a convolution whose weight is frozen saves only its weight for backward.

    Wrap the forward pass (the backward can run outside). It applies to ``F.conv1d/2d/3d`` calls,
    which every ``nn.Conv*d`` makes, when the input requires grad and the weight does not; a trainable
    bias (BitFit) is fine, and so is autocast. Gradients are bit-identical to the plain path (checked on
    CPU); what changes is that the convolution's input is no longer kept for a weight gradient nobody
    asked for. It costs a Python dispatch per op of the forward pass. Eager mode only.

    >>> normonly.freeze_all_but_norm(model)
    >>> with normonly.lean_frozen_convs():
    ...     loss = criterion(model(x), y)
    >>> loss.backward()
    """
    with _LeanFrozenConvMode():
        yield
