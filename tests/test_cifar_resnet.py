import pytest
import torch
from torch import nn

import normonly
from normonly.models import cifar_resnet


def _bn_params(model):
    names = set(normonly.norm_parameter_names(model))
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def _expected_counts(depth, width):
    """Parameter count derived by hand from the architecture (3×3 convs, 1×1 shortcut at stage changes)."""
    n, c = (depth - 2) // 6, [16 * width, 32 * width, 64 * width]
    convs, bns = 3 * c[0] * 9, c[0]
    cin = c[0]
    for cout in c:
        for _ in range(n):
            convs += cin * cout * 9 + cout * cout * 9 + (cin * cout if cin != cout else 0)
            bns += 2 * cout + (cout if cin != cout else 0)
            cin = cout
    return convs + 2 * bns + c[2] * 10 + 10, 2 * bns


@pytest.mark.parametrize(
    "depth, total, bn",
    [(14, 175_258, 1_120), (32, 466_906, 2_464), (56, 855_770, 4_256), (110, 1_730_714, 8_288)],
)
def test_parameter_counts_match_frankle_et_al(depth, total, bn):
    model = cifar_resnet(depth)
    assert sum(p.numel() for p in model.parameters()) == total
    assert _bn_params(model) == bn


def test_resnet_866_has_64736_batchnorm_parameters():
    with torch.device("meta"):  # shapes only: 14M parameters need no memory or init time
        model = cifar_resnet(866)
    assert _bn_params(model) == 64_736
    assert (sum(p.numel() for p in model.parameters()), _bn_params(model)) == _expected_counts(866, 1)


@pytest.mark.parametrize("depth, width", [(8, 1), (14, 2), (20, 4), (14, 8)])
def test_wide_resnets_scale_every_stage_by_the_width(depth, width):
    model = cifar_resnet(depth, width)
    assert (sum(p.numel() for p in model.parameters()), _bn_params(model)) == _expected_counts(depth, width)
    assert model.fc.in_features == 64 * width and model.conv.out_channels == 16 * width


def test_frankle_init_gamma_uniform_beta_zero_kaiming_convs():
    torch.manual_seed(0)
    model = cifar_resnet(56)
    gammas = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    betas = torch.cat([m.bias.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    assert gammas.min() >= 0 and gammas.max() <= 1 and abs(gammas.mean() - 0.5) < 0.02
    assert abs(gammas.std() - (1 / 12) ** 0.5) < 0.02  # U[0, 1]
    assert torch.all(betas == 0)
    conv = model.blocks[-1].conv2.weight  # 64 × 64 × 3 × 3, fan_in 576: std sqrt(2 / 576)
    assert abs(conv.std().item() / (2 / 576) ** 0.5 - 1) < 0.03 and abs(conv.mean().item()) < 0.01


def test_same_seed_same_network():
    torch.manual_seed(3)
    a = cifar_resnet(14)
    torch.manual_seed(3)
    b = cifar_resnet(14)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_forward_maps_cifar_batches_to_logits_and_downsamples_twice():
    model = cifar_resnet(8, num_classes=7)
    shapes = []
    model.blocks.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert shapes == [(2, 64, 8, 8)]


@pytest.mark.parametrize("kwargs", [{"depth": 15}, {"depth": 2}, {"depth": 14, "width": 0}, {"depth": 14.0}])
def test_invalid_depth_or_width_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match="depth|width"):
        cifar_resnet(**kwargs)
