import copy

import pytest
import torch
from theory_helpers import mlp
from torch import nn

import normonly
from normonly import theory


def error(net, target, bound=1.0, n=2000):
    dim = next(m for m in target.modules() if isinstance(m, nn.Linear)).in_features
    return theory.max_relative_error(net, target, theory.box_inputs(dim, n, input_bound=bound))


METHODS = [("wide", {}, 1e-10), ("skip", {"k": 2}, 1e-10), ("skip", {"k": 5}, 1e-10), ("sparse", {}, 1e-8),
           ("lowrank", {}, 1e-8)]


@pytest.mark.parametrize("method, opts, tol", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("last_relu", [False, True])
def test_reconstruction_equals_the_target_on_the_box_corners_included(method, opts, tol, last_relu):
    target = mlp([5, 7, 4, 3], last_relu=last_relu)
    net = theory.reconstruct(target, method=method, input_bound=2.5, seed=1, **opts)
    assert error(net, target, bound=2.5) < tol
    assert isinstance(net[-1], nn.ReLU) == last_relu or method == "skip"


@pytest.mark.parametrize("method", ["wide", "skip"])
def test_float64_error_is_below_1e_10_at_d16_depth3_on_10000_inputs(method):
    target = mlp([16, 16, 16, 16], seed=3)
    net = theory.reconstruct(target, method=method, seed=3)
    x = theory.box_inputs(16, 10_000, seed=3)
    assert (x.abs() == 1).all(dim=1).sum() == 5000  # corners
    assert theory.max_relative_error(net, target, x) < 1e-10


def test_frozen_weights_do_not_depend_on_the_target_only_gamma_beta_do():
    a, b = mlp([4, 6, 3], seed=0), mlp([4, 6, 3], seed=1)
    net_a, net_b = theory.reconstruct(a, seed=5), theory.reconstruct(b, seed=5)
    pairs = list(zip(net_a.named_parameters(), net_b.named_parameters()))
    assert all(torch.equal(pa, pb) for (_, pa), (_, pb) in pairs if not pa.requires_grad)
    differ = {name for (name, pa), (_, pb) in pairs if not torch.equal(pa, pb)}
    assert differ and all(net_a.get_parameter(n).requires_grad for n in differ)
    assert {n for n in differ if n.endswith(".bias")} == {n for n, p in net_a.named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize("method, opts", [("wide", {}), ("skip", {"k": 3}), ("sparse", {}), ("lowrank", {"rank": 5})])
def test_frozen_weights_are_the_seeds_random_network_so_copying_the_target_would_fail(method, opts):
    target = mlp([6, 5, 3])
    net = theory.reconstruct(target, method=method, seed=11, **opts)
    fresh = theory.random_network([6, 5, 3], [True, False], method=method, seed=11, **opts)
    frozen = [(n, p) for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(p, fresh.get_parameter(n)) for n, p in frozen)
    target_weights = [m.weight.detach().double() for m in target if isinstance(m, nn.Linear)]
    assert not any(p.shape == w.shape and torch.allclose(p, w) for _, p in frozen for w in target_weights)


def _frozen_weights_ignore_the_target(build) -> bool:
    """The test the issue asks for: with one seed, two targets must give bit-identical frozen weights."""
    a, b = build(mlp([4, 4], seed=0).double(), seed=7), build(mlp([4, 4], seed=1).double(), seed=7)
    frozen_a = [p for p in a.parameters() if not p.requires_grad]
    frozen_b = [p for p in b.parameters() if not p.requires_grad]
    return bool(frozen_a) and all(torch.equal(p, q) for p, q in zip(frozen_a, frozen_b))


def cheat(target, seed):
    """Exact too, but by copying the target's weights into the frozen layer: what the check must catch."""
    lin = copy.deepcopy(target[0]).requires_grad_(False)
    bn = nn.BatchNorm1d(lin.out_features).double().eval()
    with torch.no_grad():
        bn.weight.fill_((1 + bn.eps) ** 0.5)  # undo the eps of the unit running variance: the identity
    return nn.Sequential(lin, bn)


def test_the_target_independence_check_passes_reconstruct_and_catches_a_cheating_construction():
    target = mlp([4, 4]).double()
    assert error(cheat(target, 0), target) < 1e-12  # the cheat is exact, so only the independence check can see it
    assert not _frozen_weights_ignore_the_target(cheat)
    for method in ("wide", "sparse", "lowrank"):
        assert _frozen_weights_ignore_the_target(lambda t, seed, m=method: theory.reconstruct(t, method=m, seed=seed))


def test_trainable_parameters_are_exactly_the_batchnorm_gamma_beta():
    net = theory.reconstruct(mlp([3, 4, 2]), method="lowrank")
    bn = {f"{n}.{p}" for n, m in net.named_modules() if isinstance(m, nn.BatchNorm1d) for p in ("weight", "bias")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == bn
    normonly.freeze_all_but_norm(net)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == bn
    assert not net.training


def test_lowrank_uses_width_r_times_d_for_a_rank_r_target():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).double()
    with torch.no_grad():
        for m in (target[0], target[2]):
            m.weight.copy_(torch.randn(8, 2, dtype=torch.float64) @ torch.randn(2, 8, dtype=torch.float64))
    net = theory.reconstruct(target, method="lowrank")
    assert net.theory_info["rank"] == [2, 2] and net.theory_info["width"] == 16
    assert error(net, target) < 1e-8
    with pytest.raises(ValueError, match="rank"):
        theory.reconstruct(target, method="lowrank", rank=1)


def test_sparse_redraws_depend_on_the_seed_not_the_target():
    nets = [theory.reconstruct(mlp([6, 6, 6], seed=s), method="sparse", seed=2) for s in (0, 1)]
    assert nets[0].theory_info["redraws"] == nets[1].theory_info["redraws"]
    assert all(error(n, mlp([6, 6, 6], seed=s)) < 1e-8 for n, s in zip(nets, (0, 1)))


def test_float32_result_and_targets_in_other_forms():
    target = nn.Sequential(nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU()), nn.Linear(4, 2)).float()
    net = theory.reconstruct(target, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert error(net, target) < 1e-4
    single = nn.Linear(3, 2)
    assert error(theory.reconstruct(single), nn.Sequential(single)) < 1e-10


@pytest.mark.parametrize(
    "target, kwargs, exc, match",
    [
        (nn.Sequential(nn.Conv2d(1, 1, 3)), {}, TypeError, "Conv2d"),
        (nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()), {}, TypeError, "Sigmoid"),
        (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 2)), {}, ValueError, "do not chain"),
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), {}, ValueError, "ReLU"),
        (nn.Sequential(), {}, ValueError, "no nn.Linear"),
        ("not a module", {}, TypeError, "nn.Sequential"),
        (nn.Linear(2, 2), {"input_bound": 0}, ValueError, "positive"),
        (nn.Linear(2, 2), {"input_bound": -1.0}, ValueError, "positive"),
        (nn.Linear(2, 2), {"input_bound": float("inf")}, ValueError, "finite"),
        (nn.Linear(2, 2), {"input_bound": "1"}, TypeError, "number"),
        (nn.Linear(2, 2), {"method": "deep"}, ValueError, "method"),
        (nn.Linear(2, 2), {"p": 0.5}, TypeError, "unexpected option"),
        (nn.Linear(2, 2), {"dtype": torch.int64}, TypeError, "dtype"),
    ],
)
def test_bad_targets_and_arguments_get_clear_errors(target, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        theory.reconstruct(target, **kwargs)


def test_from_normonly_import_theory():
    from normonly import theory as t

    assert t is normonly.theory and callable(t.reconstruct) and callable(t.fit) and callable(t.khatri_rao)


# which nn.ReLU modules of the result for a [4, 5, 3] target (ReLU after layer 0 only) belong to the
# construction (must be on over the box) rather than reproduce the target's ReLU (may be off)
ON_PATTERN = {"wide": [True, False, True], "skip": [True] * 4, "lowrank": [True, True, True, False, True, True, True]}


@pytest.mark.parametrize("method", list(ON_PATTERN))
def test_every_relu_of_the_construction_is_on_over_the_whole_box(method):
    target = mlp([4, 5, 3])
    opts = {"k": 2} if method == "skip" else {}
    net = theory.reconstruct(target, method=method, input_bound=3.0, device="cpu", **opts)
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len(ON_PATTERN[method])
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0])) for m in relus]
    with torch.no_grad():
        net(theory.box_inputs(4, 500, input_bound=3.0))
    for h in hooks:
        h.remove()
    for relu, on in zip(relus, ON_PATTERN[method]):
        if on:
            assert float(seen[relu].min()) >= 0
    assert any(float(seen[r].min()) < 0 for r, on in zip(relus, ON_PATTERN[method]) if not on) or method == "skip"
