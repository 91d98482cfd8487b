"""The `normonly` command: inspect, info, convert, merge, report, their errors and `--help`; lazy `import normonly`."""

import csv
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT
from safetensors.torch import load_file

import normonly
from normonly.checkpoint import save_trainable, write_json
from normonly.cli import main

SPEC = {"builder": "cifar_resnet", "kwargs": {"depth": 8, "width": 1, "seed": 0}}
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
COMMANDS = ("inspect", "info", "convert", "merge", "report")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "normonly", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _usage_error(capsys, *argv) -> str:
    """Run argv in-process, expect argparse's exit status 2, return the error line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def adapter(tmp_path):
    """A cifar_resnet-8 adapter with a trained head, values moved off the base's, and its base_model_spec."""
    torch.manual_seed(0)
    config = normonly.NormOnlyConfig(modules_to_save=["fc"], base_model_spec=SPEC)
    model = normonly.get_normonly_model(normonly.build_base(SPEC), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


# ---------------------------------------------------------------- inspect
def test_inspect_resnet18_counts_20_batchnorms_and_9600_trainable_parameters():
    result = _cli("inspect", "resnet18")
    assert result.returncode == 0, result.stderr
    assert "BatchNorm2d ×20" in result.stdout
    assert "9,600 trainable of 11,689,512" in result.stdout


def test_inspect_json_reports_the_real_adapter_file_size_and_gamma_beta(capsys, tmp_path):
    info = _json(capsys, "inspect", "resnet18", "--json")
    assert info["norm_layers"] == {"BatchNorm2d": 20} and info["source"] == "torchvision"
    assert (info["trainable_params"], info["total_params"]) == (9_600, 11_689_512)
    import torchvision

    normonly.get_normonly_model(torchvision.models.resnet18(), normonly.NormOnlyConfig()).save_pretrained(tmp_path)
    assert info["adapter_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert (info["gamma_abs_mean"], info["beta_mean"], info["channels"]) == (1.0, 0.0, 4_800)  # fresh BatchNorm


def test_inspect_module_function_with_kwargs_builds_that_model(capsys):
    info = _json(capsys, "inspect", "normonly.models:cifar_resnet", "--kwargs", '{"depth": 14}', "--json")
    assert info["norm_layers"] == {"BatchNorm2d": 15} and info["source"] == "module:function"
    assert (info["trainable_params"], info["total_params"]) == (1_120, 175_258)  # DESIGN.md: ResNet-14


def test_inspect_local_transformers_folder_loads_its_weights(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=32))
    with torch.no_grad():
        for _, layer in normonly.norm_layers(bert):
            layer.weight.fill_(0.5)
            layer.bias.fill_(-0.25)
    bert.save_pretrained(tmp_path / "bert")
    info = _json(capsys, "inspect", str(tmp_path / "bert"), "--json")
    assert info["norm_layers"] == {"LayerNorm": 5} and info["class"] == "BertModel"
    assert info["trainable_params"] == 5 * 2 * 16
    assert (info["gamma_abs_mean"], info["beta_mean"]) == (0.5, -0.25)  # the saved values, not a fresh init


# ---------------------------------------------------------------- info
def test_info_lists_every_tensor_with_shape_and_dtype_and_the_recorded_base(capsys, adapter):
    info = _json(capsys, "info", str(adapter), "--json")
    saved = load_file(adapter / "adapter_model.safetensors")
    assert {t["name"]: t["shape"] for t in info["tensors"]} == {k: list(v.shape) for k, v in saved.items()}
    assert {t["dtype"] for t in info["tensors"]} == {"F32", "I64"}  # γ/β/statistics, num_batches_tracked
    assert info["kind"] == "normonly" and info["config"]["modules_to_save"] == ["fc"]
    assert info["base_model_spec"] == SPEC
    assert info["total_bytes"] == sum(p.stat().st_size for p in adapter.iterdir())
    assert main(["info", str(adapter), "--limit", "0"]) == 0
    text = capsys.readouterr().out
    assert "cifar_resnet(depth=8, seed=0, width=1)" in text
    assert all(name in text for name in saved)


def test_info_reads_a_head_or_bitfit_run_folder_with_trainable_safetensors_and_base_json(capsys, tmp_path):
    base = normonly.build_base(SPEC)
    for name, p in base.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    save_trainable(base, tmp_path / "trainable.safetensors", batchnorm_stats=True)
    write_json(tmp_path / "base.json", SPEC)
    info = _json(capsys, "info", str(tmp_path), "--json")
    assert info["kind"].startswith("trainable tensors") and info["base_model_spec"] == SPEC
    assert {"fc.weight", "fc.bias"} <= {t["name"] for t in info["tensors"]}


# ---------------------------------------------------------------- convert, merge
def test_convert_to_peft_and_back_gives_the_same_tensors(capsys, adapter, tmp_path):
    assert main(["convert", str(adapter), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "normonly"]) == 0
    original, back = (load_file(d / "adapter_model.safetensors") for d in (adapter, tmp_path / "back"))
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert normonly.build_base(tmp_path / "back") is not None  # base.json travels with the converted adapter


def test_convert_without_a_recorded_base_asks_for_base_and_uses_it(capsys, adapter, tmp_path):
    assert main(["convert", str(adapter), str(tmp_path / "peft"), "--to", "peft"]) == 0
    (tmp_path / "peft" / "base.json").unlink()
    line = _usage_error(capsys, "convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "normonly")
    assert line.startswith("normonly convert: error: argument --base:") and "records no base model" in line
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "normonly", "--base",
                 "cifar_resnet", "--kwargs", json.dumps(SPEC["kwargs"])]) == 0
    assert load_file(tmp_path / "back" / "adapter_model.safetensors").keys() == \
        load_file(adapter / "adapter_model.safetensors").keys()


