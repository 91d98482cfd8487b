import pytest
from adapter_helpers import resnet18, tiny_bert

import normonly
from normonly import NormOnlyConfig
from normonly.selection import select_adapter_tensors


def test_default_selection_is_freeze_all_but_norm_plus_running_stats():
    model = resnet18()
    sel = select_adapter_tensors(model, NormOnlyConfig())
    assert set(sel.trainable) == set(normonly.norm_parameter_names(model))
    order = [n for n, _ in model.named_parameters()]
    assert sel.trainable == sorted(sel.trainable, key=order.index)
    stats = [n for n in sel.tensors if n not in sel.trainable]
    assert len(sel.trainable) == 40 and len(stats) == 60  # 20 BatchNorms: γ, β | mean, var, num_batches_tracked
    assert all(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in stats)
    frozen = select_adapter_tensors(model, NormOnlyConfig(bn_stats="freeze"))
    assert frozen.tensors == frozen.trainable == sel.trainable


def test_target_exclude_and_weight_flags_narrow_the_selection():
    model = resnet18()
    sel = select_adapter_tensors(
        model, NormOnlyConfig(target_modules=r"layer4\..*", exclude_modules=["layer4.1.bn2"], train_bias=False)
    )
    assert sel.norm_modules == ["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1"]
    assert sel.trainable == [f"{n}.weight" for n in sel.norm_modules]


def test_modules_to_save_adds_whole_modules_with_their_buffers():
    model = tiny_bert()
    sel = select_adapter_tensors(model, NormOnlyConfig(modules_to_save=["classifier"]))
    assert {"classifier.weight", "classifier.bias"} <= set(sel.trainable)
    assert sel.modules_to_save == ["classifier"]
    assert all("LayerNorm" in n or n.startswith("classifier") for n in sel.trainable)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": ["bn9"]}, r"target_modules=\['bn9'\] matches no trainable norm layer"),
        ({"modules_to_save": ["head"]}, r"modules_to_save=\['head'\] matches no module"),
        ({"exclude_modules": ["nothing"]}, r"exclude=\['nothing'\] matches no module"),
    ],
)
def test_patterns_that_match_nothing_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_adapter_tensors(resnet18(), NormOnlyConfig(**kwargs))
