"""Model builders the recipes train, and the registry that rebuilds a run's base model from its adapter.

A recipe records its base as ``{"builder": NAME, "kwargs": {...}}`` (``NormOnlyConfig.base_model_spec``);
``build_base`` calls the registered builder of that name with those arguments, so a random-weight ResNet is
rebuilt from its seed and a pretrained encoder from its package or hub id. Only builders registered here run:
a spec read from a file never names arbitrary code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .causal_lm import causal_lm
from .cifar_resnet import CifarResNet, cifar_resnet, frankle_init_
from .image_classifier import ImageClassifier, build_image_classifier, image_classifier
from .sentence_classifier import SentenceClassifier, sentence_classifier

__all__ = [
    "CifarResNet",
    "cifar_resnet",
    "frankle_init_",
    "SentenceClassifier",
    "sentence_classifier",
    "ImageClassifier",
    "build_image_classifier",
    "image_classifier",
    "causal_lm",
    "BUILDERS",
    "base_spec",
    "build_base",
]

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet": cifar_resnet,
    "sentence_classifier": sentence_classifier,
    "image_classifier": image_classifier,
    "causal_lm": causal_lm,
}


def base_spec(builder: str, **kwargs) -> dict:
    """The JSON-ready record of how to rebuild a base model: ``{"builder": builder, "kwargs": kwargs}``."""
    if builder not in BUILDERS:
        raise ValueError(f"unknown builder {builder!r}; registered: {sorted(BUILDERS)}")
    return {"builder": builder, "kwargs": kwargs}


def build_base(spec: dict | str | os.PathLike) -> nn.Module:
    """Rebuild the base model a spec describes (see :func:`base_spec`), or the one an adapter folder recorded
    (its ``base.json``, else ``adapter_config.json``'s ``base_model_spec``).

    >>> base = build_base({"builder": "cifar_resnet", "kwargs": {"depth": 14, "width": 1, "seed": 0}})
    >>> base = build_base("runs/r14-norm/adapter")      # what recipes/resnet_cifar.py trained on
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = _read_spec(Path(spec))
    if not isinstance(spec, dict) or set(spec) != {"builder", "kwargs"} or not isinstance(spec["kwargs"], dict):
        raise ValueError(f"a base model spec is {{'builder': NAME, 'kwargs': {{...}}}}, got {str(spec)[:200]}")
    if spec["builder"] not in BUILDERS:
        raise ValueError(f"base model builder {spec['builder']!r} is not registered; known: {sorted(BUILDERS)}")
    try:
        return BUILDERS[spec["builder"]](**spec["kwargs"])
    except TypeError as err:
        raise ValueError(f"base model spec {str(spec)[:200]} does not fit {spec['builder']}: {err}") from None


def _read_spec(folder: Path) -> dict:
    from ..safe_io import read_json

    if (folder / "base.json").is_file():
        return read_json(folder / "base.json")
    if (folder / "adapter_config.json").is_file():
        spec = read_json(folder / "adapter_config.json").get("base_model_spec")
        if spec is not None:
            return spec
        raise ValueError(f"{folder / 'adapter_config.json'} records no base_model_spec: build the base model yourself")
    raise FileNotFoundError(f"{folder} holds neither base.json nor adapter_config.json: pass an adapter folder "
                            "written by a normonly recipe, or a spec dict")
