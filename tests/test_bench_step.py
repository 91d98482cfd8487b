"""The step benchmark: its methods train what they claim, and in --quick mode normonly beats full fine-tuning."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import normonly

SCRIPT = ROOT / "scripts" / "bench_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _trainable_names(model):
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_methods_train_the_parameter_sets_they_name():
    bench = _bench()
    spec = bench.SPECS["bert-base"]
    names = {}
    for method in ["full", "normonly", "peft-ln", "bitfit", "lora", "normonly-plain", "normonly-again"]:
        model, opt = bench.prepare(method, bench.build_model("bert-base", quick=True), spec)
        names[method] = _trainable_names(model)
        handed = sum(len(g["params"]) for g in opt.param_groups)
        everything = len(list(model.parameters()))
        assert handed == (everything if method == "normonly-plain" else sum(p.requires_grad for p in model.parameters()))
    reference = normonly.freeze_all_but_norm(bench.build_model("bert-base", quick=True))
    assert names["normonly"] == set(normonly.norm_parameter_names(reference))
    assert {n.replace(".ln_tuning_layers.default", "") for n in names["peft-ln"]} == names["normonly"]
    assert names["bitfit"] and all(n.endswith(".bias") for n in names["bitfit"])
    assert names["lora"] and all("lora_" in n for n in names["lora"])
    assert names["normonly-plain"] == names["normonly"] == names["normonly-again"]
    assert len(names["full"]) == len(list(reference.parameters()))


def test_make_step_changes_only_trainable_parameters():
    bench = _bench()
    spec = bench.SPECS["resnet18"]
    model, opt = bench.prepare("normonly", bench.build_model("resnet18", quick=True), spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs, labels = bench.make_batch(spec, True, torch.device("cpu"))
    bench.make_step("normonly", model, opt, inputs, labels)()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(normonly.norm_parameter_names(model))


def test_table_shows_the_spread_of_per_round_ratios():
    bench = _bench()
    lo, hi = bench._quartiles([0.9, 0.6, 0.7, 0.5, 0.8])
    assert 0.5 < lo < 0.7 < hi < 0.9
    assert bench._quartiles([0.62]) == [0.62, 0.62]
    row = {"model": "m", "input": "i", "method": "normonly", "trainable_params": 10, "step_seconds": 0.3,
           "time_ratio": 0.7, "time_ratio_quartiles": [lo, hi], "cpu_time_ratio": 0.69}  # fmt: skip
    meta = {"device": "cpu", "threads": 1, "torch": "x", "channels_last": False, "repeats": 5,
            "load_before": [1.0], "load_after": [1.0], "optimizer": "AdamW"}  # fmt: skip
    assert f"| 0.700 ({lo:.2f}–{hi:.2f}) |" in bench.markdown([row], {}, meta)


def test_help_explains_flags_and_bad_names_fail_clearly():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--quick" in out.stdout and "--methods" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet9000"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "resnet9000" in bad.stderr


@pytest.mark.slow
def test_quick_benchmark_normonly_is_faster_and_leaner_than_full_fine_tuning(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "resnet18,bert-base", "--methods", "normonly",
           "--repeats", "5", "--output", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=600)
    rows = {(r["model"], r["method"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(m, k) for m in ("resnet18", "bert-base") for k in ("full", "normonly")}
    for model in ("resnet18", "bert-base"):
        norm = rows[model, "normonly"]
        assert norm["time_ratio"] < 1.0, f"{model}: normonly step is {norm['time_ratio']:.2f} x full fine-tuning"
        assert norm["peak_ratio"] < 1.0, f"{model}: normonly peak memory is {norm['peak_ratio']:.2f} x full"
    assert out.with_suffix(".md").read_text().count("| normonly |") == 2
