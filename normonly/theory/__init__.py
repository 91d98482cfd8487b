"""What normalization parameters alone can express: the constructions of Giannou, Rajput &
Papailiopoulos, "The Expressive Power of Tuning Only the Normalization Layers" (COLT 2023).

>>> from normonly import theory
>>> net = theory.reconstruct(target, method="wide", input_bound=1.0, seed=0)   # also skip, sparse, lowrank
>>> theory.fit(random_net, target).residual                                    # the "theory" init
>>> theory.fit(get_normonly_model(random_net, NormOnlyConfig()), target)       # an adapter starting there
"""

from .draws import default_sparsity
from .fit import FitResult, fit
from .khatri_rao_system import khatri_rao, pair_condition, pair_system, solve_pair
from .network import METHODS, random_network
from .reconstruct import reconstruct
from .skip import SkipLayer
from .theory_init import THEORY_INIT_HELP
from .verify import box_inputs, max_relative_error

__all__ = [
    "METHODS",
    "FitResult",
    "SkipLayer",
    "THEORY_INIT_HELP",
    "box_inputs",
    "default_sparsity",
    "fit",
    "khatri_rao",
    "max_relative_error",
    "pair_condition",
    "pair_system",
    "random_network",
    "reconstruct",
    "solve_pair",
]
