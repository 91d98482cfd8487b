import pytest
import torch
from theory_helpers import mlp as _mlp
from torch import nn

from normonly import theory
from normonly.theory import khatri_rao


def mlp(sizes, seed=0):
    return _mlp(sizes, seed, dtype=torch.float64)


def user_net(sizes, widths, seed=0):
    """What a user would build: Linear (with bias), BatchNorm1d with non-trivial running statistics, ReLU."""
    torch.manual_seed(seed)
    mods = []
    for i, (a, b, w) in enumerate(zip(sizes[:-1], sizes[1:], widths)):
        mods += [nn.Linear(a, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, b), nn.BatchNorm1d(b)]
        mods += [nn.ReLU()] if i < len(sizes) - 2 else []
    net = nn.Sequential(*mods).double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net


def _norm_state(net):
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def error(net, target):
    return theory.max_relative_error(net, target, theory.box_inputs(target[0].in_features, 2000))


@pytest.mark.parametrize("bounds", ["interval", "norm"])
def test_fit_makes_a_user_built_net_of_theorem_width_exact(bounds):
    target = mlp([4, 5, 3])
    net = user_net([4, 5, 3], [20, 15])
    result = theory.fit(net, target, bounds=bounds)
    assert result.exact and result.residual < 1e-12 and len(result.layer_residuals) == 2
    assert error(net, target) < 1e-10


def test_fit_below_theorem_width_returns_the_least_squares_residual():
    target = mlp([4, 4])
    net = user_net([4, 4], [8])  # 8 < 16 = d_in·d_out
    result = theory.fit(net, target)
    first = net[0].weight.detach()
    second = net[3].weight.detach()
    K, v = khatri_rao(second, first.T), target[0].weight.detach().flatten()
    lstsq = torch.linalg.lstsq(K, v[:, None]).solution[:, 0]
    expected = torch.linalg.norm(K @ lstsq - v) / torch.linalg.norm(v)
    assert not result.exact and float(result) == result.residual == pytest.approx(float(expected), rel=1e-8)
    assert error(net, target) > 1e-3


@pytest.mark.parametrize("method, opts", [("wide", {}), ("skip", {"k": 3}), ("sparse", {}), ("lowrank", {"rank": 4})])
def test_fit_retargets_a_reconstruction_to_a_new_target(method, opts):
    first, second = mlp([4, 4, 4], seed=0), mlp([4, 4, 4], seed=1)
    net = theory.reconstruct(first, method=method, **opts)
    frozen = {n: p.clone() for n, p in net.named_parameters() if not p.requires_grad}
    assert theory.fit(net, second).exact
    assert error(net, second) < 1e-8
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if not p.requires_grad)


def test_fit_handles_a_pair_without_relu_inside():
    target = mlp([3, 3])
    net = nn.Sequential(nn.Linear(3, 9), nn.BatchNorm1d(9), nn.Linear(9, 3), nn.BatchNorm1d(3)).double().eval()
    assert theory.fit(net, target).exact and error(net, target) < 1e-10


def test_fit_on_a_float32_net_writes_float32_gamma_beta():
    target = mlp([3, 2])
    net = user_net([3, 2], [6]).float()
    theory.fit(net, target)
    assert net[1].weight.dtype == torch.float32 and error(net, target) < 1e-5


def _layernorm_net():
    return nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2), nn.LayerNorm(2))


def _no_bn_net():
    return nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))


def _three_layer_net():
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2),
                         nn.Linear(2, 2), nn.BatchNorm1d(2))


def _relu_at_the_end_net():
    return nn.Sequential(*user_net([2, 2], [4]), nn.ReLU())


def _wrong_size_net():
    return user_net([3, 2], [6])


@pytest.mark.parametrize(
    "make, match",
    [(_layernorm_net, "LayerNorm"), (_no_bn_net, "BatchNorm1d"), (_three_layer_net, "need 2"),
     (_relu_at_the_end_net, "ReLU"), (_wrong_size_net, "does not map")],
)
def test_unsupported_structures_raise_and_change_nothing(make, match):
    net = make().double()
    before = _norm_state(net)
    with pytest.raises(ValueError, match=match):
        theory.fit(net, mlp([2, 2]))
    after = _norm_state(net)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_fit_rejects_a_non_module_and_a_bad_bound():
    with pytest.raises(TypeError):
        theory.fit("net", mlp([2, 2]))
    with pytest.raises(ValueError, match="positive"):
        theory.fit(user_net([2, 2], [4]), mlp([2, 2]), input_bound=0)
