"""Model definitions used by the recipes: Frankle et al.'s CIFAR ResNets."""

from .cifar_resnet import CifarResNet, cifar_resnet, frankle_init_

__all__ = ["CifarResNet", "cifar_resnet", "frankle_init_"]
