import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
import zoo
from adapter_helpers import assert_same_state, images, logits, resnet18, state, tiny_bert, tiny_vit, tokens, train
from conftest import ROOT
from run_helpers import free_port
from safetensors import safe_open
from torch import nn

import normonly
import normonly.safe_io
from normonly import NormOnlyConfig, NormOnlyModel, get_normonly_model
from normonly.config import CONFIG_NAME, WEIGHTS_NAME

HEAD = NormOnlyConfig(modules_to_save=["fc"])


def _trained(tmp_path, config=HEAD, seed=1):
    """A ResNet-18 adapter trained a few steps and saved to tmp_path/adapter; returns (model, directory)."""
    model = get_normonly_model(resnet18(), config)
    train(model, seed)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _wrapper_state(model: NormOnlyModel) -> dict:
    return {**state(model), "adapters": list(model.normonly_config), "active": model.active_adapter}


# ---------------------------------------------------------------- wrapping and training
def test_get_normonly_model_trains_norms_and_head_and_forwards_to_the_base(capsys):
    base = resnet18()
    model = get_normonly_model(base, HEAD)
    assert model.base_model is base and model.fc is base.fc  # attributes pass through
    expected = set(normonly.norm_parameter_names(base)) | {"fc.weight", "fc.bias"}
    assert {n for n, p in base.named_parameters() if p.requires_grad} == expected
    assert model.print_trainable_parameters().startswith("trainable params: 14,730 || all params: 11,181,642")
    x, _ = images(0)
    model.eval()
    assert torch.equal(model(x), base(x))
    with pytest.raises(TypeError, match="already a NormOnlyModel"):
        get_normonly_model(model, HEAD)


def test_hugging_face_attributes_pass_through():
    base = tiny_bert()
    model = get_normonly_model(base, NormOnlyConfig(modules_to_save=["classifier"]))
    assert model.config is base.config and model.num_labels == 3
    assert model.normonly_config["default"].modules_to_save == ["classifier"]


# ---------------------------------------------------------------- round trips
CASES = zoo.all_cases()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_zoo_model_trains_its_norms_and_round_trips_with_frankle_init(tmp_path, case):
    def build():
        torch.manual_seed(0)
        model = case.build()
        if "lazy" in case.name:
            case.example(model)  # materialize lazy parameters
        return model

    base = build()
    expected = case.expected_names(base)
    if not expected:
        with pytest.raises(ValueError, match="no normalization layer"):
            get_normonly_model(base, NormOnlyConfig())
        return
    model = get_normonly_model(base, NormOnlyConfig(init="frankle")).eval()
    assert {n for n, p in base.named_parameters() if p.requires_grad} == expected
    model.save_pretrained(tmp_path)
    loaded = NormOnlyModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        assert torch.equal(case.example(model), case.example(loaded))


@pytest.mark.parametrize("bn_stats", ["update", "freeze"])
def test_resnet18_round_trip_gives_identical_outputs_in_train_and_eval_mode(tmp_path, bn_stats):
    model, directory = _trained(tmp_path, NormOnlyConfig(modules_to_save=["fc"], bn_stats=bn_stats))
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    stats_moved = not torch.equal(model.base_model.bn1.running_mean, resnet18().bn1.running_mean)
    assert stats_moved == (bn_stats == "update")

    loaded = NormOnlyModel.from_pretrained(resnet18(), directory)
    x, _ = images(99)
    for mode in (False, True, False):  # eval, train (updates stats under "update"), eval again
        model.train(mode)
        loaded.train(mode)
        assert torch.equal(logits(model, x), logits(loaded, x))
    reference = model.base_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.base_model.state_dict().items())


