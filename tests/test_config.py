import json
from dataclasses import fields

import pytest

import normonly.safe_io
from normonly import NormOnlyConfig
from normonly.config import CONFIG_NAME
from normonly.init import INITIALIZERS, register_initializer


def _write(path, data):
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(data))


def test_every_field_documents_itself_with_help_text():
    for f in fields(NormOnlyConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = NormOnlyConfig(
        target_modules=r".*bn1",
        exclude_modules=["layer4.1.bn2"],
        modules_to_save=["fc"],
        train_weight=False,
        bn_stats="freeze",
        init="frankle",
        base_model_name_or_path="resnet18",
    )
    cfg.save_pretrained(tmp_path)
    assert NormOnlyConfig.from_pretrained(tmp_path) == cfg
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["adapter_type"] == "normonly"


def test_tuples_become_lists_so_json_round_trips_compare_equal(tmp_path):
    cfg = NormOnlyConfig(modules_to_save=("fc",))
    assert cfg.modules_to_save == ["fc"]
    cfg.save_pretrained(tmp_path)
    assert NormOnlyConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bn_stats": "learn"}, "bn_stats"),
        ({"init": "xavier"}, "init"),
        ({"train_weight": "yes"}, "train_weight"),
        ({"train_weight": False, "train_bias": False}, "train_weight and train_bias"),
        ({"target_modules": "bn[1"}, "target_modules"),
        ({"exclude_modules": [1, 2]}, "exclude_modules"),
        ({"modules_to_save": 3}, "modules_to_save"),
        ({"base_model_name_or_path": 7}, "base_model_name_or_path"),
    ],
)
def test_invalid_values_get_an_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NormOnlyConfig(**kwargs)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="lora_r"):
        NormOnlyConfig(lora_r=8)


def test_unknown_field_in_file_is_named(tmp_path):
    _write(tmp_path, {**NormOnlyConfig().to_dict(), "lora_r": 8, "alpha": 1})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['alpha', 'lora_r'\]"):
        NormOnlyConfig.from_pretrained(tmp_path)


def test_missing_field_in_file_is_named(tmp_path):
    data = NormOnlyConfig().to_dict()
    del data["bn_stats"]
    _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['bn_stats'\]"):
        NormOnlyConfig.from_pretrained(tmp_path)


def test_invalid_value_in_file_names_file_and_field(tmp_path):
    _write(tmp_path, {**NormOnlyConfig().to_dict(), "init": "xavier"})
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*init='xavier'"):
        NormOnlyConfig.from_pretrained(tmp_path)


def test_peft_config_points_to_the_converter(tmp_path):
    _write(tmp_path, {"peft_type": "LN_TUNING", "target_modules": None})
    with pytest.raises(ValueError, match="from_peft_adapter"):
        NormOnlyConfig.from_pretrained(tmp_path)


def test_corrupt_and_missing_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        NormOnlyConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"target_modules": nu')
    with pytest.raises(ValueError, match="not valid JSON"):
        NormOnlyConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list"):
        NormOnlyConfig.from_pretrained(tmp_path)


def test_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    old = NormOnlyConfig(init="ones")
    old.save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()

    def dump_half_then_fail(obj, f, **kw):
        f.write('{"target_modules": ')
        raise OSError("disk full")

    monkeypatch.setattr(normonly.safe_io.json, "dump", dump_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        NormOnlyConfig(init="frankle").save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME]


def test_a_registered_initializer_becomes_a_valid_init(tmp_path):
    @register_initializer("test_zero_bias")
    def zero_bias(model, names):
        pass

    try:
        cfg = NormOnlyConfig(init="test_zero_bias")
        cfg.save_pretrained(tmp_path)
        assert NormOnlyConfig.from_pretrained(tmp_path).init == "test_zero_bias"
    finally:
        del INITIALIZERS["test_zero_bias"]


def test_an_empty_target_modules_list_is_refused_because_it_would_train_nothing():
    with pytest.raises(ValueError, match=r"target_modules=\[\] selects nothing"):
        NormOnlyConfig(target_modules=[])
    with pytest.raises(ValueError, match="target_modules"):
        NormOnlyConfig.from_dict({**NormOnlyConfig().to_dict(), "target_modules": []})


def test_older_adapter_configs_without_base_model_spec_still_load_and_specs_are_checked():
    data = NormOnlyConfig().to_dict()
    del data["base_model_spec"]
    assert NormOnlyConfig.from_dict(data).base_model_spec is None
    spec = {"builder": "cifar_resnet", "kwargs": {"depth": 8, "seed": 0}}
    assert NormOnlyConfig(base_model_spec=spec).base_model_spec == spec
    with pytest.raises(ValueError, match="base_model_spec must be"):
        NormOnlyConfig(base_model_spec={"builder": "os.system"})
