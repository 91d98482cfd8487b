"""γ/β initializers for a new adapter: a registry of ``name -> fn(model, parameter_names)``.

``keep`` leaves the pretrained values, ``frankle`` draws γ ~ U[0, 1] and sets β = 0 (Frankle et
al. 2021), ``ones`` sets the identity scale γ = 1 and β = 0. Scales are *effective* scales: for
norms that multiply by ``(1 + weight)`` (Gemma) ``ones`` writes ``weight = 0``, found by probing
the module, not by its class name.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch
from torch import nn

from .freeze import _BIAS_NAMES

__all__ = ["INITIALIZERS", "register_initializer", "initialize", "identity_scale"]

Initializer = Callable[[nn.Module, list[str]], None]
INITIALIZERS: dict[str, Initializer] = {}

_PROBE_SHAPES = ((4, -1), (2, 3, -1), (2, -1, 3), (2, -1, 3, 3), (2, 3, 3, -1), (2, -1, 3, 3, 3))


def register_initializer(name: str) -> Callable[[Initializer], Initializer]:
    """Register ``fn(model, parameter_names, **kwargs)`` under ``name``, usable as ``NormOnlyConfig(init=name)``;
    ``kwargs`` come from ``get_normonly_model(..., init_kwargs=...)``.

    The function changes the named γ/β parameters of ``model`` in place (under ``torch.no_grad``).
    """

    def decorator(fn: Initializer) -> Initializer:
        INITIALIZERS[name] = fn
        return fn

    return decorator


def initialize(model: nn.Module, parameter_names: list[str], method: str, **kwargs) -> None:
    """Apply the initializer ``method`` (with ``kwargs``) to ``parameter_names`` of ``model``; on error nothing
    is changed."""
    if method not in INITIALIZERS:
        raise ValueError(f"init={method!r} is not a known initializer; choose one of {sorted(INITIALIZERS)}")
    try:
        inspect.signature(INITIALIZERS[method]).bind(model, list(parameter_names), **kwargs)
    except TypeError as e:
        raise TypeError(f"init={method!r} does not take init_kwargs {sorted(kwargs)}: {e}") from None
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in parameter_names}
    try:
        with torch.no_grad():
            INITIALIZERS[method](model, list(parameter_names), **kwargs)
    except BaseException:
        with torch.no_grad():
            for n, value in before.items():
                params[n].copy_(value)
        raise


def identity_scale(module: nn.Module, weight_name: str = "weight") -> float:
    """The value of ``weight_name`` that makes ``module`` scale by exactly 1.

    1.0 for ``normalized(x) * weight`` and 0.0 for Gemma's ``normalized(x) * (1 + weight)``. torch's
    own norm classes are known; any other module is probed on a copy: with β = 0, a plain scale
    outputs zeros at weight = 0 while an offset scale outputs ``normalized(x)``.
    """
    if type(module).__module__.startswith("torch.nn."):
        return 1.0
    weight = getattr(module, weight_name)
    probe = copy.deepcopy(module).eval()
    with torch.no_grad():
        for name, p in probe.named_parameters(recurse=False):
            if name.lower() in _BIAS_NAMES:
                p.zero_()
        for shape in _PROBE_SHAPES:
            x = torch.randn(*[weight.numel() if s == -1 else s for s in shape], device=weight.device).to(weight.dtype)
            outs = []
            try:
                for value in (0.0, 1.0):
                    getattr(probe, weight_name).fill_(value)
                    out = probe(x)
                    outs.append(out if isinstance(out, torch.Tensor) else None)
            except Exception:
                continue
            if any(o is None or o.shape != x.shape for o in outs):
                continue
            at0, at1 = (o.float() for o in outs)
            tol = 1e-3 * at1.abs().max().clamp_min(1e-6)
            if at0.abs().max() <= tol:
                return 1.0
            if (at1 - 2 * at0).abs().max() <= tol:
                return 0.0
            break
    raise ValueError(
        f"cannot tell how {type(module).__name__} uses its {weight_name!r} (neither normalized(x) * w nor "
        "normalized(x) * (1 + w) on a probe input); use init='keep' or exclude_modules for this layer"
    )


def _set_scale_and_shift(model: nn.Module, names: list[str], scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Set every weight-like parameter to an effective scale drawn by ``scale(param)`` and every bias to 0."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    plan = []
    for name in names:
        layer, _, leaf = name.rpartition(".")
        if leaf.lower() in _BIAS_NAMES:
            plan.append((params[name], None))
            continue
        module = modules[layer]
        scales = [n for n, _ in module.named_parameters(recurse=False) if n.lower() not in _BIAS_NAMES]
        if scales != [leaf]:
            raise ValueError(
                f"{layer or 'the model'} ({type(module).__name__}) has scale-like parameters {scales}; "
                "this initializer knows one scale per layer: use init='keep' or exclude_modules"
            )
        plan.append((params[name], identity_scale(module, leaf)))
    for p, identity in plan:  # all checks passed: now write
        if identity is None:
            p.zero_()
        else:
            p.copy_(scale(p) + (identity - 1.0))


@register_initializer("keep")
def keep(model: nn.Module, names: list[str]) -> None:
    """Keep the pretrained γ/β."""


@register_initializer("frankle")
def frankle(model: nn.Module, names: list[str]) -> None:
    """γ ~ U[0, 1] (effective scale), β = 0, as in Frankle et al. (2021); uses torch's global RNG."""
    _set_scale_and_shift(model, names, lambda p: torch.rand(p.shape, device=p.device).to(p.dtype))


@register_initializer("ones")
def ones(model: nn.Module, names: list[str]) -> None:
    """Identity scale (γ = 1, or weight = 0 for ``1 + weight`` norms) and β = 0."""
    _set_scale_and_shift(model, names, torch.ones_like)


@register_initializer("theory")
def theory(model: nn.Module, names: list[str], **kwargs) -> None:
    """γ/β from a target network (Giannou et al.): :func:`normonly.theory.theory_init`, imported on first use so
    that ``init="theory"`` is known even where ``normonly.theory`` has not been imported yet."""
    from .theory.theory_init import theory_init

    theory_init(model, names, **kwargs)