def test_tiny_bert_round_trip_gives_identical_logits(tmp_path):
    model = get_normonly_model(tiny_bert(), NormOnlyConfig(modules_to_save=["classifier"]))
    train(model, seed=1, text=True, lr=0.5)
    model.save_pretrained(tmp_path)
    loaded = NormOnlyModel.from_pretrained(tiny_bert(), tmp_path)
    x, _ = tokens(99)
    model.eval()
    assert torch.equal(logits(model, x), logits(loaded, x))
    with model.disable_adapter():
        assert not torch.allclose(logits(model, x), logits(loaded, x))  # training did change the outputs


def test_three_adapters_on_one_base_match_three_separately_trained_copies_exactly():
    copies = []
    for i in range(3):
        copy = normonly.freeze_all_but_norm(resnet18(), extra_trainable=["fc"])
        train(copy, seed=i + 1)
        copies.append(copy.eval())

    shared = get_normonly_model(resnet18(), HEAD, adapter_name="task0")
    shared.add_adapter("task1", HEAD)
    shared.add_adapter("task2", HEAD)
    for i in range(3):
        shared.set_adapter(f"task{i}")
        train(shared, seed=i + 1)

    x, _ = images(99)
    shared.eval()
    outputs = []
    for i in (2, 0, 1, 0):
        shared.set_adapter(f"task{i}")
        out = logits(shared, x)
        assert torch.equal(out, logits(copies[i], x)), f"task{i}"
        outputs.append(out)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    assert not torch.allclose(outputs[0], outputs[2])


def test_accelerate_prepares_trains_and_unwraps_the_model(tmp_path):
    import accelerate

    accelerator = accelerate.Accelerator(cpu=True)
    model = get_normonly_model(resnet18(), HEAD)
    before = model.base_model.bn1.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    prepared, opt = accelerator.prepare(model, opt)
    x, y = images(0)
    accelerator.backward(nn.functional.cross_entropy(prepared(x), y))
    opt.step()
    unwrapped = accelerator.unwrap_model(prepared)
    assert unwrapped is model and not torch.equal(model.base_model.bn1.weight, before)
    unwrapped.save_pretrained(tmp_path)
    loaded = NormOnlyModel.from_pretrained(resnet18(), tmp_path)
    assert torch.equal(loaded.base_model.bn1.weight, model.base_model.bn1.weight)


def test_set_adapter_moves_requires_grad_to_the_active_adapter():
    model = get_normonly_model(resnet18(), HEAD, "a")
    model.add_adapter("b", NormOnlyConfig(target_modules="bn1"))  # a regex matches whole names: only the stem
    model.set_adapter("b")
    assert {n for n, p in model.base_model.named_parameters() if p.requires_grad} == {"bn1.weight", "bn1.bias"}
    model.set_adapter("a")
    assert "fc.weight" in {n for n, p in model.base_model.named_parameters() if p.requires_grad}


def test_new_adapter_starts_from_the_configured_init_not_from_the_active_adapter():
    model = get_normonly_model(resnet18(), HEAD, "a")
    train(model, 1)
    model.add_adapter("ones", NormOnlyConfig(init="ones"))
    assert model.active_adapter == "a"
    model.set_adapter("ones")
    assert torch.equal(model.base_model.bn1.weight, torch.ones(64))
    assert torch.equal(model.base_model.fc.weight, resnet18().fc.weight)  # a's head is not carried over


# ---------------------------------------------------------------- BatchNorm statistics
def test_freeze_normalizes_with_the_base_statistics_in_train_mode():
    model = get_normonly_model(resnet18(), NormOnlyConfig(bn_stats="freeze"))
    base_stats = {k: v.clone() for k, v in model.base_model.state_dict().items() if "running" in k}
    train(model, 1)
    assert all(torch.equal(model.base_model.state_dict()[k], v) for k, v in base_stats.items())
    assert not torch.equal(model.base_model.bn1.weight, resnet18().bn1.weight)  # γ did train
    x, _ = images(99)
    model.train()
    y_train = logits(model, x)
    assert all(m.training for m in model.modules())  # the train flag reads as the user set it
    model.eval()
    assert torch.equal(y_train, logits(model, x))

    model.train()
    with pytest.raises(RuntimeError):
        model.base_model.bn1(torch.randn(2, 5, 4, 4))  # wrong channel count: BatchNorm itself raises
    assert model.base_model.bn1.training


