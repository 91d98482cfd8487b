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
]
