"""Per-sample adapters in one batch: every sample equals set_adapter(its adapter) + a forward of it alone."""

import pytest
import torch
import zoo
from adapter_helpers import resnet18, tiny_bert
from torch import nn

from normonly import NormOnlyConfig, get_normonly_model
from normonly.mixed import BASE_ADAPTER

NAMES = ["a", "b", "__base__", "b", "a", "c"]
CASES = [c for c in zoo.all_cases() if c.name != "timm_nf_resnet_no_norm"]  # a model without norms has no adapter


def _perturb_every_tensor(model, name: str, seed: int) -> None:
    """Make adapter ``name`` differ from the base and the other adapters in every tensor it holds."""
    model.set_adapter(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for qualified in model._adapters[name].selection.tensors:
            t = model._live(qualified)
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g).to(t.dtype)
            t.mul_(torch.exp(0.3 * noise)) if qualified.endswith("running_var") else t.add_(0.3 * noise)


def _with_adapters(model, config=None):
    wrapper = get_normonly_model(model, config or NormOnlyConfig(), "a")
    for name in ("b", "c"):
        wrapper.add_adapter(name, config or NormOnlyConfig())
    for seed, name in enumerate(("a", "b", "c")):
        _perturb_every_tensor(wrapper, name, seed)
    return wrapper.eval()


def _rows(batch, i):
    return batch[i : i + 1] if isinstance(batch, torch.Tensor) and batch.dim() > 0 else batch


def _output(out):
    return out.logits if hasattr(out, "logits") else out


def _assert_each_sample_matches(wrapper, args, kwargs, names):
    with torch.no_grad():
        mixed = _output(wrapper(*args, adapter_names=names, **kwargs))
        for i, name in enumerate(names):
            one_args = [_rows(a, i) for a in args]
            one_kwargs = {k: _rows(v, i) for k, v in kwargs.items()}
            if name == "__base__":
                with wrapper.disable_adapter():
                    alone = _output(wrapper(*one_args, **one_kwargs))
            else:
                wrapper.set_adapter(name)
                alone = _output(wrapper(*one_args, **one_kwargs))
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_sample_gets_exactly_its_own_adapter_on_the_whole_zoo(case):
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.example.inputs(len(NAMES))
    with torch.no_grad():
        model.eval()(*args, **kwargs)  # materializes lazy modules
    wrapper = _with_adapters(model)
    _assert_each_sample_matches(wrapper, args, kwargs, NAMES)


def test_heads_in_modules_to_save_are_per_sample_too():
    torch.manual_seed(0)
    wrapper = _with_adapters(resnet18(), NormOnlyConfig(modules_to_save=["fc"]))
    assert not torch.equal(wrapper._adapters["a"].values["fc.weight"], wrapper._adapters["b"].values["fc.weight"])
    _assert_each_sample_matches(wrapper, (torch.randn(6, 3, 32, 32),), {}, NAMES)
    bert = _with_adapters(tiny_bert(), NormOnlyConfig(modules_to_save=["classifier"]))
    _assert_each_sample_matches(bert, (), {"input_ids": torch.randint(0, 99, (6, 8))}, NAMES)


def test_one_adapter_for_the_whole_batch_equals_the_plain_forward_and_nothing_changes():
    torch.manual_seed(0)
    wrapper = _with_adapters(resnet18(), NormOnlyConfig(modules_to_save=["fc"]))
    wrapper.set_adapter("b")
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in wrapper.base_model.state_dict().items()}
    with torch.no_grad():
        plain = wrapper(x)
        mixed = wrapper(x, adapter_names=["b"] * 4)
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    after = wrapper.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and wrapper.active_adapter == "b"
    assert all("forward" not in m.__dict__ for m in wrapper.base_model.modules())  # overrides are removed


@pytest.mark.parametrize("names, error, message", [
    (["a", "zzz", "a", "a"], ValueError, r"unknown adapter\(s\) \['zzz'\]"),
    (["a", "b"], ValueError, "2 names for a batch of 4 samples"),
    ("a", TypeError, "one per sample"),
    ([], ValueError, "0 names for a batch of 4"),
])
def test_bad_adapter_names_are_clear_errors(names, error, message):
    wrapper = _with_adapters(resnet18())
    with pytest.raises(error, match=message), torch.no_grad():
        wrapper(torch.randn(4, 3, 32, 32), adapter_names=names)
    assert all("forward" not in m.__dict__ for m in wrapper.base_model.modules())


def test_training_mode_and_disabled_adapters_refuse_mixed_batches():
    wrapper = _with_adapters(resnet18())
    wrapper.train()
    with pytest.raises(RuntimeError, match="inference: call model.eval"):
        wrapper(torch.randn(2, 3, 32, 32), adapter_names=["a", "b"])
    wrapper.eval()
    with wrapper.disable_adapter(), pytest.raises(RuntimeError, match="disable_adapter"):
        wrapper(torch.randn(2, 3, 32, 32), adapter_names=["a", "b"])


class FoldsTokens(nn.Module):
    """A LayerNorm applied to (batch x tokens, dim): its dimension 0 is not the samples'."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        n, t, d = x.shape
        return self.out(self.ln(x.reshape(n * t, d)).reshape(n, t, d).mean(1))


def test_a_layer_that_folds_tokens_into_the_batch_dimension_is_detected():
    wrapper = _with_adapters(FoldsTokens())
    with pytest.raises(RuntimeError, match=r"ln \(LayerNorm\) gets an input of shape \(12, 8\)"), torch.no_grad():
        wrapper(torch.randn(4, 3, 8), adapter_names=["a", "b", "a", "__base__"])


def test_gradients_are_not_needed_and_the_base_adapter_is_the_base_model():
    torch.manual_seed(0)
    base = resnet18().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = base(x)
    wrapper = _with_adapters(base)
    with torch.no_grad():
        out = wrapper(x, adapter_names=["__base__"] * 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert BASE_ADAPTER == "__base__"


@pytest.mark.slow
def test_a_compiled_model_serves_mixed_batches_eagerly_with_the_same_outputs():
    torch.manual_seed(0)
    wrapper = _with_adapters(resnet18())
    x = torch.randn(4, 3, 32, 32)
    names = ["a", "b", "__base__", "c"]
    with torch.no_grad():
        expected = wrapper(x, adapter_names=names)
        compiled = torch.compile(wrapper)
        assert torch.equal(compiled(x, adapter_names=names), expected)
        torch.testing.assert_close(compiled(x), wrapper(x), rtol=1e-4, atol=1e-4)  # and the plain call compiles


class VolumeNet(nn.Module):
    """BatchNorm3d, SyncBatchNorm (eval: no process group needed), a bias-free LayerNorm and GroupNorm on volumes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.bn3d = nn.BatchNorm3d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4, bias=False)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.gn(self.sync(self.bn3d(self.conv(x)).relu()))
        return self.out(self.ln(h.mean((2, 3, 4))))


def test_batchnorm3d_syncbatchnorm_and_bias_free_norms_mix_exactly():
    torch.manual_seed(0)
    wrapper = _with_adapters(VolumeNet(), NormOnlyConfig(modules_to_save=["out"]))
    _assert_each_sample_matches(wrapper, (torch.randn(6, 2, 4, 4, 4),), {}, NAMES)
