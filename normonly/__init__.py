"""normonly: fine-tune any PyTorch model by training only its normalization layers."""

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
    # performance
    "trainable_parameters",
    "eval_mode",
    "lean_frozen_convs",
]
