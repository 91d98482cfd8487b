"""Freeze everything but the affine γ/β of normalization layers; count trainable parameters."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from torch import nn

from .detect import is_frozen_batchnorm, norm_layers

__all__ = [
    "freeze_all_but_norm",
    "norm_parameter_names",
    "count_parameters",
    "print_trainable_parameters",
    "thaw_frozen_batchnorm",
    "match_names",
    "PatternError",
]

MATCH_BUDGET_SECONDS = 2.0  # for one regex over all of a model's names; real patterns take microseconds


class PatternError(ValueError):
    """A name pattern that cannot be used: too slow to match (catastrophic backtracking) or not a regex."""

_BIAS_NAMES = {"bias", "beta", "b", "shift", "offset"}


def match_names(
    patterns: str | Iterable[str], names: Iterable[str], *, budget: float = MATCH_BUDGET_SECONDS
) -> dict[str, list[str]]:
    """Match qualified names the way peft's ``target_modules`` does.

    A single string is a regular expression that must match a whole name; a list holds names that
    match exactly or as a dotted suffix (``"fc"`` matches ``"head.fc"``). Returns pattern -> matches.
    A regex gets ``budget`` seconds for all names together (patterns can come from a file, and some
    backtrack for minutes); past it, :class:`PatternError` is raised.
    """
    names = list(names)
    if isinstance(patterns, str):
        import regex  # the re-compatible engine with a match timeout (a dependency of transformers)

        try:
            compiled = regex.compile(patterns)
        except (regex.error, re.error) as err:
            raise PatternError(f"{_short(patterns)} is not a valid regular expression: {err}") from None
        deadline, hits = time.monotonic() + budget, []
        try:
            for n in names:
                if compiled.fullmatch(n, timeout=max(deadline - time.monotonic(), 1e-3)):
                    hits.append(n)
        except TimeoutError:
            raise PatternError(
                f"the regex {_short(patterns)} took more than {budget:g} s to match {len(names):,} module names "
                "(nested quantifiers backtrack exponentially): refused; list the module names instead"
            ) from None
        return {patterns: hits}
    suffixes = {}
    for n in names:  # every dotted suffix of every name, so a long list of patterns costs one lookup each
        parts = n.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), []).append(n)
    return {p: list(dict.fromkeys(suffixes.get(p, []))) for p in patterns}


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def _as_pattern_list(value: str | Iterable[str] | None, arg: str) -> str | list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise PatternError(f"{arg}={_short(value)} is not a valid regular expression: {err}") from None
        return value
    value = list(value)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg} must be a string (regex) or a list of module/parameter names, got {_short(repr(value))}")
    return value


def _shared_with_non_norm(model: nn.Module, norm_names: set[str]) -> set[int]:
    """ids of parameters that a non-norm module also owns (tied weights stay frozen)."""
    shared = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if name not in norm_names:
            shared.update(id(p) for p in module.parameters(recurse=False))
    return shared


def norm_parameter_names(
    model: nn.Module,
    *,
    exclude: str | Iterable[str] | None = None,
    train_weight: bool = True,
    train_bias: bool = True,
) -> list[str]:
    """Qualified names of the γ/β parameters that ``freeze_all_but_norm`` would train."""
    names = _select(model, None, exclude, train_weight, train_bias)[0]
    return sorted(names)


def _select(model, extra_trainable, exclude, train_weight, train_bias):
    """Validate and return (norm parameter names, extra parameter names); mutates nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not (train_weight or train_bias):
        raise ValueError("train_weight and train_bias are both False: nothing would be trained")
    extra = _as_pattern_list(extra_trainable, "extra_trainable")
    exclude = _as_pattern_list(exclude, "exclude")

    layers = norm_layers(model)
    frozen_bn = [n for n, m in layers if is_frozen_batchnorm(m)]
    module_names = [n for n, _ in model.named_modules()]
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]  # shared tensors by every name

    excluded = match_names(exclude, module_names + param_names)
    unmatched = [p for p, hits in excluded.items() if not hits]
    if unmatched:
        raise ValueError(f"exclude={unmatched} matches no module or parameter of {type(model).__name__}")
    excluded_names = {n for hits in excluded.values() for n in hits}

    def is_excluded(qualified: str) -> bool:
        return any(qualified == e or qualified.startswith(e + ".") for e in excluded_names)

    frozen_bn = [n for n in frozen_bn if not is_excluded(n)]
    if frozen_bn:
        raise ValueError(
            f"{frozen_bn[0] or 'the model'} is a FrozenBatchNorm2d (and {len(frozen_bn) - 1} more): its γ/β are "
            "buffers, so they cannot be trained. Call normonly.thaw_frozen_batchnorm(model) first to turn "
            "them into parameters (running statistics stay frozen), or pass exclude=[...] to leave them out."
        )

    norm_names = {n for n, _ in layers}
    shared = _shared_with_non_norm(model, norm_names)
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():  # a tensor shared by several norms is known by its first name
        canonical.setdefault(id(p), name)
    chosen: dict[int, str] = {}
    excluded_ids: set[int] = set()
    for layer_name, module in layers:
        for pname, p in module.named_parameters(recurse=False):
            qualified = f"{layer_name}.{pname}" if layer_name else pname
            is_bias = pname.lower() in _BIAS_NAMES
            if (is_bias and not train_bias) or (not is_bias and not train_weight):
                continue
            if id(p) in shared:
                continue
            if is_excluded(qualified) or is_excluded(canonical[id(p)]):  # excluding any owner excludes the tensor
                excluded_ids.add(id(p))
            chosen[id(p)] = canonical[id(p)]
    selected = [name for i, name in chosen.items() if i not in excluded_ids]
    if not selected:
        found = (
            f"{len(layers)} normalization layers, none with trainable γ/β left" if layers else "no normalization layer"
        )
        raise ValueError(
            f"{type(model).__name__} has {found}. If it uses a custom norm class, call "
            "normonly.register_norm_layer(MyNorm) first; check exclude=, train_weight= and train_bias=."
        )

    matched = match_names(extra, module_names + param_names)
    unmatched = [p for p, hits in matched.items() if not hits]
    if unmatched:
        raise ValueError(
            f"extra_trainable={unmatched} matches no module or parameter of {type(model).__name__}; "
            "use qualified names as in model.named_modules() (a suffix such as 'fc' is enough)"
        )
    extra_params = set()
    aliases = dict(model.named_parameters(remove_duplicate=False))
    for hits in matched.values():
        for hit in hits:
            extra_params.update(canonical[id(aliases[n])] for n in param_names if n == hit or n.startswith(hit + "."))
    return set(selected), extra_params


