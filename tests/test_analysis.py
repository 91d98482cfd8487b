import json

import pytest
import torch
from torch import nn

from normonly.analysis import dead_relu_fraction, gamma_stats, plot_gamma
from normonly.models import cifar_resnet


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def test_gamma_stats_counts_small_gammas_per_layer_and_overall():
    net = _net()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.0, 0.005, -0.02, 0.04, 0.07, 0.5, -0.9, 1.0]))
        net[4].weight.copy_(torch.tensor([0.2, 0.3, 0.001, 0.8]))
    stats = gamma_stats(net, threshold=0.05)
    assert [layer["name"] for layer in stats["layers"]] == ["1", "4"]
    assert stats["layers"][0]["disabled_fraction"] == 4 / 8  # |γ| < 0.05, sign ignored
    assert stats["layers"][0]["fraction_below"]["0.01"] == 2 / 8
    assert stats["layers"][1]["disabled_fraction"] == 1 / 4
    assert stats["disabled_fraction"] == 5 / 12 and stats["channels"] == 12
    json.dumps(stats)  # JSON-ready


def test_fresh_frankle_init_disables_about_threshold_share_of_channels():
    stats = gamma_stats(cifar_resnet(56), threshold=0.05)
    assert 0.03 < stats["disabled_fraction"] < 0.07  # γ ~ U[0, 1]: P(γ < 0.05) = 0.05


def test_a_channel_with_zero_gamma_and_negative_beta_is_dead_after_its_relu():
    net = _net()
    with torch.no_grad():
        net[1].weight[:3] = 0.0
        net[1].bias[:3] = -1.0
    x = [torch.randn(16, 3, 10, 10) for _ in range(3)]
    dead = dead_relu_fraction(net, x)
    assert dead == {"2": 3 / 8}
    assert net.training  # the mode is restored


def test_dead_relu_fraction_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown"):
        dead_relu_fraction(_net(), [torch.randn(2, 3, 8, 8)], names=["nope"])


def test_gamma_stats_needs_affine_norm_layers():
    with pytest.raises(ValueError, match="no normalization layer"):
        gamma_stats(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2, elementwise_affine=False)))


def test_plot_gamma_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_gamma({"a": _net(), "b": _net()}, tmp_path / "sub" / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