def test_update_uses_batch_statistics_in_train_mode():
    model = get_normonly_model(resnet18(), NormOnlyConfig())
    x, _ = images(99)
    model.train()
    y_train = logits(model, x)
    model.eval()
    assert not torch.allclose(y_train, logits(model, x))


# ---------------------------------------------------------------- disable, merge, unload
def test_disable_adapter_runs_the_base_and_cannot_corrupt_it():
    pristine = resnet18().eval()
    model = get_normonly_model(resnet18(), NormOnlyConfig(modules_to_save=["fc"], bn_stats="freeze"))
    train(model, 1)
    x, _ = images(99)
    model.eval()
    adapted = logits(model, x)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), logits(pristine, x))
        model.train()
        logits(model, x)  # plain BatchNorm in train mode: updates the live running stats
        model.eval()
    assert torch.equal(logits(model, x), adapted)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), logits(pristine, x))


def test_merge_and_unload_returns_a_plain_model_with_the_adapter_values():
    base = resnet18()
    model = get_normonly_model(base, NormOnlyConfig(modules_to_save=["fc"], bn_stats="freeze"))
    train(model, 1)
    model.eval()
    x, _ = images(99)
    adapted = logits(model, x)
    merged = model.merge_and_unload()
    assert merged is base and type(merged) is torchvision.models.ResNet
    assert all(p.requires_grad for p in merged.parameters())  # as the user handed it over
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert torch.equal(merged(x), adapted)


def test_unload_returns_the_base_with_its_original_values():
    pristine = resnet18().eval()
    model = get_normonly_model(resnet18(), HEAD)
    train(model, 1)
    base = model.unload().eval()
    x, _ = images(99)
    assert torch.equal(base(x), pristine(x))


def test_delete_adapter():
    model = get_normonly_model(resnet18(), HEAD, "a")
    model.add_adapter("b", HEAD)
    with pytest.warns(UserWarning, match="'b' is now active"):
        model.delete_adapter("a")
    assert model.active_adapter == "b" and list(model.normonly_config) == ["b"]
    before = _wrapper_state(model)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("b")
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        model.set_adapter("a")
    assert_same_state(_wrapper_state(model), before)


# ---------------------------------------------------------------- save / load
def test_several_adapters_save_like_peft_and_load_back(tmp_path):
    model = get_normonly_model(resnet18(), HEAD)
    train(model, 1)
    model.add_adapter("other", NormOnlyConfig(init="frankle"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "other" / WEIGHTS_NAME).is_file()

    loaded = NormOnlyModel.from_pretrained(resnet18(), tmp_path, is_trainable=True)
    assert loaded.training and any(p.requires_grad for p in loaded.parameters())
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert not loaded.training and loaded.active_adapter == "default"
    x, _ = images(99)
    for name in ("other", "default"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        model.eval()
        assert torch.equal(logits(model, x), logits(loaded, x))
    loaded.set_adapter("other")
    assert not any(p.requires_grad for p in loaded.parameters())  # "other" was loaded for inference


def test_save_pretrained_writes_nothing_where_it_is_not_the_main_process(tmp_path):
    model = get_normonly_model(resnet18(), HEAD)
    train(model, 1)
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    model.save_pretrained(tmp_path / "main")
    saved = NormOnlyModel.from_pretrained(resnet18(), tmp_path / "main")
    x, _ = images(99)
    model.eval()
    assert torch.equal(logits(model, x), logits(saved, x))


def test_from_pretrained_defaults_to_inference(tmp_path):
    _, directory = _trained(tmp_path)
    loaded = NormOnlyModel.from_pretrained(resnet18(), directory)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_resnet18_adapter_holds_only_norm_tensors_and_is_tiny(tmp_path):
    _, directory = _trained(tmp_path, NormOnlyConfig())
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 100 and all(".bn" in k or "downsample.1" in k or k.startswith("bn1") for k in keys)
    assert (directory / WEIGHTS_NAME).stat().st_size < 100_000


def test_double_precision_model_saves_double_adapters(tmp_path):
    model = get_normonly_model(resnet18(), HEAD, "a")
    model.add_adapter("b", NormOnlyConfig(init="frankle"))
    model.double()
    x, _ = images(99)
    model.eval()
    y = logits(model, x.double())
    model.set_adapter("b")
    model.set_adapter("a")
    assert y.dtype == torch.float64 and torch.equal(logits(model, x.double()), y)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "b" / WEIGHTS_NAME), "pt") as f:
        assert f.get_tensor("bn1.weight").dtype == torch.float64


