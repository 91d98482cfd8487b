import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import normonly


def _grads(model, x, lean: bool):
    """Loss, input gradient and every trainable parameter's gradient, after one backward pass."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    if lean:
        with normonly.lean_frozen_convs():
            loss = model(x).float().pow(2).mean()
    else:
        loss = model(x).float().pow(2).mean()
    loss.backward()
    return [loss.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def _assert_identical(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u is not None and v is not None
        assert torch.equal(u, v)


def _frozen(conv: nn.Module, train_bias: bool = False) -> nn.Module:
    conv.weight.requires_grad_(False)
    if conv.bias is not None:
        conv.bias.requires_grad_(train_bias)
    return conv


CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d-stride-dilation": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11, 9)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False), (2, 4, 7, 7)),
    "conv2d-reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 7, 7)),
    "conv2d-same": (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, stride=(1, 2, 2)), (2, 4, 5, 7, 7)),
}


@pytest.mark.parametrize("train_bias", [False, True], ids=["frozen-bias", "bitfit-bias"])
@pytest.mark.parametrize("case", list(CONVS))
def test_lean_gradients_are_bit_identical_to_plain_path(case, train_bias):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    conv = make()
    norm = nn.GroupNorm(2, conv.out_channels)  # trainable γ/β after the frozen conv
    model = nn.Sequential(nn.SiLU(), _frozen(conv, train_bias), norm)
    x = torch.randn(shape)
    _assert_identical(_grads(model, x, lean=False), _grads(model, x, lean=True))


def test_lean_is_bit_identical_in_channels_last():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(8), nn.SiLU(), _frozen(nn.Conv2d(8, 16, 3, padding=1)), nn.BatchNorm2d(16))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    plain, lean = _grads(model, x, lean=False), _grads(model, x, lean=True)
    _assert_identical(plain, lean)
    assert lean[1].is_contiguous(memory_format=torch.channels_last)


def test_lean_is_bit_identical_under_cpu_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(8), nn.SiLU(), _frozen(nn.Conv2d(8, 16, 3, padding=1)), nn.BatchNorm2d(16))
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, lean = _grads(model, x, lean=False), _grads(model, x, lean=True)
    _assert_identical(plain, lean)


def _saved_storages(fn) -> set[int]:
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
def test_frozen_conv_input_is_kept_only_by_the_plain_path(lean):
    torch.manual_seed(0)
    act, conv, norm = nn.BatchNorm2d(4), _frozen(nn.Conv2d(4, 6, 3)), nn.BatchNorm2d(6)
    activation = {}
    act.register_forward_hook(lambda m, i, o: activation.update(out=o))
    model = nn.Sequential(act, conv, norm)  # the BatchNorm output feeds only the conv
    x = torch.randn(2, 4, 8, 8)

    def forward():
        if lean:
            with normonly.lean_frozen_convs():
                return model(x).sum()
        return model(x).sum()

    saved, loss = _saved_storages(forward)
    assert (activation["out"].untyped_storage().data_ptr() in saved) is not lean
    loss.backward()
    assert norm.weight.grad is not None and act.weight.grad is not None


def test_lean_leaves_trainable_convs_and_no_grad_calls_alone():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    with normonly.lean_frozen_convs():
        y = conv(x)
        with torch.no_grad():
            z = _frozen(nn.Conv2d(3, 4, 3))(x)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    y.sum().backward()
    assert conv.weight.grad is not None
    assert z.grad_fn is None


def test_lean_conv_raises_like_plain_path_when_weight_changes_before_backward():
    conv = _frozen(nn.Conv2d(3, 4, 3))
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    with normonly.lean_frozen_convs():
        y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _backward_conv_events(model, x, lean: bool):
    with normonly.lean_frozen_convs() if lean else torch.enable_grad():
        loss = model(x).pow(2).mean()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    names = ("aten::convolution_backward", "aten::conv_transpose2d")
    return [e for e in prof.events() if e.name in names]


def test_efficientnet_norm_only_backward_computes_input_gradients_only():
    torch.manual_seed(0)
    model = normonly.freeze_all_but_norm(torchvision.models.efficientnet_b0(num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    plain = _backward_conv_events(model, x, lean=False)
    assert len(plain) == n_convs - 1  # the stem conv sees the image, which needs no gradient
    assert all(e.concrete_inputs[-1][:2] == [True, False] for e in plain)  # output mask: input yes, weight no
    lean = _backward_conv_events(model, x, lean=True)
    # lean: the same backward kernel with the same output mask, fed a zero-stride stand-in for the input
    assert [e.name for e in lean] == ["aten::convolution_backward"] * (n_convs - 1)
    assert all(e.concrete_inputs[-1][:2] == [True, False] for e in lean)


def test_efficientnet_lean_keeps_fewer_activations_with_identical_gradients():
    torch.manual_seed(0)
    model = normonly.freeze_all_but_norm(torchvision.models.efficientnet_b0(num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    _assert_identical(_grads(model, x, lean=False), _grads(model, x, lean=True))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    plain_saved = _saved_storages(lambda: model(x).sum())[0] - params
    with normonly.lean_frozen_convs():
        lean_saved = _saved_storages(lambda: model(x).sum())[0] - params
    assert len(lean_saved) < 0.9 * len(plain_saved)
