"""Small models, a few training steps and state snapshots shared by the adapter tests."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def resnet18(seed: int = 0) -> nn.Module:
    """A torchvision ResNet-18 with 10 classes; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def tiny_bert(seed: int = 0, hidden: int = 32) -> nn.Module:
    """BERT for sequence classification from a tiny config, random weights, 3 labels."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_vit(seed: int = 0) -> nn.Module:
    """ViT for image classification (16 px images, 4 px patches) from a tiny config, random weights, 3 labels."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    config.num_labels = 3
    return transformers.ViTForImageClassification(config)


def images(seed: int, batch: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


def tokens(seed: int, batch: int = 4, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 99, (batch, length), generator=g), torch.randint(0, 3, (batch,), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x) if x.dtype == torch.long else model(x)
    return out.logits if hasattr(out, "logits") else out


def train(model: nn.Module, seed: int, steps: int = 3, lr: float = 0.1, text: bool = False) -> None:
    """A few SGD steps in train mode on images (or tokens, ``text=True``) drawn from ``seed``."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for step in range(steps):
        x, y = tokens(seed * 100 + step) if text else images(seed * 100 + step)
        loss = nn.functional.cross_entropy(logits(model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def state(model: nn.Module) -> dict:
    """Everything a failed call must leave unchanged: tensors, requires_grad flags, train/eval modes, hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a.keys() - {"tensors", "requires_grad", "training", "hooks"}:
        assert a[key] == b[key], key
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
