"""normonly: fine-tune any PyTorch model by training only its normalization layers.

Public names are imported on first use (PEP 562), so ``import normonly`` and the ``normonly`` command's
``--help`` start without importing torch; ``normonly.freeze_all_but_norm`` and ``from normonly import X`` work as
usual and import what they need then.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that provides it
_SOURCES = {
    "count_parameters": "freeze",
    "freeze_all_but_norm": "freeze",
    "is_norm_layer": "detect",
    "norm_layers": "detect",
    "norm_parameter_names": "freeze",
    "print_trainable_parameters": "freeze",
    "register_norm_layer": "detect",
    "thaw_frozen_batchnorm": "freeze",
    # adapters
    "NormOnlyConfig": "config",
    "NormOnlyModel": "model",
    "get_normonly_model": "model",
    "save_adapter": "model",
    "build_base": "models",
    "load_trainable": "checkpoint",
    "to_peft_config": "peft_compat",
    "to_peft_adapter": "peft_compat",
    "from_peft_adapter": "peft_compat",
    # Trainer integration: imports transformers.Trainer (seconds) on first use only
    "NormOnlyTrainer": "integrations.trainer",
    # performance
    "trainable_parameters": "training",
    "eval_mode": "training",
    "lean_frozen_convs": "lean",
}

__all__ = [
    "count_parameters",
    "freeze_all_but_norm",
    "is_norm_layer",
    "norm_layers",
    "norm_parameter_names",
    "print_trainable_parameters",
    "register_norm_layer",
    "thaw_frozen_batchnorm",
    # adapters
    "NormOnlyConfig",
    "NormOnlyModel",
    "get_normonly_model",
    "save_adapter",
    "build_base",
    "load_trainable",
    "to_peft_config",
    "to_peft_adapter",
    "from_peft_adapter",
    # Trainer integration
    "NormOnlyTrainer",
    # performance
    "trainable_parameters",
    "eval_mode",
    "lean_frozen_convs",
]

if TYPE_CHECKING:
    from . import theory as theory
    from .checkpoint import load_trainable
    from .config import NormOnlyConfig
    from .detect import is_norm_layer, norm_layers, register_norm_layer
    from .freeze import (
        count_parameters,
        freeze_all_but_norm,
        norm_parameter_names,
        print_trainable_parameters,
        thaw_frozen_batchnorm,
    )
    from .integrations.trainer import NormOnlyTrainer
    from .lean import lean_frozen_convs
    from .model import NormOnlyModel, get_normonly_model, save_adapter
    from .models import build_base
    from .peft_compat import from_peft_adapter, to_peft_adapter, to_peft_config
    from .training import eval_mode, trainable_parameters


def __getattr__(name: str):
    if name in _SOURCES:
        if name != "NormOnlyTrainer":
            # `import normonly` used to import the theory package, which registers init="theory"; keep that true
            # for everything that can build or read a NormOnlyConfig (costs ~20 ms once torch is loaded)
            importlib.import_module(f"{__name__}.theory")
        value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule: normonly.theory, normonly.models, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    import pkgutil

    return sorted(set(globals()) | set(__all__) | {m.name for m in pkgutil.iter_modules(__path__)})
