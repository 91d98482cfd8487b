import pytest
import torch
from torch import nn

import normonly
from normonly.theory import SkipLayer, pair_system, random_network
from normonly.theory.draws import default_sparsity, draw_pair


def _frozen(net):
    return {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("method, opts", [("wide", {}), ("skip", {"k": 2}), ("sparse", {}), ("lowrank", {"rank": 2})])
def test_random_network_is_a_pure_function_of_sizes_and_seed(method, opts):
    a = random_network([6, 5, 3], method=method, seed=7, **opts)
    b = random_network([6, 5, 3], method=method, seed=7, **opts)
    c = random_network([6, 5, 3], method=method, seed=8, **opts)
    fa, fb, fc = _frozen(a), _frozen(b), _frozen(c)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[n], fb[n]) for n in fa)
    assert any(not torch.equal(fa[n], fc[n]) for n in fa)


@pytest.mark.parametrize(
    "method, opts, width, depth",
    [("wide", {}, 64, 4), ("sparse", {}, 64, 4), ("skip", {"k": 4}, 16, 16), ("skip", {"k": 8}, 8, 32),
     ("lowrank", {"rank": 2}, 16, 8)],
)
def test_width_and_depth_follow_the_paper(method, opts, width, depth):
    net = random_network([8, 8, 8], method=method, **opts)
    assert net.theory_info["width"] == width and net.theory_info["depth"] == depth
    assert max(m.out_features for m in net.modules() if isinstance(m, nn.Linear)) == width
    if method == "skip":
        assert all(isinstance(m, SkipLayer) and len(m.branches) == opts["k"] for m in net)


def test_only_batchnorm_gamma_beta_train_and_freeze_all_but_norm_agrees():
    net = random_network([4, 6, 3], method="skip", k=2)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    bn_params = {f"{n}.{p}" for n, m in net.named_modules() if isinstance(m, nn.BatchNorm1d) for p in ("weight", "bias")}
    assert trainable == bn_params == set(normonly.norm_parameter_names(net))
    normonly.freeze_all_but_norm(net)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == bn_params
    assert not net.training and all(torch.all(m.running_var == 1) for m in net.modules() if isinstance(m, nn.BatchNorm1d))


def test_orthobasis_draw_gives_an_orthogonal_khatri_rao_system():
    W_a, W_b = draw_pair(3, 4, 12, init="orthobasis", g=torch.Generator().manual_seed(0))
    K = pair_system(W_a, W_b)
    torch.testing.assert_close(K.T @ K, torch.eye(12, dtype=K.dtype))


def test_sparse_draws_keep_about_p_of_the_weights_and_record_redraws():
    net = random_network([16, 16], method="sparse", seed=0)
    p = default_sparsity(16)
    info = net.theory_info
    assert info["p"] == [p] and len(info["redraws"]) == 1 and info["cond"][0] <= 1e8
    assert info["frozen_nonzero"] / info["frozen_params"] == pytest.approx(p, abs=0.05)


def test_sparse_gives_up_with_a_clear_error_when_every_draw_is_singular():
    with pytest.raises(RuntimeError, match="raise p"):
        random_network([6, 6], method="sparse", p=0.05, max_redraws=3)


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "deep"}, {"init": "xavier"}, {"method": "skip", "k": 0}, {"method": "sparse", "p": 1.5},
     {"method": "lowrank"}, {"method": "sparse", "init": "orthobasis"}, {"max_cond": 0.5}],
)
def test_bad_options_raise_value_errors(kwargs):
    with pytest.raises(ValueError):
        random_network([4, 4], **kwargs)
