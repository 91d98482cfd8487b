"""recipes/resnet_cifar.py end to end on cifar10-mini: flags, errors, outputs, resume after a kill, 2 processes."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT
from safetensors.torch import load_file

import normonly

RECIPE = ROOT / "recipes" / "resnet_cifar.py"
TINY = ["--depth", "8", "--log-every", "1"]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe():
    return _load(RECIPE)


@pytest.fixture
def recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMONLY_CACHE", str(tmp_path / "cache"))
    yield _recipe()
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def mini(shared_data):
    path = shared_data / "cifar10-mini"
    if not path.is_dir():
        pytest.skip(f"{path} is missing")
    return str(path)


def _env(tmp_path, **extra):
    return os.environ | {
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NORMONLY_CACHE": str(tmp_path / "cache"), **extra
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--depth", "15"], "6n\\+2"),
        (["--train", "bn"], "invalid choice"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--max-steps", "-3"], "--max-steps"),
        (["--milestones", "0.8", "0.5"], "increasing fractions"),
        (["--lr", "0"], "--lr > 0"),
        (["--schedule", "linear"], "invalid choice"),
    ],
)
def test_bad_flags_are_usage_errors(recipe, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe.parse_args(flags)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_data_folder_stops_before_training_and_writes_nothing(recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="does not exist.*--data"):
        recipe.main([*TINY, "--data", str(tmp_path / "absent"), "--output", str(out)])
    assert not out.exists()


def test_malformed_data_folder_stops_before_training_and_writes_nothing(recipe, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a dataset")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="needs 'train' and 'test'"):
        recipe.main([*TINY, "--data", str(tmp_path / "junk"), "--output", str(out)])
    assert not out.exists()


def test_sync_bn_on_cpu_is_refused(recipe, tmp_path, mini):
    with pytest.raises(SystemExit, match="--sync-bn needs GPUs"):
        recipe.main([*TINY, "--sync-bn", "--data", mini, "--output", str(tmp_path / "run")])


@pytest.mark.parametrize("mode, trainable", [("norm", 672), ("norm+output", 672 + 650), ("output", 650), ("random", 672)])
def test_modes_train_the_right_parameter_counts(recipe, tmp_path, mini, mode, trainable):
    results = recipe.main([*TINY, "--train", mode, "--max-steps", "2", "--data", mini, "--output", str(tmp_path / mode)])
    assert results["trainable_params"] == trainable and results["total_params"] == 78_042


def test_short_run_writes_results_metrics_checkpoint_and_refuses_to_clobber(recipe, tmp_path, mini):
    out = tmp_path / "run"
    argv = [*TINY, "--max-steps", "20", "--schedule", "cosine", "--data", mini, "--output", str(out)]
    recipe.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["accuracy"] <= 1 and results["accuracy"] > 0.12  # better than chance after 20 steps
    assert results["trainable_params"] == 672 and results["total_params"] == 78_042
    assert results["seconds"] > 0 and results["images_per_second"] > 0 and results["steps"] == 20
    flags = vars(recipe.parse_args(argv))
    assert {k: results[k] for k in flags if k != "data"} == {k: v for k, v in flags.items() if k != "data"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["test_accuracy"] == results["accuracy"]
    assert metrics[-1]["lr"] < 1e-3  # cosine reached ~0 at step 20
    assert [p.name for p in recipe.checkpoints(out)] == ["epoch_0002"]
    assert (out / "model.safetensors").is_file()

    with pytest.raises(SystemExit, match="already holds a run"):
        recipe.main(argv)
    with pytest.raises(SystemExit, match="differ.*lr"):
        recipe.main([*argv, "--resume", "--lr", "0.2"])

    analyze = _load(ROOT / "scripts" / "analyze_gamma.py").main  # the γ analysis runs on a recipe folder
    report = analyze([str(out), "--out", str(tmp_path / "gamma"), "--images", "100"])
    assert set(report["runs"]) == {"run (norm)", "init"}
    assert (tmp_path / "gamma.png").is_file() and (tmp_path / "gamma.json").is_file()


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_the_parameters_of_an_uninterrupted_run(tmp_path, mini):
    args = [sys.executable, str(RECIPE), *TINY, "--epochs", "4", "--data", mini]
    env = _env(tmp_path)
    subprocess.run([*args, "--output", str(tmp_path / "full")], env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "epoch_0001").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    assert not (out / "checkpoints" / "epoch_0004").exists()

    resumed = subprocess.run(
        [*args, "--output", str(out), "--resume"], env=env, check=True, capture_output=True, text=True
    )
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one_and_saves_the_same_names(recipe, tmp_path, mini):
    argv = [*TINY, "--max-steps", "10", "--data", mini]
    eager = recipe.main([*argv, "--output", str(tmp_path / "eager")])
    AcceleratorState._reset_state(reset_partial_state=True)  # else the second Accelerator keeps the first's settings
    torch._dynamo.utils.counters.clear()
    compiled = recipe.main([*argv, "--compile", "--output", str(tmp_path / "compiled")])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really ran through torch.compile
    a, b = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys()  # loadable into a plain cifar_resnet(8), like the eager run's file
    torch.manual_seed(0)
    init = recipe.cifar_resnet(8).state_dict()
    gamma_beta = normonly.norm_parameter_names(recipe.cifar_resnet(8))
    trained = max((a[k] - init[k]).abs().max() for k in gamma_beta)
    apart = max((a[k] - b[k]).abs().max() for k in gamma_beta)  # inductor's kernels round differently
    assert apart < 1e-3 and apart < trained / 10, (apart, trained)
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=0.01)


@pytest.mark.slow
def test_two_cpu_processes_train_in_lockstep(tmp_path, mini):
    out = tmp_path / "ddp"
    cmd = [
        str(ROOT / ".venv" / "bin" / "accelerate") if (ROOT / ".venv" / "bin" / "accelerate").exists()
        else os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
        str(ROOT / "tests" / "helpers" / "resnet_cifar_rank_dump.py"),
        *TINY, "--max-steps", "6", "--data", mini, "--output", str(out),
    ]
    subprocess.run(cmd, env=_env(tmp_path, ACCELERATE_USE_CPU="1"), check=True, capture_output=True, timeout=300)
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    torch.manual_seed(0)
    init = _recipe().cifar_resnet(8).state_dict()
    gamma_beta = normonly.norm_parameter_names(_recipe().cifar_resnet(8))
    assert len(gamma_beta) == 18 and set(r0) == set(r1) == set(gamma_beta)  # γ, β of ResNet-8's 9 BatchNorms
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(not torch.equal(r0[k], init[k]) for k in gamma_beta)  # they trained, identically


def test_accelerate_configs_are_valid_and_fsdp_keeps_original_parameters():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert set(configs) == {"cpu", "cpu_2proc", "multi_gpu", "fsdp"}
    assert configs["cpu"].use_cpu and configs["cpu"].num_processes == 1
    assert configs["cpu_2proc"].num_processes == 2
    assert configs["fsdp"].fsdp_config["fsdp_use_orig_params"] is True
