import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import normonly


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, bias=True), nn.BatchNorm2d(6), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 11), nn.LayerNorm(11), nn.Linear(11, 5),
    )  # fmt: skip


def test_trainable_parameters_are_exactly_the_unfrozen_ones_in_model_order():
    model = normonly.freeze_all_but_norm(torchvision.models.resnet18(), extra_trainable=["fc"])
    params = normonly.trainable_parameters(model)
    assert [id(p) for p in params] == [id(p) for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == normonly.count_parameters(model)[0] == 9_600 + 513_000


def test_trainable_parameters_lists_a_tied_tensor_once():
    norm = nn.LayerNorm(4)
    model = nn.ModuleDict({"a": norm, "b": nn.Sequential(norm)})
    assert len(normonly.trainable_parameters(model)) == 2


def test_trainable_parameters_errors_clearly_on_a_fully_frozen_model():
    model = _small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="freeze_all_but_norm"):
        normonly.trainable_parameters(model)
    with pytest.raises(TypeError, match="nn.Module"):
        normonly.trainable_parameters([torch.zeros(1)])


def test_optimizer_over_trainable_parameters_holds_state_for_norm_tensors_only():
    model = normonly.freeze_all_but_norm(_small_model())
    opt = torch.optim.AdamW(normonly.trainable_parameters(model), lr=1e-3, foreach=True)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    norm_params = {id(p) for _, m in normonly.norm_layers(model) for p in m.parameters()}
    assert {id(p) for p in opt.state} == norm_params


def test_eval_mode_runs_without_autograd_and_restores_every_flag():
    model = normonly.freeze_all_but_norm(_small_model()).train()
    model[4].eval()  # a user's mixed setting must come back as it was
    before = [m.training for m in model.modules()]
    with normonly.eval_mode(model) as m:
        assert m is model and not any(x.training for x in model.modules())
        assert torch.is_inference_mode_enabled()
        out = model(torch.randn(2, 3, 8, 8))
    assert not out.requires_grad and out.is_inference()
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), normonly.eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_eval_mode_uses_running_statistics():
    model = normonly.freeze_all_but_norm(_small_model()).train()
    x = torch.randn(4, 3, 8, 8)
    with normonly.eval_mode(model):
        got = model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(got, expected)


def weight_gradient_kernels(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Kernels in the backward pass that compute a weight gradient of a Conv or Linear layer.

    Convolutions: ``aten::convolution_backward`` whose output mask asks for the weight gradient.
    Linears: an ``mm`` that contracts the batch dimension into a [out, in] (or [in, out]) result.
    """
    loss = model(x).pow(2).mean()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    linear_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)}
    found = []
    for e in prof.events():
        if e.name == "aten::convolution_backward" and e.concrete_inputs[-1][1]:
            found.append(f"conv weight grad {e.input_shapes[2]}")
        if e.name in ("aten::mm", "aten::addmm"):
            a, b = e.input_shapes[-2:] if e.name == "aten::mm" else e.input_shapes[1:3]
            contracts_batch = len(a) == 2 and len(b) == 2 and a[1] == b[0] == x.shape[0]
            if contracts_batch and ((a[0], b[1]) in linear_shapes or (b[1], a[0]) in linear_shapes):
                found.append(f"linear weight grad {a}x{b}")
    return found


def test_norm_only_backward_runs_no_weight_gradient_kernel():
    model = normonly.freeze_all_but_norm(_small_model())
    assert weight_gradient_kernels(model, torch.randn(2, 3, 8, 8)) == []


def test_weight_gradient_kernel_check_sees_trainable_layers():
    model = normonly.freeze_all_but_norm(_small_model(), extra_trainable=["3", "6"])
    found = weight_gradient_kernels(model, torch.randn(2, 3, 8, 8))
    assert any(f.startswith("conv weight grad [6, 8, 3, 3]") for f in found)
    assert any(f.startswith("linear weight grad") for f in found)


def test_norm_only_resnet_backward_has_input_gradient_convolutions_only():
    model = normonly.freeze_all_but_norm(torchvision.models.resnet18(num_classes=3))
    x = torch.randn(2, 3, 32, 32)
    assert weight_gradient_kernels(model, x) == []
    loss = model(x).sum()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    conv_backwards = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    assert len(conv_backwards) == 19  # all 20 convolutions but the stem, whose input is the image
