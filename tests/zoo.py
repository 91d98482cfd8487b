"""A zoo of small models with random weights, each with the γ/β it should train.

Expected sets are written from each architecture's parameter names (what a reader of the model
code sees), never from normonly's type-based detection, so the two check each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    expected: str  # regex that fullmatches exactly the expected trainable parameter names
    example: Callable[[nn.Module], object]  # model -> a scalar loss
    source: str

    def expected_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if re.fullmatch(self.expected, n)}


def _images(size=32, batch=2, channels=3):
    def run(model):
        torch.manual_seed(0)
        out = model(torch.randn(batch, channels, size, size))
        return _to_loss(out)

    run.inputs = lambda n: ((torch.randn(n, channels, size, size),), {})  # (args, kwargs) of a batch of n
    return run


def _tokens(vocab=99, length=8, batch=2, **extra):
    def run(model):
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (batch, length))
        kwargs = {k: (ids if v == "ids" else v) for k, v in extra.items()}
        return _to_loss(model(input_ids=ids, **kwargs))

    def inputs(n):
        ids = torch.randint(0, vocab, (n, length))
        return (), {"input_ids": ids, **{k: (ids if v == "ids" else v) for k, v in extra.items()}}

    run.inputs = inputs
    return run


def _hf_images(size=32, batch=2):
    def run(model):
        torch.manual_seed(0)
        return _to_loss(model(pixel_values=torch.randn(batch, 3, size, size)))

    run.inputs = lambda n: ((), {"pixel_values": torch.randn(n, 3, size, size)})
    return run


def _to_loss(out):
    if isinstance(out, torch.Tensor):
        return out.float().pow(2).mean()
    if hasattr(out, "logits"):
        return out.logits.float().pow(2).mean()
    raise TypeError(type(out))


# ---------------------------------------------------------------- torchvision
def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head, which would zero every gradient
    return model


def _tv():
    import torchvision.models as tvm
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer

    return [
        Case(
            "tv_resnet18",
            lambda: tvm.resnet18(num_classes=10),
            r".*bn\d\.(weight|bias)|.*downsample\.1\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_mobilenet_v3_small",
            lambda: tvm.mobilenet_v3_small(num_classes=10),
            # Conv2dNormActivation = (conv, BatchNorm, act): the norm is index 1 of every such block
            r"features\.0\.1\.(weight|bias)|features\.\d+\.block\.\d\.1\.(weight|bias)|features\.12\.1\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_efficientnet_b0",
            lambda: tvm.efficientnet_b0(num_classes=10),
            r"features\.0\.1\.(weight|bias)|features\.\d\.\d\.block\.\d\.1\.(weight|bias)|features\.8\.1\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_convnext",
            lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10),
            # stem LayerNorm2d, block norms, downsample LayerNorm2d, classifier LayerNorm2d
            r"features\.0\.1\.(weight|bias)|features\.\d\.\d\.block\.2\.(weight|bias)|features\.2\.0\.(weight|bias)|classifier\.0\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_vit",
            _tv_vit,
            r"encoder\.layers\.encoder_layer_\d\.ln_[12]\.(weight|bias)|encoder\.ln\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_swin",
            lambda: SwinTransformer(
                patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=10
            ),
            r"features\.0\.2\.(weight|bias)|features\.[13]\.0\.norm[12]\.(weight|bias)|features\.2\.norm\.(weight|bias)|norm\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_regnet",
            lambda: tvm.regnet_y_400mf(num_classes=10),
            r"stem\.1\.(weight|bias)|trunk_output\.block\d\.block\d-\d\.(proj|f\.[abc])\.1\.(weight|bias)",
            _images(),
            "torchvision",
        ),
        Case(
            "tv_densenet",
            lambda: tvm.DenseNet(growth_rate=8, block_config=(1, 1), num_init_features=8, num_classes=10),
            r"features\.norm[05]\.(weight|bias)|features\.denseblock\d\.denselayer\d\.norm[12]\.(weight|bias)|features\.transition\d\.norm\.(weight|bias)",
            _images(),
            "torchvision",
        ),
    ]


# ---------------------------------------------------------------- timm
def _timm():
    import timm
    from timm.layers import RmsNorm

    def create(name, **kw):
        return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return [
        Case(
            "timm_resnet18",
            create("resnet18"),
            r".*bn\d\.(weight|bias)|.*downsample\.1\.(weight|bias)",
            _images(),
            "timm",
        ),
        Case("timm_efficientnet_b0", create("efficientnet_b0"), r"(.*\.)?bn\d\.(weight|bias)", _images(), "timm"),
        Case(
            "timm_convnext_atto",
            create("convnext_atto"),
            r"stem\.1\.(weight|bias)|stages\.\d\.downsample\.0\.(weight|bias)|stages\.\d\.blocks\.\d\.norm\.(weight|bias)|head\.norm\.(weight|bias)",
            _images(),
            "timm",
        ),
        Case(
            "timm_vit_tiny",
            create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
            r"blocks\.\d\.norm[12]\.(weight|bias)|norm\.(weight|bias)",
            _images(),
            "timm",
        ),
        Case(
            "timm_vit_rmsnorm",
            create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, norm_layer=RmsNorm),
            r"blocks\.\d\.norm[12]\.weight|norm\.weight",
            _images(),
            "timm",
        ),
        Case(
            "timm_resnetv2_groupnorm",
            create("resnetv2_50x1_bit"),
            r"stem\.norm\.(weight|bias)|stages\.\d\.blocks\.\d+\.norm[123]\.(weight|bias)|norm\.(weight|bias)",
            _images(),
            "timm",
        ),
        Case(
            "timm_regnet_batchnormact",
            create("regnetx_002"),
            r"stem\.bn\.(weight|bias)|s\d\.b\d+\.(conv[123]|downsample)\.bn\.(weight|bias)",
            _images(),
            "timm",
        ),
        Case("timm_nf_resnet_no_norm", create("nf_resnet26"), r"(?!)", _images(), "timm"),
    ]


# ---------------------------------------------------------------- transformers
def _hf():
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)
    decoder = dict(small, num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
    rms = r"model\.layers\.\d\.(input_layernorm|post_attention_layernorm)\.weight|model\.norm\.weight"
    return [
        Case(
            "hf_bert",
            lambda: T.BertForSequenceClassification(T.BertConfig(**small, max_position_embeddings=64)),
            r"bert\.(embeddings|encoder\.layer\.\d\.(attention\.output|output))\.LayerNorm\.(weight|bias)",
            _tokens(),
            "transformers",
        ),
        Case(
            "hf_gpt2_tied",
            lambda: T.GPT2LMHeadModel(
                T.GPT2Config(
                    n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0
                )
            ),
            r"transformer\.(h\.\d\.ln_[12]|ln_f)\.(weight|bias)",
            _tokens(),
            "transformers",
        ),
        Case("hf_llama", lambda: T.LlamaForCausalLM(T.LlamaConfig(**decoder)), rms, _tokens(), "transformers"),
        Case("hf_gemma", lambda: T.GemmaForCausalLM(T.GemmaConfig(**decoder)), rms, _tokens(), "transformers"),
        Case(
            "hf_qwen3",
            lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**decoder)),
            rms[: -len(r"|model\.norm\.weight")]
            + r"|model\.layers\.\d\.self_attn\.[qk]_norm\.weight|model\.norm\.weight",
            _tokens(),
            "transformers",
        ),
        Case("hf_mistral", lambda: T.MistralForCausalLM(T.MistralConfig(**decoder)), rms, _tokens(), "transformers"),
        Case(
            "hf_t5",
            lambda: T.T5ForConditionalGeneration(
                T.T5Config(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=99)
            ),
            r"(encoder|decoder)\.block\.\d\.layer\.\d\.layer_norm\.weight|(encoder|decoder)\.final_layer_norm\.weight",
            _tokens(decoder_input_ids="ids"),
            "transformers",
        ),
        Case(
            "hf_vit",
            lambda: T.ViTForImageClassification(
                T.ViTConfig(**{**small, "image_size": 32, "patch_size": 8, "num_labels": 10})
            ),
            r"vit\.(encoder\.layer|layers)\.\d\.layernorm_(before|after)\.(weight|bias)|vit\.layernorm\.(weight|bias)",
            _hf_images(),
            "transformers",
        ),
        Case(
            "hf_convnext",
            lambda: T.ConvNextForImageClassification(
                T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
            ),
            r"convnext\.embeddings\.layernorm\.(weight|bias)|convnext\.encoder\.stages\.1\.downsampling_layer\.0\.(weight|bias)"
            r"|convnext\.encoder\.stages\.\d\.layers\.\d\.layernorm\.(weight|bias)|convnext\.layernorm\.(weight|bias)",
            _hf_images(),
            "transformers",
        ),
        Case(
            "hf_resnet",
            lambda: T.ResNetForImageClassification(
                T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
            ),
            r"resnet\.embedder\.embedder\.normalization\.(weight|bias)|resnet\.encoder\.stages\.\d\.layers\.\d\.(shortcut|layer\.\d)\.normalization\.(weight|bias)",
            _hf_images(),
            "transformers",
        ),
    ]


# ---------------------------------------------------------------- custom modules
class MixedNorms(nn.Module):
    """BatchNorm1d, GroupNorm, InstanceNorm (affine and not), non-affine LayerNorm, RMSNorm, a Linear named norm_proj."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.norm_proj = nn.Linear(16, 16)
        self.ln_plain = nn.LayerNorm(16, elementwise_affine=False)
        self.rms = nn.RMSNorm(16)
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.inorm_plain = nn.InstanceNorm1d(4)
        self.out = nn.Linear(64, 3)

    def forward(self, x):
        h = self.rms(self.ln_plain(self.norm_proj(self.bn(self.inp(x)).relu())))
        h = self.inorm_plain(self.inorm(self.gn(self.conv(h.unsqueeze(1)))))
        return self.out(h.flatten(1))


