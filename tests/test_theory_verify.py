import torch
from torch import nn

from normonly import theory


def test_box_inputs_hold_every_corner_and_stay_in_the_box():
    x = theory.box_inputs(3, 100, input_bound=2.0)
    assert x.shape == (100, 3) and x.abs().max() == 2.0
    corners = {tuple(r) for r in x[(x.abs() == 2.0).all(dim=1)].tolist()}
    assert len(corners) == 8


def test_max_relative_error_is_zero_for_the_same_function_and_sees_a_perturbation():
    target = nn.Sequential(nn.Linear(3, 2))
    x = theory.box_inputs(3, 50)
    assert theory.max_relative_error(target.double(), target, x) == 0
    other = nn.Sequential(nn.Linear(3, 2)).double()
    other.load_state_dict(target.state_dict())
    with torch.no_grad():
        other[0].bias.add_(1e-3)
    assert theory.max_relative_error(other, target, x) > 1e-4
