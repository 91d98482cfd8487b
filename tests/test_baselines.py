import pytest
import torch
from torch import nn

import normonly
from normonly.baselines import train_random_per_channel
from normonly.models import cifar_resnet


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_two_random_weights_per_channel_match_the_batchnorm_count_of_resnet14():
    model = train_random_per_channel(cifar_resnet(14), per_channel=2, seed=0)
    assert normonly.count_parameters(model)[0] == 1_120  # = ResNet-14's BatchNorm γ/β
    assert not any(p.requires_grad for n, p in model.named_parameters() if "original" not in n)


def test_sgd_with_weight_decay_changes_only_the_chosen_entries():
    torch.manual_seed(0)
    model = cifar_resnet(8)
    before = _weights(model)
    bn_before = {n: p.detach().clone() for n, p in model.named_parameters() if "bn" in n}
    train_random_per_channel(model, per_channel=2, seed=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1, momentum=0.9)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _weights(model)
    for name, w in after.items():
        changed = (w != before[name]).flatten(1).sum(1) if w.dim() > 1 else (w != before[name])
        if name == "fc":
            assert changed.sum() == 0  # the output layer stays frozen, as in Frankle et al.
        else:
            assert torch.all(changed <= 2) and changed.sum() > 0, name
    assert all(torch.equal(p, bn_before[n]) for n, p in model.named_parameters() if n in bn_before)


def test_the_choice_depends_only_on_the_seed():
    def picks(seed):
        model = train_random_per_channel(cifar_resnet(8), seed=seed)
        return [m.parametrizations.weight[0].index for m in model.modules() if isinstance(m, nn.Conv2d)]

    assert all(torch.equal(a, b) for a, b in zip(picks(3), picks(3)))
    assert not all(torch.equal(a, b) for a, b in zip(picks(3), picks(4)))


def test_each_channel_gets_distinct_entries_inside_its_own_filter():
    model = train_random_per_channel(cifar_resnet(8), per_channel=3, seed=0)
    conv = model.blocks[0].conv1
    index = conv.parametrizations.weight[0].index.view(conv.out_channels, 3)
    fan = conv.in_channels * 9
    assert torch.all(index // fan == torch.arange(conv.out_channels)[:, None])
    assert all(len(set(row.tolist())) == 3 for row in index)


def test_bad_requests_raise_and_change_nothing():
    model = cifar_resnet(8)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="per output channel"):
        train_random_per_channel(model, per_channel=10_000)
    with pytest.raises(ValueError, match="no"):
        train_random_per_channel(nn.Sequential(nn.Linear(2, 2)))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    train_random_per_channel(model)
    with pytest.raises(ValueError, match="already parametrized"):
        train_random_per_channel(model)
