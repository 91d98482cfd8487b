"""normonly: fine-tune any PyTorch model by training only its normalization layers."""

# theory: `from normonly import theory` (Giannou et al. constructions)
from . import theory as theory
from .detect import is_norm_layer, norm_layers, register_norm_layer
from .freeze import (
    count_parameters,
    freeze_all_but_norm,
    norm_parameter_names,
    print_trainable_parameters,
    thaw_frozen_batchnorm,
)

# isort: split
# adapters
from .config import NormOnlyConfig
from .model import NormOnlyModel, get_normonly_model
from .peft_compat import from_peft_adapter, to_peft_adapter, to_peft_config

# isort: split
# performance
from .lean import lean_frozen_convs
from .training import eval_mode, trainable_parameters

# isort: split
# Trainer integration: `normonly.NormOnlyTrainer` imports transformers.Trainer (seconds) on first use only
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .integrations.trainer import NormOnlyTrainer


def __getattr__(name: str):
    if name == "NormOnlyTrainer":
        from .integrations.trainer import NormOnlyTrainer

        return NormOnlyTrainer
    raise AttributeError(f"module 'normonly' has no attribute {name!r}")


__version__ = "0.1.0"

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
