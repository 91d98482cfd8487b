"""``NormOnlyConfig(init="theory")``: a new adapter's γ/β from the construction for a target network.

The target is not part of the (JSON) config; it is passed when the adapter is created::

    model = get_normonly_model(net, NormOnlyConfig(init="theory"), init_kwargs={"target": target})

The saved adapter holds the resulting γ/β, so loading it needs no target.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..init import register_initializer
from .fit import fit

__all__ = ["THEORY_INIT_HELP"]

THEORY_INIT_HELP = (
    "init='theory' sets γ/β from a target network: pass it when creating the adapter, "
    "get_normonly_model(net, NormOnlyConfig(init='theory'), init_kwargs={'target': target}), or call "
    "normonly.theory.fit(model, target) yourself (on the base model before wrapping, or on the NormOnlyModel)"
)


@register_initializer("theory")
def theory_init(model: nn.Module, names: list[str], target: nn.Module | None = None, **fit_kwargs) -> None:
    """Set the adapter's BatchNorm γ/β with :func:`normonly.theory.fit` (``fit_kwargs``: ``input_bound``, ...).

    Exact when the network is wide enough for the theorem; otherwise least squares, with a warning giving the
    residual. Raises (changing nothing) without a target, or when the adapter leaves some of the network's
    BatchNorm γ/β out.
    """
    if target is None:
        raise ValueError(THEORY_INIT_HELP)
    bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm1d) for p in ("weight", "bias")}
    missing = sorted(bn - set(names))
    if missing:
        raise ValueError(f"init='theory' sets every BatchNorm γ/β of the network, but the adapter leaves out {missing[0]}"
                         " (and maybe more): drop target_modules / exclude_modules / train_weight / train_bias limits")
    result = fit(model, target, **fit_kwargs)
    if not result.exact:
        warnings.warn(f"init='theory': the network is narrower than the theorem needs; least-squares γ/β with "
                      f"relative residual {result.residual:.3g}", stacklevel=2)
