import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from normonly.init import identity_scale, initialize


class Doubling(nn.Module):
    """A norm-like layer whose scale is neither w nor 1 + w: the probe must refuse it."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * (2 + 3 * self.weight)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), GemmaRMSNorm(8), LlamaRMSNorm(8))


NAMES = ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "4.weight"]


def test_identity_scale_is_found_by_probing_not_by_class_name():
    from timm.layers import BatchNormAct2d
    from torchvision.models.convnext import LayerNorm2d

    assert identity_scale(GemmaRMSNorm(8)) == 0.0  # normalized(x) * (1 + weight)
    for module in (LlamaRMSNorm(8), LayerNorm2d(8), BatchNormAct2d(8), nn.GroupNorm(2, 8)):
        assert identity_scale(module) == 1.0

    class RenamedGemma(GemmaRMSNorm):  # a name the probe has never seen
        pass

    assert identity_scale(RenamedGemma(8)) == 0.0


def test_ones_gives_the_identity_scale_and_zero_shift_on_every_kind_of_norm():
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    initialize(net, NAMES, "ones")
    for i in (1, 2):
        assert torch.equal(net[i].weight, torch.ones(8)) and torch.equal(net[i].bias, torch.zeros(8))
    assert torch.equal(net[3].weight, torch.zeros(8))  # Gemma: 1 + 0 = identity
    assert torch.equal(net[4].weight, torch.ones(8))
    x = torch.randn(3, 8)
    assert torch.allclose(net[3](x), LlamaRMSNorm(8)(x), atol=1e-6)


def test_frankle_draws_effective_scales_in_0_1_and_zeroes_shifts():
    net = _net()
    torch.manual_seed(1)
    initialize(net, NAMES, "frankle")
    for i in (1, 2, 4):
        w = net[i].weight
        assert (w >= 0).all() and (w <= 1).all() and w.std() > 0.1
    assert ((net[3].weight >= -1) & (net[3].weight <= 0)).all()  # 1 + w in [0, 1]
    assert torch.equal(net[1].bias, torch.zeros(8)) and torch.equal(net[2].bias, torch.zeros(8))
    assert not torch.equal(net[1].weight, net[2].weight)


def test_keep_changes_nothing():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    initialize(net, NAMES, "keep")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_layer_the_probe_cannot_read_raises_and_changes_nothing():
    net = nn.Sequential(nn.LayerNorm(8), Doubling(8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="Doubling.*init='keep'"):
        initialize(net, ["0.weight", "0.bias", "1.weight"], "ones")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_unknown_initializer_is_named():
    with pytest.raises(ValueError, match="init='xavier'.*frankle"):
        initialize(_net(), NAMES, "xavier")
