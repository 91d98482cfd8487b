import pytest
import torch
import torchvision
import zoo
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import normonly

CASES = zoo.all_cases()


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_zoo_covers_at_least_25_models_from_four_sources():
    sources = {c.source for c in CASES}
    assert sources == {"torchvision", "timm", "transformers", "custom"}
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exactly_the_expected_parameters_train_and_only_they_change(case):
    torch.manual_seed(0)
    model = case.build()
    if "lazy" in case.name:
        case.example(model)  # materialize lazy parameters
    expected = case.expected_names(model)
    if not expected:
        with pytest.raises(ValueError, match="no normalization layer"):
            normonly.freeze_all_but_norm(model)
        return

    assert normonly.freeze_all_but_norm(model) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    case.example(model).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= expected
    assert changed, "an optimizer step changed no norm parameter"


def test_resnet18_trains_9600_of_11689512(capsys):
    model = normonly.freeze_all_but_norm(torchvision.models.resnet18())
    assert normonly.count_parameters(model) == (9_600, 11_689_512)
    line = normonly.print_trainable_parameters(model)
    assert line == "trainable params: 9,600 || all params: 11,689,512 || trainable%: 0.0821"
    assert line in capsys.readouterr().out


def test_extra_trainable_adds_head_by_suffix_and_by_regex():
    model = normonly.freeze_all_but_norm(torchvision.models.resnet18(), extra_trainable=["fc"])
    assert normonly.count_parameters(model)[0] == 9_600 + 512 * 1000 + 1000
    model = normonly.freeze_all_but_norm(torchvision.models.resnet18(), extra_trainable=r"fc\.bias")
    assert normonly.count_parameters(model)[0] == 9_600 + 1000


def test_exclude_and_weight_bias_switches():
    model = torchvision.models.resnet18()
    normonly.freeze_all_but_norm(model, exclude=["bn1"])  # every module named *.bn1 and the stem's bn1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("bn1.weight") or n.endswith("bn1.bias") for n in trainable)
    assert "layer1.0.bn2.weight" in trainable

    normonly.freeze_all_but_norm(model, train_weight=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert normonly.count_parameters(model)[0] == 4_800


def test_tied_norm_weight_stays_frozen():
    model = normonly.freeze_all_but_norm(zoo.TiedNorm())
    assert not model.ln.weight.requires_grad and model.ln.bias.requires_grad


def test_linear_named_norm_proj_is_not_a_norm():
    model = zoo.MixedNorms()
    names = [n for n, _ in normonly.norm_layers(model)]
    assert "norm_proj" not in names
    assert names == ["bn", "ln_plain", "rms", "gn", "inorm", "inorm_plain"]


def test_gemma_and_qwen3_norms_found_by_structure():
    import transformers as T

    cfg = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=99,
        head_dim=8,
    )
    gemma = T.GemmaForCausalLM(T.GemmaConfig(**cfg))
    assert {type(m).__name__ for _, m in normonly.norm_layers(gemma)} == {"GemmaRMSNorm"}
    qwen = T.Qwen3ForCausalLM(T.Qwen3Config(**cfg))
    names = [n for n, _ in normonly.norm_layers(qwen)]
    assert "model.layers.0.self_attn.q_norm" in names and "model.layers.0.self_attn.k_norm" in names


def test_register_norm_layer_teaches_a_custom_class():
    model = nn.Sequential(nn.Linear(4, 4), zoo.UnitScale(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="register_norm_layer"):
        normonly.freeze_all_but_norm(model)
    try:
        assert normonly.register_norm_layer(zoo.UnitScale) is zoo.UnitScale
        normonly.freeze_all_but_norm(model)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.g"]
    finally:
        normonly.detect.NORM_CLASSES.remove(zoo.UnitScale)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        normonly.register_norm_layer(zoo.UnitScale(3))


def test_frozen_batchnorm_errors_then_thaws_without_changing_outputs():
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval()
    flags = _flags(model)
    with pytest.raises(ValueError, match="thaw_frozen_batchnorm"):
        normonly.freeze_all_but_norm(model)
    assert _flags(model) == flags
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    normonly.thaw_frozen_batchnorm(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    normonly.freeze_all_but_norm(model)
    assert normonly.count_parameters(model)[0] == 9_600


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(extra_trainable=["no_such_head"]), ValueError, "no_such_head"),
        (dict(exclude=["layer9"]), ValueError, "layer9"),
        (dict(train_weight=False, train_bias=False), ValueError, "nothing would be trained"),
        (dict(exclude=r"(.*bn\d|.*downsample\.1)"), ValueError, "none with trainable"),
        (dict(extra_trainable=[3]), TypeError, "list of module"),
        (dict(exclude="(unclosed"), ValueError, "not a valid regular expression"),
    ],
)
def test_bad_arguments_raise_and_change_no_flag(kwargs, error, match):
    model = torchvision.models.resnet18()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    flags = _flags(model)
    with pytest.raises(error, match=match):
        normonly.freeze_all_but_norm(model, **kwargs)
    assert _flags(model) == flags


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        normonly.freeze_all_but_norm({"weight": torch.ones(3)})
    with pytest.raises(TypeError, match="nn.Module"):
        normonly.norm_layers("resnet18")


def _shared_gamma_model() -> nn.Module:
    """Two LayerNorms that share one γ (as tied norms do); each has its own β."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.LayerNorm(4))
    model[2].weight = model[1].weight
    return model


def test_a_shared_gamma_is_trained_if_any_owner_is_selected_and_no_owner_is_excluded():
    model = normonly.freeze_all_but_norm(_shared_gamma_model())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"1.weight", "1.bias", "2.bias"}
    for excluded in (["2"], ["1"], ["2.weight"]):  # excluding any owner (or the tensor by any name) freezes it
        model = normonly.freeze_all_but_norm(_shared_gamma_model(), exclude=excluded)
        assert not model[1].weight.requires_grad, excluded
    model = normonly.freeze_all_but_norm(_shared_gamma_model(), exclude=["2"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"1.bias"}


def test_a_shared_gamma_is_in_the_adapter_when_either_owner_is_targeted():
    from normonly.selection import select_adapter_tensors

    for target in (["2"], ["1"]):
        selection = select_adapter_tensors(_shared_gamma_model(), normonly.NormOnlyConfig(target_modules=target))
        assert "1.weight" in selection.trainable, target  # the shared γ, under its first name
    selection = select_adapter_tensors(_shared_gamma_model(), normonly.NormOnlyConfig(target_modules=["2"]))
    assert selection.trainable == ["1.weight", "2.bias"]
    excluded = select_adapter_tensors(_shared_gamma_model(), normonly.NormOnlyConfig(exclude_modules=["2"]))
    assert excluded.trainable == ["1.bias"]


def test_match_names_gives_a_regex_a_time_budget():
    from normonly.freeze import PatternError, match_names

    names = [f"encoder.layer.{i}.attention.output.LayerNorm" for i in range(20)]
    assert match_names(r".*\.1\d\..*", names)[r".*\.1\d\..*"] == names[10:]
    with pytest.raises(PatternError, match="took more than 0.2 s"):
        match_names(r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)\7\6\5\4\3\2\1e", names, budget=0.2)
    assert match_names(["LayerNorm", "1.attention.output.LayerNorm"], names)["1.attention.output.LayerNorm"] == [
        names[1]]
