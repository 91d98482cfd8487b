import copy

import pytest
import torch
from theory_helpers import mlp as _mlp
from torch import nn

from normonly import NormOnlyConfig, NormOnlyModel, get_normonly_model, theory


def mlp(sizes, seed=0):
    return _mlp(sizes, seed, dtype=torch.float64)


def error(net, target):
    return theory.max_relative_error(net, target, theory.box_inputs(target[0].in_features, 2000))


def test_theory_is_a_known_init_whose_error_points_to_fit_and_changes_nothing():
    net = theory.random_network([4, 5, 3], seed=0)
    NormOnlyConfig(init="theory")  # a valid value
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    values = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"target network.*normonly\.theory\.fit\(model, target\)"):
        get_normonly_model(net, NormOnlyConfig(init="theory"))
    assert flags == {n: p.requires_grad for n, p in net.named_parameters()}
    assert all(torch.equal(values[k], v) for k, v in net.state_dict().items())


def test_fit_on_a_normonly_model_sets_its_adapter_and_the_saved_adapter_equals_the_target(tmp_path):
    target = mlp([4, 5, 3])
    model = get_normonly_model(theory.random_network([4, 5, 3], seed=2), NormOnlyConfig()).eval()
    assert error(model, target) > 0.1
    assert theory.fit(model, target).exact
    assert error(model, target) < 1e-10
    model.save_pretrained(tmp_path)
    fresh = theory.random_network([4, 5, 3], seed=2)  # same seed: the same frozen weights
    loaded = NormOnlyModel.from_pretrained(fresh, tmp_path).eval()
    assert error(loaded, target) < 1e-10


def test_fit_before_wrapping_with_init_keep_starts_the_adapter_at_the_construction():
    target = mlp([3, 4, 2])
    net = theory.random_network([3, 4, 2], seed=0)
    theory.fit(net, target)
    model = get_normonly_model(net, NormOnlyConfig(init="keep")).eval()
    assert error(model, target) < 1e-10
    with model.disable_adapter():
        assert error(model, target) < 1e-10  # the fitted γ/β are now the base's values


def test_init_theory_with_a_target_makes_the_new_adapter_equal_the_target_and_leaves_the_base(tmp_path):
    target = mlp([4, 5, 3])
    model = get_normonly_model(
        theory.random_network([4, 5, 3], seed=1), NormOnlyConfig(init="theory"), init_kwargs={"target": target}
    ).eval()
    assert error(model, target) < 1e-10
    with model.disable_adapter():
        assert error(model, target) > 0.1  # the base keeps its own random γ/β
    model.save_pretrained(tmp_path)
    loaded = NormOnlyModel.from_pretrained(theory.random_network([4, 5, 3], seed=1), tmp_path).eval()
    assert error(loaded, target) < 1e-10  # the adapter file carries the γ/β; no target needed to load


def test_init_theory_on_a_narrow_network_warns_with_the_least_squares_residual():
    target = mlp([4, 3])
    narrow = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match="least-squares γ/β with relative residual"):
        model = get_normonly_model(narrow.double().eval(), NormOnlyConfig(init="theory"), init_kwargs={"target": target})
    assert 0 < error(model.eval(), target) < 1


def test_init_kwargs_an_initializer_does_not_take_and_partial_adapters_fail_and_change_nothing():
    target = mlp([4, 5, 3])
    net = theory.random_network([4, 5, 3], seed=0)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    values = copy.deepcopy(net.state_dict())
    with pytest.raises(TypeError, match=r"init='keep' does not take init_kwargs \['target'\]"):
        get_normonly_model(net, NormOnlyConfig(init="keep"), init_kwargs={"target": target})
    with pytest.raises(ValueError, match="leaves out"):
        get_normonly_model(net, NormOnlyConfig(init="theory", train_bias=False), init_kwargs={"target": target})
    assert flags == {n: p.requires_grad for n, p in net.named_parameters()}
    assert all(torch.equal(values[k], v) for k, v in net.state_dict().items())