@pytest.mark.parametrize("base", [["recorded"], ["normonly.models:cifar_resnet", "--kwargs", json.dumps(SPEC["kwargs"])]])
def test_merge_writes_the_merged_state_dict(capsys, adapter, tmp_path, base):
    assert main(["merge", base[0], str(adapter), str(tmp_path / "merged"), *base[1:]]) == 0
    written = load_file(tmp_path / "merged" / "model.safetensors")
    expected = normonly.NormOnlyModel.from_pretrained(normonly.build_base(SPEC), adapter).merge_and_unload().state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert not torch.equal(written["fc.weight"], normonly.build_base(SPEC).state_dict()["fc.weight"])


# ---------------------------------------------------------------- report
def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_on_two_cifar_runs_writes_table_csv_and_png_with_curves(capsys, monkeypatch, tmp_path, shared_data):
    mini = shared_data / "cifar10-mini"
    if not mini.is_dir():
        pytest.skip(f"{mini} is missing")
    monkeypatch.setenv("NORMONLY_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("resnet_cifar", ROOT / "recipes" / "resnet_cifar.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    runs = [tmp_path / "r8-norm", tmp_path / "r8-output"]
    for run, mode in zip(runs, ("norm", "output")):
        try:
            recipe.main(["--depth", "8", "--max-steps", "3", "--train", mode, "--data", str(mini), "--output", str(run),
                         "--report-to", "none"])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "out" / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "out" / "cmp.md").read_text()
    assert "| r8-norm | norm |" in printed and "| r8-output | output |" in printed
    with open(tmp_path / "out" / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    for row, run in zip(rows, runs):
        results = json.loads((run / "results.json").read_text())
        assert float(row["accuracy"]) == results["accuracy"]
        assert int(row["trainable_params"]) == results["trainable_params"]
        assert float(row["seconds"]) == results["seconds"]
    width, height = _png_size(tmp_path / "out" / "cmp.png")
    assert width > 3 * height  # three panels: accuracy bars, test accuracy and train loss curves


def _fake_run(folder, **results):
    folder.mkdir(parents=True)
    write_json(folder / "results.json", {"accuracy": 0.5, "trainable_params": 10, "total_params": 100,
                                         "seconds": 3.0, **results})
    return folder


def test_report_takes_method_and_adapter_size_from_results_or_the_adapter_folder(capsys, tmp_path):
    listed = _fake_run(tmp_path / "a", method="lora", adapter_bytes=1234)
    measured = _fake_run(tmp_path / "b", train="norm")
    (measured / "adapter").mkdir()
    (measured / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 777)
    (measured / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["report", str(listed), str(measured), "--out", str(tmp_path / "r")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [(r["run"], r["method"], r["adapter_bytes"]) for r in rows] == [("a", "lora", "1234"), ("b", "norm", "777")]
    assert _png_size(tmp_path / "r.png")[0] < 2 * _png_size(tmp_path / "r.png")[1]  # no metrics: only the bars


def test_plot_curves_writes_a_png(tmp_path):
    from normonly.report import plot_curves

    records = [{"epoch": e, "train_loss": 2 / e, "test_loss": 2.1 / e, "train_accuracy": 0.1 * e,
                "test_accuracy": 0.09 * e} for e in (1, 2, 3)]
    assert _png_size(plot_curves(records, tmp_path / "c.png"))[0] > 0
    with pytest.raises(ValueError, match="at least one epoch"):
        plot_curves([], tmp_path / "none.png")


@pytest.mark.parametrize("damage, named", [
    (lambda run: (run / "results.json").write_text('{"accuracy": 0.5'), "results.json is not valid JSON"),
    (lambda run: (run / "results.json").unlink(), "results.json does not exist"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2\n'), "metrics.jsonl line 2"),
    (lambda run: (run / "metrics.jsonl").write_text('[1, 2]\n'), "metrics.jsonl line 1"),
])
def test_report_names_the_corrupt_or_missing_file(capsys, tmp_path, damage, named):
    run = _fake_run(tmp_path / "run")
    damage(run)
    line = _usage_error(capsys, "report", str(run), "--out", str(tmp_path / "r"))
    assert line.startswith("normonly report: error: argument RUN_DIR:") and named in line
    assert not (tmp_path / "r.md").exists()


# ---------------------------------------------------------------- errors, --help, lazy imports
@pytest.mark.parametrize("argv, command, argument, says", [
    (["info", "no/such/folder"], "info", "ADAPTER_DIR", "not an existing folder"),
    (["inspect", "resnet_does_not_exist"], "inspect", "MODEL", "is not a torchvision or timm model name"),
    (["inspect", "resnet18", "--kwargs", "{depth: 14}"], "inspect", "--kwargs", "not valid JSON"),
    (["inspect", "resnet18", "--kwargs", '{"depth": 14}'], "inspect", "--kwargs", "unexpected keyword argument"),
    (["inspect", "normonly.models:no_such_builder"], "inspect", "MODEL", "has no attribute 'no_such_builder'"),
    (["convert", "ADAPTER", "out", "--to", "onnx"], "convert", "--to", "invalid choice: 'onnx'"),
    (["convert", "ADAPTER", "out", "--to", "normonly"], "convert", "--to", "holds a normonly adapter"),
    (["merge", "recorded", "ADAPTER", "ADAPTER"], "merge", "OUT", "is ADAPTER_DIR itself"),
    (["merge", "resnet18", "ADAPTER", "out"], "merge", "ADAPTER_DIR", "does not fit this ResNet"),
    (["report", "no/such/run"], "report", "RUN_DIR", "does not exist"),
])
def test_bad_input_is_one_line_naming_the_argument_with_status_2(capsys, adapter, argv, command, argument, says):
    argv = [str(adapter) if a == "ADAPTER" else a for a in argv]
    line = _usage_error(capsys, *argv)
    assert line.startswith(f"normonly {command}: error: argument {argument}:") and says in line


def test_a_user_error_in_a_real_process_exits_2_without_traceback(tmp_path):
    result = _cli("info", str(tmp_path / "missing"), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("normonly info: error: argument ADAPTER_DIR:")


def test_help_of_each_command_exits_0_shows_defaults_and_starts_fast():
    seconds = {}
    for command in COMMANDS:
        start = time.perf_counter()
        result = _cli(command, "--help", timeout=60)
        seconds[command] = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: normonly {command}") and "(default:" in result.stdout
    print("normonly COMMAND --help seconds:", {k: round(v, 3) for k, v in seconds.items()})
    assert max(seconds.values()) < 10  # generous: the real target (< 2 s; ~0.05 s measured) belongs in benchmarks


def test_import_normonly_and_the_cli_do_not_import_torch():
    code = "import sys, normonly, normonly.cli; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') " \
           "if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_lazy_public_names_are_the_submodules_objects_and_keep_init_theory_registered():
    code = ("import normonly\n"
            "from normonly import *\n"
            "import normonly.freeze, normonly.models, normonly.integrations.trainer as t\n"
            "assert set(normonly.__all__) <= set(dir(normonly)) and {'theory', 'models'} <= set(dir(normonly))\n"
            "assert normonly.freeze_all_but_norm is normonly.freeze.freeze_all_but_norm is freeze_all_but_norm\n"
            "assert normonly.build_base is normonly.models.build_base and normonly.NormOnlyTrainer is t.NormOnlyTrainer\n"
            "assert normonly.theory.reconstruct and normonly.__version__\n"
            "normonly.NormOnlyConfig(init='theory')\n"
            "print('ok')")
    fresh = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert fresh.stdout.strip() == "ok", fresh.stderr
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        normonly.no_such_name  # noqa: B018