class UnitScale(nn.Module):
    """A custom norm whose class name does not say so: found only after register_norm_layer."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class TiedNorm(nn.Module):
    """A LayerNorm whose γ is also used by a non-norm module (tied weights stay frozen)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.scale = nn.Module()
        self.scale.weight = self.ln.weight
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.ln(x) * self.scale.weight)


class MyChannelNorm(nn.Module):
    """Name says norm, own params 1-D, no children: found by the structural rule."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias


def _custom():
    def vec(dim, batch=4):
        def run(model):
            torch.manual_seed(0)
            return _to_loss(model(torch.randn(batch, dim)))

        run.inputs = lambda n: ((torch.randn(n, dim),), {})
        return run

    return [
        Case("custom_mixed", MixedNorms, r"(bn|rms|gn|inorm)\.(weight|bias)", vec(8), "custom"),
        Case("custom_tied", TiedNorm, r"ln\.bias", vec(8), "custom"),
        Case(
            "custom_structural",
            lambda: nn.Sequential(nn.Linear(4, 6), MyChannelNorm(6), nn.ReLU(), nn.Linear(6, 2)),
            r"1\.(weight|bias)",
            vec(4),
            "custom",
        ),
        Case(
            "custom_lazy_bn",
            lambda: nn.Sequential(nn.Linear(4, 6), nn.LazyBatchNorm1d(), nn.Linear(6, 2)),
            r"1\.(weight|bias)",
            vec(4),
            "custom",
        ),
    ]


def all_cases() -> list[Case]:
    return _tv() + _timm() + _hf() + _custom()
