import re

import peft
import pytest
import torch
from adapter_helpers import images, logits, resnet18, tiny_bert, tokens, train
from safetensors import safe_open
from torch import nn

import normonly
from normonly import NormOnlyConfig, NormOnlyModel, get_normonly_model
from normonly.config import WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")


def _peft_trainable(peft_model) -> set[str]:
    """peft's trainable parameter names mapped back to the base model's names."""
    names = set()
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".ln_tuning_layers.default", "")
            names.add(n.replace(".modules_to_save.default", ""))
    return names


def _outputs_match(a, b, x, modes=(False, True, False)):
    for mode in modes:
        a.train(mode)
        b.train(mode)
        if mode:
            torch.manual_seed(0)  # same dropout masks
        ya = logits(a, x)
        if mode:
            torch.manual_seed(0)
        assert torch.equal(ya, logits(b, x)), f"train={mode}"


def test_to_peft_config_makes_stock_peft_train_the_same_parameters():
    config = NormOnlyConfig(modules_to_save=["fc"], exclude_modules=["layer4.1.bn2"])
    peft_config = normonly.to_peft_config(config, resnet18())
    assert type(peft_config) is peft.LNTuningConfig
    assert peft_config.target_modules.startswith("^(?:") and peft_config.target_modules.endswith(")$")
    targeted = [n for n, _ in resnet18().named_modules() if re.fullmatch(peft_config.target_modules, n)]
    assert len(targeted) == 19 and "layer4.1.bn2" not in targeted

    peft_model = peft.get_peft_model(resnet18(), peft_config)
    ours = get_normonly_model(resnet18(), config)
    assert _peft_trainable(peft_model) == {n for n, p in ours.base_model.named_parameters() if p.requires_grad}


def test_to_peft_config_warns_about_what_peft_cannot_express():
    with pytest.warns(UserWarning, match="both γ and β"):
        normonly.to_peft_config(NormOnlyConfig(train_bias=False), resnet18())
    with pytest.warns(UserWarning, match="cannot freeze BatchNorm"):
        normonly.to_peft_config(NormOnlyConfig(bn_stats="freeze"), resnet18())


def test_normonly_adapter_loads_in_stock_peft_with_identical_outputs(tmp_path):
    model = get_normonly_model(resnet18(), NormOnlyConfig(modules_to_save=["fc"]))
    train(model, 1)
    model.save_pretrained(tmp_path / "normonly")
    normonly.to_peft_adapter(tmp_path / "normonly", tmp_path / "peft", resnet18())
    peft_model = peft.PeftModel.from_pretrained(resnet18(), tmp_path / "peft")
    _outputs_match(model, peft_model, images(99)[0])


def test_peft_adapter_converts_to_normonly_with_identical_outputs(tmp_path):
    peft_model = peft.get_peft_model(
        resnet18(), normonly.to_peft_config(NormOnlyConfig(modules_to_save=["fc"]), resnet18())
    )
    train(peft_model, 1)
    peft_model.save_pretrained(tmp_path / "peft")
    normonly.from_peft_adapter(tmp_path / "peft", tmp_path / "normonly", resnet18())
    model = NormOnlyModel.from_pretrained(resnet18(), tmp_path / "normonly")
    assert model.normonly_config["default"].modules_to_save == ["fc"]
    _outputs_match(model, peft_model, images(99)[0])


def test_tiny_bert_moves_both_ways_with_identical_logits(tmp_path):
    config = NormOnlyConfig(modules_to_save=["classifier"])
    model = get_normonly_model(tiny_bert(), config)
    train(model, 1, text=True, lr=0.5)
    model.save_pretrained(tmp_path / "a")
    normonly.to_peft_adapter(tmp_path / "a", tmp_path / "peft", tiny_bert())
    peft_model = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft")
    x = tokens(99)[0]
    _outputs_match(model, peft_model, x)

    normonly.from_peft_adapter(tmp_path / "peft", tmp_path / "b", tiny_bert())
    back = NormOnlyModel.from_pretrained(tiny_bert(), tmp_path / "b")
    _outputs_match(model, back, x)
    with (
        safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as a,
        safe_open(str(tmp_path / "b" / WEIGHTS_NAME), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_non_norm_module_peft_tuned_as_a_layer_becomes_modules_to_save(tmp_path):
    peft_model = peft.get_peft_model(resnet18(), peft.LNTuningConfig(target_modules=r"bn1|fc"))
    train(peft_model, 1)
    peft_model.save_pretrained(tmp_path / "peft")
    normonly.from_peft_adapter(tmp_path / "peft", tmp_path / "normonly", resnet18())
    model = NormOnlyModel.from_pretrained(resnet18(), tmp_path / "normonly")
    assert model.normonly_config["default"].modules_to_save == ["fc"]
    # peft let the untargeted BatchNorms' statistics drift in training without saving them: compare with
    # what peft itself loads back
    _outputs_match(model, peft.PeftModel.from_pretrained(resnet18(), tmp_path / "peft"), images(99)[0])


def test_freeze_adapter_matches_peft_in_eval_mode(tmp_path):
    model = get_normonly_model(resnet18(), NormOnlyConfig(bn_stats="freeze"))
    train(model, 1)
    model.save_pretrained(tmp_path / "normonly")
    normonly.to_peft_adapter(tmp_path / "normonly", tmp_path / "peft", resnet18())
    _outputs_match(model, peft.PeftModel.from_pretrained(resnet18(), tmp_path / "peft"), images(99)[0], modes=(False,))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)
        self.myfc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(x)
        return self.fc(h) + self.myfc(h)


def test_modules_to_save_that_peft_would_match_more_broadly_is_refused():
    with pytest.raises(ValueError, match=r"suffix and would also train \['myfc'\]"):
        normonly.to_peft_config(NormOnlyConfig(modules_to_save=["fc"]), TwoHeads())


def test_converters_refuse_the_wrong_kind_of_directory_and_write_nothing(tmp_path):
    model = get_normonly_model(resnet18(), NormOnlyConfig())
    model.save_pretrained(tmp_path / "normonly")
    with pytest.raises(ValueError, match="not a peft LN-tuning adapter"):
        normonly.from_peft_adapter(tmp_path / "normonly", tmp_path / "out", resnet18())
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="first mismatching key 'layer1.2.bn1.weight'"):
        normonly.to_peft_adapter(tmp_path / "normonly", tmp_path / "out", __import__("torchvision").models.resnet34())
    assert not (tmp_path / "out").exists()

    peft_model = peft.get_peft_model(tiny_bert(), peft.LNTuningConfig(target_modules=r".*LayerNorm"))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"first mismatching key 'bert\.embeddings\.LayerNorm\.weight': shape \(32,\)"):
        normonly.from_peft_adapter(tmp_path / "peft", tmp_path / "out", tiny_bert(hidden=48))
    assert not (tmp_path / "out").exists()
