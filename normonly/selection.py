"""Which tensors of a model a norm-only adapter trains and saves, given its NormOnlyConfig."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import NormOnlyConfig
from .detect import norm_layers
from .freeze import PatternError, match_names, norm_parameter_names

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

    norm_params = set(
        norm_parameter_names(
            model, exclude=config.exclude_modules, train_weight=config.train_weight, train_bias=config.train_bias
        )
    )
    slots = tensor_slots(model)
    canonical = {id(slot_tensor(slot)): name for name, slot in slots.items()}
    owners: dict[str, list[str]] = {}  # trainable γ/β (by canonical name) -> every norm layer that holds it
    found = norm_layers(model)
    all_layers = [n for n, _ in found]
    for lname, layer in found:
        for p in layer.parameters(recurse=False):
            name = canonical.get(id(p))
            if name in norm_params:
                owners.setdefault(name, []).append(lname)
    owning = {layer for o in owners.values() for layer in o}
    layers = [n for n in all_layers if n in owning]
    if config.target_modules is not None:
        targeted = set(_resolve(config.target_modules, layers, "target_modules", model_name, what="trainable norm"))
        layers = [n for n in layers if n in targeted]
    layers = [n for n in layers if not in_saved_module(n)]
    chosen = set(layers)
    trainable = {p for p, o in owners.items() if chosen.intersection(o)}  # shared: trained if any owner is chosen

    tensors = set(trainable)
    if config.bn_stats == "update":
        tensors.update(running_stat_names(model))
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
    try:
        matched = match_names(patterns, names)
    except PatternError as err:
        raise PatternError(f"{arg}: {err}") from None
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
