"""The step benchmark: its methods train what they claim, and in --quick mode normonly beats full fine-tuning."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from step_work import step_work

import normonly

SCRIPT = ROOT / "scripts" / "bench_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bare(name: str) -> str:
    """A parameter's name in the base model, without peft's or NormOnlyModel's prefix."""
    return name.removeprefix("base_model.model.").removeprefix("base_model.")


def _trainable_names(model):
    return {_bare(n) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_methods_train_the_parameter_sets_they_name():
    bench = _bench()
    spec = bench.SPECS["bert-base"]
    names = {}
    for method in [m for m in bench.METHODS if m != "normonly-lean"]:  # lean changes the step, not the parameters
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
    assert names["normonly-plain"] == names["normonly"] == names["normonly-again"] == names["normonly-model"]
    assert len(names["full"]) == len(list(reference.parameters()))


def test_work_counter_counts_the_ops_flops_bytes_and_module_calls_of_a_step():
    layer, x = torch.nn.Linear(8, 4), torch.randn(3, 8)
    forward = step_work(lambda: layer(x))
    assert forward["flops"] == 2 * 3 * 8 * 4 and forward["modules"] == 1
    assert forward["bytes"] >= 4 * (3 * 8 + 4 * 8 + 4 + 3 * 4)  # input, weight, bias read; output written
    backward = step_work(lambda: layer(x).sum().backward())
    assert backward["flops"] == 2 * forward["flops"]  # forward and weight gradient; x needs none
    assert backward["ops"] > forward["ops"] and backward["bytes"] > forward["bytes"]
    x.requires_grad_(True)
    assert step_work(lambda: layer(x).sum().backward())["flops"] == 3 * forward["flops"]  # and the input gradient
    x.requires_grad_(False)
    layer.weight.requires_grad_(False)
    assert step_work(lambda: layer(x).sum().backward())["flops"] == forward["flops"]  # only the bias trains
    assert step_work(lambda: layer(x).sum().backward()) == step_work(lambda: layer(x).sum().backward())


def _work_per_method(name: str, methods: list[str]) -> tuple[dict, dict]:
    bench = _bench()
    spec = bench.SPECS[name]
    base = bench.build_model(name, quick=True)
    inputs, labels = bench.make_batch(spec, True, torch.device("cpu"))
    work, trained = {}, {}
    for method in methods:
        model, opt = bench.prepare(method, copy.deepcopy(base), spec)
        step = bench.make_step(method, model, opt, inputs, labels)
        step()  # optimizer state exists from here on
        work[method] = step_work(step)
        trained[method] = {_bare(n): p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return work, trained


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
@pytest.mark.parametrize(
    "name, linear_biases", [("resnet18", False), ("cifar-resnet14", False), ("bert-base", True), ("vit-base", True)]
)
def test_normonly_step_does_no_more_work_than_peft_ln_or_bitfit(name, linear_biases):
    methods = ["full", "normonly", "normonly-model", "peft-ln", "bitfit"]
    work, trained = _work_per_method(name, methods)
    norm, full, peft_ln, bitfit = (work[m] for m in ("normonly", "full", "peft-ln", "bitfit"))
    assert norm["flops"] < 0.7 * full["flops"] and norm["ops"] < full["ops"] and norm["bytes"] < full["bytes"]
    # same kernels as peft LN tuning on the same γ/β, without its wrapper module around every norm layer
    assert {k: norm[k] for k in ("ops", "flops", "bytes")} == {k: peft_ln[k] for k in ("ops", "flops", "bytes")}
    assert norm["modules"] < peft_ln["modules"]
    # the PEFT-style NormOnlyModel adds one module call (itself) and nothing else: no hooks, no copies
    assert work["normonly-model"] == {**norm, "modules": norm["modules"] + 1}
    # BitFit backpropagates just as deep; beyond that, normonly only pays for the γ tensors BitFit leaves frozen
    # (per element: its gradient, and the parameter, gradient and two moments the fused AdamW reads, 4 bytes each;
    # per tensor: one AccumulateGrad detach and its AdamW step counter)
    assert norm["flops"] == bitfit["flops"]
    extra = {n: k for n, k in trained["normonly"].items() if n not in trained["bitfit"]}
    assert norm["bytes"] - bitfit["bytes"] <= 20 * sum(extra.values()) + 8 * len(extra)
    assert norm["ops"] - bitfit["ops"] <= len(extra)
    if linear_biases:  # a transformer: BitFit also reduces the output gradient of every Linear into its bias
        assert norm["bytes"] < bitfit["bytes"] and norm["ops"] < bitfit["ops"]


def test_make_step_changes_only_trainable_parameters():
    bench = _bench()
    spec = bench.SPECS["resnet18"]
    model, opt = bench.prepare("normonly", bench.build_model("resnet18", quick=True), spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs, labels = bench.make_batch(spec, True, torch.device("cpu"))
    bench.make_step("normonly", model, opt, inputs, labels)()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(normonly.norm_parameter_names(model))


def test_tables_show_the_spread_of_per_round_ratios_the_work_and_normonly_against_each_method():
    bench = _bench()
    lo, hi = bench._quartiles([0.9, 0.6, 0.7, 0.5, 0.8])
    assert 0.5 < lo < 0.7 < hi < 0.9
    assert bench._quartiles([0.62]) == [0.62, 0.62]
    work = {"ops": 200, "flops": 3e9, "bytes": 2**20, "modules": 50}
    norm = {"round_seconds": [0.3, 0.4, 0.2], "work": work}
    other = {"round_seconds": [0.3, 0.5, 0.4], "work": {**work, "ops": 250, "modules": 60}}
    versus = bench.normonly_over(norm, other)
    assert versus["time"] == 0.8 and versus["time_quartiles"] == [0.5, 1.0]  # per-round ratios 1.0, 0.8, 0.5
    assert (versus["ops"], versus["modules"], versus["flops"]) == (0.8, 50 / 60, 1.0)
    row = {"model": "m", "input": "i", "method": "normonly", "trainable_params": 10, "step_seconds": 0.3,
           "time_ratio": 0.7, "time_ratio_quartiles": [lo, hi], "cpu_time_ratio": 0.69, "work": work,
           "work_ratio": {"ops": 0.9, "flops": 0.66, "bytes": 0.5, "modules": 1.0}}  # fmt: skip
    meta = {"device": "cpu", "threads": 1, "torch": "x", "channels_last": False, "repeats": 5,
            "load_before": [1.0], "load_after": [1.0], "optimizer": "AdamW"}  # fmt: skip
    table = bench.markdown([row, {**row, "method": "bitfit", "normonly_over": versus}], {}, meta)
    assert f"| 0.700 ({lo:.2f}–{hi:.2f}) |" in table
    assert "| m | normonly | 50 | 200 | 3.00 | 1.0 | 0.900 | 0.660 | 0.5000 |" in table
    assert "| m | bitfit | 0.800 (0.500–1.000) | 0.833 | 0.800 | 1.000 | 1.00000 |" in table


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
    table = out.with_suffix(".md").read_text()
    for model in ("resnet18", "bert-base"):  # a row in the time/memory table and one in the work table
        assert f"| {model} ({rows[model, 'normonly']['input']}) | normonly |" in table
        assert f"| {model} | normonly |" in table