def freeze_all_but_norm(
    model: nn.Module,
    *,
    extra_trainable: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    train_weight: bool = True,
    train_bias: bool = True,
) -> nn.Module:
    """Freeze every parameter of ``model`` except the affine γ/β of its normalization layers.

    Works in place and returns ``model``. ``extra_trainable`` adds modules or parameters (e.g. a
    new head, ``["fc"]``); ``exclude`` keeps some norm layers frozen. Names follow peft's
    ``target_modules``: a list of exact names or dotted suffixes, or one regex string. Parameters
    tied to a non-norm module stay frozen. A γ/β shared by several norm layers is trained if any of them is
    selected and none of them (nor the tensor under any of its names) is excluded. On error nothing is changed.

    >>> model = torchvision.models.resnet18()
    >>> normonly.freeze_all_but_norm(model, extra_trainable=["fc"])
    """
    trainable, extra = _select(model, extra_trainable, exclude, train_weight, train_bias)
    trainable |= extra
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters, each shared tensor counted once."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return peft's line: ``trainable params: 9,600 || all params: 11,689,512 || trainable%: 0.0821``."""
    trainable, total = count_parameters(model)
    line = (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    )
    print(line)
    return line


def thaw_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Turn the γ/β buffers of every FrozenBatchNorm2d into parameters, in place.

    Running statistics stay buffers and the layer keeps normalizing with them, so the model's
    outputs do not change; afterwards ``freeze_all_but_norm`` trains those γ/β.
    """
    for _, module in norm_layers(model):
        if is_frozen_batchnorm(module):
            for key in ("weight", "bias"):
                value = module._buffers.pop(key)
                module.register_parameter(key, nn.Parameter(value.detach().clone()))
    return model
