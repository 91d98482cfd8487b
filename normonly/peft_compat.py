"""Move norm-only adapters to and from peft's LN tuning, on stock, unmodified peft.

peft's ``LNTuningConfig`` selects modules by name, so normonly hands it an anchored regex of the
layers it detected by type. A peft LN-tuning adapter stores each targeted layer's full state under
``base_model.model.<layer>.ln_tuning_layers.<tensor>`` and each ``modules_to_save`` module under
``base_model.model.<module>.<tensor>``; a normonly adapter stores the same tensors under their plain
names. Conversions check the adapter against the base model first and write atomically.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, NormOnlyConfig
from .detect import is_norm_layer, norm_layers
from .model import NormOnlyModel, _read_adapter
from .safe_io import read_json, read_tensors, write_files
from .selection import select_adapter_tensors, slot_tensor, tensor_slots

if TYPE_CHECKING:
    from peft import LNTuningConfig

__all__ = ["to_peft_config", "to_peft_adapter", "from_peft_adapter"]

PEFT_PREFIX = "base_model.model."
LN_INFIX = ".ln_tuning_layers."


def to_peft_config(config: NormOnlyConfig, model: nn.Module) -> LNTuningConfig:
    """A stock ``peft.LNTuningConfig`` that makes ``peft.get_peft_model`` train the layers ``config`` selects.

    >>> peft_model = peft.get_peft_model(model, normonly.to_peft_config(NormOnlyConfig(), model))

    peft trains every parameter of each targeted layer and lets BatchNorm use batch statistics in
    train mode, so ``train_weight=False``/``train_bias=False`` and ``bn_stats="freeze"`` only warn.
    """
    base = _unwrap(model)
    selection = select_adapter_tensors(base, config)
    if not (config.train_weight and config.train_bias):
        warnings.warn("peft's LN tuning trains both γ and β of each targeted layer", stacklevel=2)
    if config.bn_stats == "freeze":
        warnings.warn("peft's LN tuning cannot freeze BatchNorm statistics in train mode", stacklevel=2)
    return _ln_tuning_config(base, selection.norm_modules, selection.modules_to_save, config.base_model_name_or_path)


def to_peft_adapter(src: str | os.PathLike, dst: str | os.PathLike, model: nn.Module) -> None:
    """Convert the normonly adapter in ``src`` into a peft LN-tuning adapter in ``dst``.

    ``model`` is the base model (it is only read): peft stores each targeted layer's full state, so
    tensors the adapter does not hold come from it. Load the result with
    ``peft.PeftModel.from_pretrained(base, dst)``.
    """
    base = _unwrap(model)
    config, selection, values = _read_adapter(base, src)
    saved = selection.modules_to_save
    held = {key.rpartition(".")[0] for key in values}
    targets = [n for n, _ in norm_layers(base) if n in held and not any(n == m or n.startswith(m + ".") for m in saved)]
    canonical = {id(slot_tensor(slot)): name for name, slot in tensor_slots(base).items()}
    state = {}
    for layer in targets:
        for key, t in base.get_submodule(layer).state_dict(keep_vars=True).items():
            state[f"{PEFT_PREFIX}{layer}{LN_INFIX}{key}"] = values.get(f"{layer}.{key}", t.detach())
    for module in saved:
        for key, t in base.get_submodule(module).state_dict(keep_vars=True).items():
            state[f"{PEFT_PREFIX}{module}.{key}"] = values[canonical[id(t)]]
    peft_config = _ln_tuning_config(base, targets, saved, config.base_model_name_or_path)
    with tempfile.TemporaryDirectory() as tmp:
        peft_config.save_pretrained(tmp)
        peft_json = read_json(Path(tmp) / CONFIG_NAME)
    write_files(dst, json_files={CONFIG_NAME: peft_json}, tensor_files={WEIGHTS_NAME: state})


def from_peft_adapter(src: str | os.PathLike, dst: str | os.PathLike, model: nn.Module) -> None:
    """Convert the peft LN-tuning adapter in ``src`` into a normonly adapter in ``dst``.

    Targeted normalization layers become ``target_modules``; other targeted modules and peft's
    ``modules_to_save`` become ``modules_to_save``; ``bn_stats`` is ``"update"`` (peft saves the
    running statistics of the layers it copies; the others come from ``model``, which is only read).
    """
    from peft import LNTuningConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    base = _unwrap(model)
    src = Path(src)
    data = read_json(src / CONFIG_NAME)
    if data.get("peft_type") != "LN_TUNING":
        kind = data.get("peft_type") or data.get("adapter_type")
        raise ValueError(f"{src / CONFIG_NAME} is not a peft LN-tuning adapter (type {kind!r})")
    if not (src / WEIGHTS_NAME).is_file() and (src / "adapter_model.bin").is_file():
        raise ValueError(f"{src} holds a pickled adapter_model.bin; normonly reads only safetensors (save it again)")
    peft_config = LNTuningConfig.from_pretrained(str(src))
    tensors = read_tensors(src / WEIGHTS_NAME)

    names = [n for n, _ in base.named_modules() if n]
    saved = _outermost([n for n in names if any(n.endswith(m) for m in peft_config.modules_to_save or [])])
    targets = [n for n in names if check_target_module_exists(peft_config, n) and n not in saved]
    modules = dict(base.named_modules())
    norm_targets = [
        n for n in targets if is_norm_layer(modules[n]) and any(True for _ in modules[n].parameters(recurse=False))
    ]
    config = NormOnlyConfig(
        target_modules=_anchored(norm_targets) if norm_targets else None,
        modules_to_save=[n for n in names if n in set(saved) | (set(targets) - set(norm_targets))] or None,
        bn_stats="update",
        base_model_name_or_path=peft_config.base_model_name_or_path,
    )
    try:
        selection = select_adapter_tensors(base, config)
    except ValueError as err:
        raise ValueError(f"peft adapter {src} does not fit this {type(base).__name__}: {err}") from None
    converted = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{src / WEIGHTS_NAME}: key {key!r} lacks peft's {PEFT_PREFIX!r} prefix")
        converted[key[len(PEFT_PREFIX) :].replace(LN_INFIX, ".")] = t
    slots = tensor_slots(base)
    order = {name: i for i, name in enumerate(slots)}
    for key in sorted(converted, key=lambda k: (order.get(k, len(order)), k)):  # report in the model's order
        t = converted[key]
        if key not in selection.tensors:
            raise ValueError(
                f"peft adapter {src} does not fit this {type(base).__name__}: first mismatching key "
                f"{key!r}: the model has no such tensor among the layers the adapter targets"
            )
        live = slot_tensor(slots[key])
        if t.shape != live.shape:
            raise ValueError(
                f"peft adapter {src} does not fit this {type(base).__name__}: first mismatching key "
                f"{key!r}: shape {tuple(t.shape)} in the file, {tuple(live.shape)} in the model"
            )
    values = {n: converted.get(n, slot_tensor(slots[n])) for n in selection.tensors}
    write_files(dst, json_files={CONFIG_NAME: config.to_dict()}, tensor_files={WEIGHTS_NAME: values})


def _unwrap(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, NormOnlyModel) else model


def _anchored(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _ln_tuning_config(base: nn.Module, targets: list[str], saved: list[str], name: str | None) -> LNTuningConfig:
    from peft import LNTuningConfig

    if not targets:
        raise ValueError("the adapter trains no normalization layer outside modules_to_save; peft needs one target")
    if "" in targets:
        raise ValueError("the model itself is a normalization layer; peft cannot target it by name")
    names = [n for n, _ in base.named_modules() if n]
    wrapped = _outermost([n for n in names if any(n.endswith(m) for m in saved)])
    if sorted(wrapped) != sorted(saved):
        extra = sorted(set(wrapped) - set(saved))
        raise ValueError(
            f"peft matches modules_to_save by suffix and would also train {extra}; rename the modules or leave "
            "modules_to_save out of the peft config"
        )
    return LNTuningConfig(
        target_modules=_anchored(targets), modules_to_save=saved or None, base_model_name_or_path=name
    )
