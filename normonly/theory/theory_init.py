"""``NormOnlyConfig(init="theory")``: registered so the name is known, but it needs a target network.

An adapter config is saved as JSON and cannot carry a target network, so the theory init is a call,
not a config value: ``theory.fit(model, target)`` on the base model (before wrapping, then
``init="keep"``) or on the ``NormOnlyModel`` (after wrapping) sets the γ/β from the construction.
"""

from __future__ import annotations

from torch import nn

from ..init import register_initializer

__all__ = ["THEORY_INIT_HELP"]

THEORY_INIT_HELP = (
    "init='theory' sets γ/β from a target network, which an adapter config cannot carry. Build the adapter "
    "with init='keep' and call normonly.theory.fit(model, target) on it (or on the base model before wrapping): "
    "it sets the γ/β from the construction when the widths meet the theorem and by least squares when they "
    "do not, and returns the residual"
)


@register_initializer("theory")
def theory_init(model: nn.Module, names: list[str]) -> None:
    """Always raises: see ``THEORY_INIT_HELP`` (nothing is changed)."""
    raise ValueError(THEORY_INIT_HELP)
