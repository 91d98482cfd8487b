"""Which tensors of a model a norm-only adapter trains and saves, given its NormOnlyConfig."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import NormOnlyConfig
from .detect import norm_layers
from .freeze import match_names, norm_parameter_names

__all__ = ["AdapterSelection", "select_adapter_tensors", "running_stat_names", "tensor_slots", "slot_tensor"]


@dataclass(frozen=True)
class AdapterSelection:
    """Qualified names, in the model's order, of what one adapter covers."""

    trainable: list[str]  # parameters the adapter trains: selected γ/β and all of modules_to_save
    tensors: list[str]  # everything the adapter file holds: trainable + running stats + modules_to_save buffers
    norm_modules: list[str]  # normalization layers whose γ/β it trains (outside modules_to_save)
    modules_to_save: list[str]


def tensor_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """``name -> (owner module, attribute, is_parameter)`` for each persistent tensor, shared ones once."""
    slots, seen = {}, set()
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for key, t in module._parameters.items():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                slots[prefix + key] = (module, key, True)
        for key, t in module._buffers.items():
            if t is not None and id(t) not in seen and key not in module._non_persistent_buffers_set:
                seen.add(id(t))
                slots[prefix + key] = (module, key, False)
    return slots


def running_stat_names(model: nn.Module) -> list[str]:
    """Running-statistics buffers of every normalization layer (``running_mean``, ``num_batches_tracked``, ...)."""
    names = []
    for lname, layer in norm_layers(model):
        for key, t in layer._buffers.items():
            if t is not None and (key.startswith("running_") or key == "num_batches_tracked"):
                names.append(f"{lname}.{key}" if lname else key)
    return names


def select_adapter_tensors(model: nn.Module, config: NormOnlyConfig) -> AdapterSelection:
    """Resolve ``config`` on ``model``; raises a ValueError naming any pattern that matches nothing."""
    model_name = type(model).__name__
    module_names = [n for n, _ in model.named_modules()]
    save_modules = _resolve(config.modules_to_save, module_names, "modules_to_save", model_name)

    def in_saved_module(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in save_modules)

    norm_params = norm_parameter_names(
        model, exclude=config.exclude_modules, train_weight=config.train_weight, train_bias=config.train_bias
    )
    by_layer: dict[str, list[str]] = {}
    for p in norm_params:
        by_layer.setdefault(p.rpartition(".")[0], []).append(p)
    layer_order = [n for n, _ in norm_layers(model)]
    layers = [n for n in layer_order if n in by_layer]
    if config.target_modules is not None:
        targeted = set(_resolve(config.target_modules, layers, "target_modules", model_name, what="trainable norm"))
        layers = [n for n in layers if n in targeted]
    layers = [n for n in layers if not in_saved_module(n)]

    slots = tensor_slots(model)
    trainable = {p for n in layers for p in by_layer[n]}
    tensors = set(trainable)
    if config.bn_stats == "update":
        tensors.update(running_stat_names(model))
    canonical = {id(slot_tensor(slot)): name for name, slot in slots.items()}
    for m in save_modules:
        module = model.get_submodule(m)
        trainable.update(canonical[id(p)] for p in module.parameters())
        tensors.update(canonical[id(t)] for t in module.state_dict(keep_vars=True).values())
    order = list(slots)
    return AdapterSelection(
        trainable=[n for n in order if n in trainable],
        tensors=[n for n in order if n in tensors],
        norm_modules=layers,
        modules_to_save=save_modules,
    )


def slot_tensor(slot: tuple[nn.Module, str, bool]):
    """The tensor a slot of ``tensor_slots`` currently holds (looked up fresh: ``.to()`` replaces buffers)."""
    module, key, is_param = slot
    return module._parameters[key] if is_param else module._buffers[key]


def _resolve(patterns, names: list[str], arg: str, model_name: str, what: str = "") -> list[str]:
    """Names matched by ``patterns`` (peft's rules, via match_names), erroring on patterns that match nothing."""
    if patterns is None:
        return []
    matched = match_names(patterns, names)
    unmatched = [p for p, hits in matched.items() if not hits]
    if unmatched:
        kind = f"{what} layer" if what else "module"
        examples = ", ".join(repr(n) for n in names[:4])
        raise ValueError(
            f"{arg}={unmatched} matches no {kind} of {model_name} (e.g. {examples}); use qualified names as in "
            "model.named_modules(), a dotted suffix, or one regex that matches whole names"
        )
    hits = {h for v in matched.values() for h in v}
    return [n for n in names if n in hits]
