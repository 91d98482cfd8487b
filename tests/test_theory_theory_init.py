import copy

import pytest
import torch
from theory_helpers import mlp as _mlp

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