def test_loading_reads_no_pickle(tmp_path, monkeypatch):
    _, directory = _trained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    NormOnlyModel.from_pretrained(resnet18(), directory).save_pretrained(tmp_path / "again")


# ---------------------------------------------------------------- bad input: clear error, nothing changed
def test_adapter_onto_another_architecture_names_the_first_mismatch_and_leaves_the_base_alone(tmp_path):
    _, directory = _trained(tmp_path)
    torch.manual_seed(0)
    deeper = torchvision.models.resnet34(num_classes=10)
    before = state(deeper)
    with pytest.raises(ValueError, match=r"does not fit this ResNet: first mismatching key 'layer1\.2\.bn1\.weight'"):
        NormOnlyModel.from_pretrained(deeper, directory)
    assert_same_state(state(deeper), before)

    torch.manual_seed(0)
    other_head = torchvision.models.resnet18(num_classes=5)
    before = state(other_head)
    with pytest.raises(ValueError, match=r"'fc\.weight': shape \(10, 512\) in the file, \(5, 512\) in the model"):
        NormOnlyModel.from_pretrained(other_head, directory)
    assert_same_state(state(other_head), before)


def test_bert_adapter_onto_a_wider_bert_names_the_first_layernorm(tmp_path):
    model = get_normonly_model(tiny_bert(), NormOnlyConfig())
    model.save_pretrained(tmp_path)
    wide = get_normonly_model(tiny_bert(hidden=48), NormOnlyConfig(), "mine")
    before = _wrapper_state(wide)
    with pytest.raises(ValueError, match=r"'bert\.embeddings\.LayerNorm\.weight': shape \(32,\) in the file"):
        wide.load_adapter(tmp_path, "theirs")
    assert_same_state(_wrapper_state(wide), before)
    assert _wrapper_state(wide)["adapters"] == ["mine"]


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "garbage_header", "missing_field", "missing_weights"])
def test_damaged_adapter_gets_a_clear_error_and_changes_nothing(tmp_path, damage):
    _, directory = _trained(tmp_path)
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    raw = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(raw[: len(raw) // 2])
        message = "truncated or corrupt"
    elif damage == "flip_data":
        weights.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:]))
        message = "sha256"
    elif damage == "garbage_header":
        weights.write_bytes(b"\x07" * 16 + raw[16:])
        message = "truncated or corrupt"
    elif damage == "missing_field":
        config.write_text(config.read_text().replace('"bn_stats": "update",', ""))
        message = r"lacks field\(s\) \['bn_stats'\]"
    else:
        weights.unlink()
        message = "does not exist"

    base = resnet18()
    before = state(base)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        NormOnlyModel.from_pretrained(base, directory)
    assert_same_state(state(base), before)

    model = get_normonly_model(resnet18(), HEAD, "mine")
    before = _wrapper_state(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        model.load_adapter(directory, "theirs")
    assert_same_state(_wrapper_state(model), before)
    assert list(model.normonly_config) == ["mine"]


def test_duplicate_adapter_name_is_refused_and_changes_nothing(tmp_path):
    _, directory = _trained(tmp_path)
    model = get_normonly_model(resnet18(), HEAD)
    train(model, 2)
    before = _wrapper_state(model)
    with pytest.raises(ValueError, match="'default' already exists"):
        model.load_adapter(directory, adapter_name="default")
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", NormOnlyConfig(init="ones"))
    for bad in ("..", "a/b", ""):
        with pytest.raises(ValueError, match="path separators"):
            model.add_adapter(bad, HEAD)
    with pytest.raises(ValueError, match="path separators"):
        get_normonly_model(resnet18(), HEAD, adapter_name="..")
    assert_same_state(_wrapper_state(model), before)
    assert _wrapper_state(model)["adapters"] == ["default"]


def test_uninitialized_lazy_module_is_named():
    base = nn.Sequential(nn.Linear(4, 6), nn.LazyBatchNorm1d(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="1.weight is not initialized yet.*forward pass"):
        get_normonly_model(base, NormOnlyConfig())
    assert all(p.requires_grad for p in base.parameters() if not isinstance(p, nn.UninitializedParameter))


def test_bad_config_for_this_model_leaves_the_base_untouched():
    base = resnet18()
    before = state(base)
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\]"):
        get_normonly_model(base, NormOnlyConfig(modules_to_save=["head"]))
    assert_same_state(state(base), before)


class OddNorm(nn.Module):
    """Detected as a norm by the structural rule, but its scale is 2 + 3w: init='ones' cannot handle it."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return x * (2 + 3 * self.weight)


def test_failing_init_leaves_the_base_untouched():
    base = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), OddNorm(8))
    before = state(base)
    with pytest.raises(ValueError, match="OddNorm"):
        get_normonly_model(base, NormOnlyConfig(init="ones"))
    assert_same_state(state(base), before)
    model = get_normonly_model(base, NormOnlyConfig())
    before = _wrapper_state(model)
    with pytest.raises(ValueError, match="OddNorm"):
        model.add_adapter("ones", NormOnlyConfig(init="ones"))
    assert_same_state(_wrapper_state(model), before)


def test_failed_save_keeps_the_previous_adapter_files_whole(tmp_path, monkeypatch):
    model, directory = _trained(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    train(model, 2)
    monkeypatch.setattr(normonly.safe_io, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # both files old, no temp files


# ---------------------------------------------------------------- replacing an adapter in place (resume, best model)
def test_load_adapter_with_overwrite_puts_the_saved_values_into_the_same_parameters(tmp_path):
    trained, directory = _trained(tmp_path)
    model = get_normonly_model(resnet18(), HEAD)
    params = list(model.parameters())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.load_adapter(directory, "default", is_trainable=True, overwrite=True)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # an optimizer stays valid
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    x, _ = images(99)
    trained.eval()
    model.eval()
    assert torch.equal(logits(model, x), logits(trained, x))
    model.save_pretrained(tmp_path / "again")
    assert all(torch.equal(v, trained.base_model.state_dict()[k]) for k, v in state_dict_of(tmp_path / "again").items())


def test_load_adapter_with_overwrite_of_an_inactive_adapter_leaves_the_live_model_alone(tmp_path):
    trained, directory = _trained(tmp_path)
    model = get_normonly_model(resnet18(), HEAD, "a")
    model.add_adapter("b", HEAD)
    model.eval()
    x, _ = images(99)
    before = logits(model, x)
    model.load_adapter(directory, "b", overwrite=True)
    assert torch.equal(logits(model, x), before)
    model.set_adapter("b")
    trained.eval()
    assert torch.equal(logits(model, x), logits(trained, x))


def test_load_adapter_with_overwrite_takes_the_saved_config(tmp_path):
    _, directory = _trained(tmp_path, NormOnlyConfig(target_modules="bn1"))  # the stem's BatchNorm only, no head
    model = get_normonly_model(resnet18(), HEAD)
    train(model, 2)
    model.load_adapter(directory, "default", is_trainable=True, overwrite=True)
    assert model.normonly_config["default"].modules_to_save is None
    assert {n for n, p in model.base_model.named_parameters() if p.requires_grad} == {"bn1.weight", "bn1.bias"}
    assert torch.equal(model.base_model.fc.weight, resnet18().fc.weight)  # the head is the base's again


def test_failed_overwrite_changes_nothing(tmp_path):
    _, directory = _trained(tmp_path)
    (directory / WEIGHTS_NAME).write_bytes(b"\x07" * 64)
    model = get_normonly_model(resnet18(), HEAD)
    train(model, 2)
    before = _wrapper_state(model)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        model.load_adapter(directory, "default", is_trainable=True, overwrite=True)
    assert_same_state(_wrapper_state(model), before)
    with model.disable_adapter(), pytest.raises(RuntimeError, match="disable_adapter"):
        model.load_adapter(directory, "default", overwrite=True)


def state_dict_of(directory) -> dict:
    return normonly.safe_io.read_tensors(directory / WEIGHTS_NAME)


# ---------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_gives_every_norm_the_gradient_it_gets_without(use_reentrant):
    """In a ViT nothing before the first layer is a norm: reentrant checkpointing needs inputs that require grad."""

    def gradients(checkpointing: bool) -> dict:
        model = get_normonly_model(tiny_vit(), NormOnlyConfig())
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        x, y = images(0, size=16)
        torch.manual_seed(0)  # dropout
        model(pixel_values=x, labels=y % 3).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    expected, got = gradients(False), gradients(True)
    assert len(expected) == 10 and all(got[n] is not None for n in expected)
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)


def test_checkpointing_hooks_go_away_with_disable_and_unload():
    def hooks(module):
        return sum(len(m._forward_hooks) for m in module.modules())

    base = tiny_vit()
    bare = hooks(base)
    base.activation_checkpointing_enable()  # enabled before wrapping: the wrapper adds the input hook itself
    model = get_normonly_model(base, NormOnlyConfig())
    assert hooks(base) == bare + 1
    model.activation_checkpointing_disable()
    assert hooks(base) == bare and not base.is_activation_checkpointing
    model.activation_checkpointing_enable()
    model.activation_checkpointing_enable()
    assert hooks(base) == bare + 1
    assert hooks(model.merge_and_unload()) == bare


# ---------------------------------------------------------------- trust: wrapping, saving, distributed use
def test_a_compiled_or_data_parallel_model_saves_under_the_plain_models_names(tmp_path):
    for wrap in (torch.compile, nn.DataParallel):
        base = resnet18()
        model = get_normonly_model(wrap(base), HEAD)
        assert model.base_model is base
        train(model, 1, steps=1)
        model.save_pretrained(tmp_path / wrap.__name__)
        with safe_open(tmp_path / wrap.__name__ / WEIGHTS_NAME, "pt") as f:
            keys = list(f.keys())
        assert "fc.weight" in keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
        plain = NormOnlyModel.from_pretrained(resnet18(), tmp_path / wrap.__name__)
        x, _ = images(3)
        model.eval()
        torch.testing.assert_close(logits(plain, x), logits(model, x))


def test_wrapping_one_base_twice_or_a_peft_model_is_refused_and_changes_nothing():
    import peft

    base = resnet18()
    first = get_normonly_model(base, HEAD)
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="already wrapped by a NormOnlyModel"):
        get_normonly_model(base, NormOnlyConfig())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before and len(first._hooks) > 0
    first.unload()
    get_normonly_model(base, NormOnlyConfig())  # after unload() the base is free again

    lora = peft.get_peft_model(resnet18(), peft.LoraConfig(target_modules=["fc"], r=2))
    flags = {n: p.requires_grad for n, p in lora.named_parameters()}
    for model in (lora, lora.base_model.model):
        with pytest.raises(ValueError, match="already wrapped by peft"):
            get_normonly_model(model, NormOnlyConfig())
    assert {n: p.requires_grad for n, p in lora.named_parameters()} == flags


def test_saving_after_unload_raises_and_writes_nothing(tmp_path):
    for end in ("unload", "merge_and_unload"):
        model = get_normonly_model(resnet18(), HEAD)
        getattr(model, end)()
        with pytest.raises(RuntimeError, match="holds no adapter"):
            model.save_pretrained(tmp_path / end)
        assert not (tmp_path / end).exists()


def test_a_failed_multi_adapter_save_leaves_the_old_adapters_whole(tmp_path, monkeypatch):
    model = get_normonly_model(resnet18(), HEAD)
    model.add_adapter("b", NormOnlyConfig())
    model.save_pretrained(tmp_path)
    old = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    train(model, 2, steps=1)
    real_save = normonly.safe_io.save_file
    calls = []

    def fail_on_second(*args, **kwargs):  # the disk fills while writing the second adapter
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(normonly.safe_io, "save_file", fail_on_second)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path)
    now = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert now == old  # neither adapter was replaced, and no temporary file is left


def test_stale_temporaries_of_killed_saves_are_removed_by_the_next_save_or_load(tmp_path):
    _, directory = _trained(tmp_path)
    stale = [directory / f".{WEIGHTS_NAME}.abc123.tmp", directory / f".{CONFIG_NAME}.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    NormOnlyModel.from_pretrained(resnet18(), directory)
    assert not any(p.exists() for p in stale)
    stale[0].write_bytes(b"\0")
    get_normonly_model(resnet18(), HEAD).save_pretrained(directory)
    assert not stale[0].exists() and sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_an_adapter_whose_regex_would_backtrack_for_minutes_is_refused_quickly(tmp_path):
    import time

    base = tiny_bert()
    model = get_normonly_model(base, NormOnlyConfig())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    # the pattern: 90 s with `re` on 40-character names; the backtracking-safe engine ends at once
    config["target_modules"] = r"([\w.]+)*!"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="matches no trainable norm layer"):
        NormOnlyModel.from_pretrained(tiny_bert(), tmp_path)
    assert time.perf_counter() - start < 5
    # backreferences make even that engine do polynomial work of degree 7: seconds per name, so the budget stops it
    config["target_modules"] = r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)\7\6\5\4\3\2\1e"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"adapter_config\.json: field target_modules: the regex .* refused"):
        NormOnlyModel.from_pretrained(tiny_bert(), tmp_path)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("field, value, message", [
    ("target_modules", "a" * 10_000_000, "regex of 10,000,000 characters"),
    ("target_modules", ["layer"] * 200_000, "lists 200,000 names"),
    ("exclude_modules", [], None),
])
def test_absurd_adapter_configs_get_a_short_error_naming_file_and_field(tmp_path, field, value, message):
    get_normonly_model(tiny_bert(), NormOnlyConfig()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        NormOnlyModel.from_pretrained(tiny_bert(), tmp_path)
    text = str(err.value)
    assert CONFIG_NAME in text and field in text and len(text) < 500
    if message:
        assert message in text


def test_a_config_nested_200k_deep_is_a_short_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply") as err:
        NormOnlyModel.from_pretrained(tiny_bert(), tmp_path)
    assert len(str(err.value)) < 300


@pytest.mark.slow
def test_switching_to_an_adapter_ddp_does_not_synchronise_raises_and_rebuilding_ddp_works(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--master-addr", "127.0.0.1",
               "--master-port", free_port(), "--nproc_per_node", "2",
               str(ROOT / "tests" / "helpers" / "ddp_set_adapter.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert "did not require grad when DistributedDataParallel was built" in report["switch_after_ddp"]
        assert "'2.weight'" in report["switch_after_ddp"]
    heads = [r["head_after_rebuild"] for r in ranks]
    assert isinstance(heads[0], list) and heads[0] == heads[1]  # trained on different data, kept identical by DDP
