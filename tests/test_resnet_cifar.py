"""recipes/resnet_cifar.py end to end on cifar10-mini: flags, errors, outputs, resume after a kill, 2 processes."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT
from run_helpers import assert_same_tensors, free_port, kill_after_checkpoint, plant_pickles, replace_with_pickle
from safetensors.torch import load_file

import normonly
import normonly.models
from normonly.checkpoint import list_checkpoints

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
        (["--lr", "nan"], "finite"),
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
    assert {k: results[k] for k in flags if k not in ("data", "output", "resume", "overwrite")} == {
        k: v for k, v in flags.items() if k not in ("data", "output", "resume", "overwrite")}
    assert results["output"] == "."  # paths are relative to the run folder
    assert not os.path.isabs(results["data"]) and (out / results["data"]).resolve() == Path(mini).resolve()
    assert results["torch_threads"] == torch.get_num_threads() and len(results["data_fingerprint"]) == 16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["test_accuracy"] == results["accuracy"]
    assert metrics[-1]["lr"] < 1e-3  # cosine reached ~0 at step 20
    assert [p.name for p in list_checkpoints(out)] == ["step_000000015", "step_000000020"]
    assert (out / "model.safetensors").is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(SystemExit, match="already holds a finished run.*--resume.*--overwrite"):
        recipe.main(argv)
    with pytest.raises(SystemExit, match=r"holds a run with other flags: --lr 0\.1 \(now 0\.2\)"):
        recipe.main([*argv, "--resume", "--lr", "0.2"])
    assert recipe.main([*argv, "--resume"])["accuracy"] == results["accuracy"]  # finished: nothing is redone

    analyze = _load(ROOT / "scripts" / "analyze_gamma.py").main  # the γ analysis runs on a recipe folder
    report = analyze([str(out), "--out", str(tmp_path / "gamma"), "--images", "100"])
    assert set(report["runs"]) == {"run (norm)", "init"}
    assert (tmp_path / "gamma.png").is_file() and (tmp_path / "gamma.json").is_file()


def test_a_run_folder_belongs_to_its_data_and_overwrite_starts_over(recipe, tmp_path, mini, shared_data):
    out = tmp_path / "run"
    argv = [*TINY, "--max-steps", "3", "--output", str(out)]
    first = recipe.main([*argv, "--data", mini])
    other_data = tmp_path / "other"  # the same images, one label changed: other data under the same name
    shutil.copytree(mini, other_data)
    table = pq.read_table(other_data / "plain_text" / "test-00000-of-00001.parquet")
    labels = table.column("label").to_pylist()
    labels[0] = (labels[0] + 1) % 10
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, table.schema.field("label").type))
    pq.write_table(table, other_data / "plain_text" / "test-00000-of-00001.parquet")
    with pytest.raises(SystemExit, match="other flags: data_fingerprint .*other data under that path"):
        recipe.main([*argv, "--resume", "--data", str(other_data)])
    assert json.loads((out / "results.json").read_text()) == first  # the finished run was not touched

    moved = tmp_path / "moved-mini"  # the same data in another folder is the same run
    shutil.copytree(mini, moved)
    assert recipe.main([*argv, "--resume", "--data", str(moved)])["accuracy"] == first["accuracy"]

    again = recipe.main([*argv, "--overwrite", "--data", str(other_data), "--lr", "0.05"])
    assert again["lr"] == 0.05 and json.loads((out / "config.json").read_text())["lr"] == 0.05
    assert [p.name for p in list_checkpoints(out)] == ["step_000000003"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_corrupt_config_json_is_a_one_line_error(recipe, tmp_path, mini, content, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--max-steps", "2", "--data", mini, "--output", str(out)]
    recipe.main(argv)
    (out / "config.json").write_text(content)
    with pytest.raises(SystemExit) as err:
        recipe.main([*argv, "--resume"])
    message = str(err.value.code)
    assert message.startswith("error: ") and "config.json" in message and "--overwrite" in message
    assert "\n" not in message


def test_nan_or_inf_flags_are_refused_and_a_diverging_loss_stops_at_its_first_step(recipe, tmp_path, mini, capsys):
    for value in ("nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            recipe.parse_args(["--lr", value])
        assert exit_.value.code == 2 and "finite" in capsys.readouterr().err
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"error: the loss is nan at step \d+: training diverged"):
        recipe.main([*TINY, "--max-steps", "40", "--lr", "1e30", "--data", mini, "--output", str(out)])
    assert not (out / "results.json").exists() and not list_checkpoints(out)


def test_resume_reads_no_pickle_even_where_accelerate_would(recipe, tmp_path, mini):
    out = tmp_path / "run"
    argv = [*TINY, "--max-steps", "20", "--data", mini, "--output", str(out)]
    with pytest.raises(SystemExit):  # stopped by a signal at step 17, mid-epoch
        with _signal_at_step(recipe, 17):
            recipe.main(argv)
    marker = tmp_path / "pwned"
    for folder in [out, *list_checkpoints(out)]:
        plant_pickles(folder, marker)
    recipe.main([*argv, "--resume"])
    assert not marker.exists() and (out / "results.json").exists()

    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        with _signal_at_step(recipe, 17):
            recipe.main([*TINY, "--max-steps", "20", "--data", mini, "--output", str(stopped)])
    latest = list_checkpoints(stopped)[-1]
    shutil.copytree(latest, tmp_path / "pristine")
    for name in ("model.safetensors", "state.safetensors", "state.json", "rng_0.json", "rng_0.safetensors",
                 "manifest.json"):
        shutil.rmtree(latest)
        shutil.copytree(tmp_path / "pristine", latest)
        replace_with_pickle(latest / name, marker)
        with pytest.raises(SystemExit, match=f"error: .*{name}.*step_000000015 is kept"):
            recipe.main([*TINY, "--max-steps", "20", "--data", mini, "--output", str(stopped), "--resume"])
        assert not marker.exists()


class _signal_at_step:
    """Send this process SIGTERM once the recipe's scheduler has taken ``step`` steps (as a user's kill would)."""

    def __init__(self, recipe, step: int):
        self.recipe, self.step, self.original = recipe, step, None

    def __enter__(self):
        import torch.optim.lr_scheduler as sched

        self.original = original = sched.LambdaLR.step
        target = self.step

        def step(scheduler, *args, **kwargs):
            original(scheduler, *args, **kwargs)
            if scheduler.last_epoch == target:
                os.kill(os.getpid(), signal.SIGTERM)

        sched.LambdaLR.step = step
        return self

    def __exit__(self, *exc):
        import torch.optim.lr_scheduler as sched

        sched.LambdaLR.step = self.original


def test_sigterm_saves_the_current_step_and_resume_ends_bit_identical(recipe, tmp_path, mini, capsys):
    argv = [*TINY, "--epochs", "2", "--data", mini]
    recipe.main([*argv, "--output", str(tmp_path / "straight")])
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exit_:
        with _signal_at_step(recipe, 22):  # mid-epoch 2 (15 steps an epoch)
            recipe.main([*argv, "--output", str(out)])
    assert exit_.value.code == 128 + signal.SIGTERM
    printed = capsys.readouterr()
    assert "stopped by signal at step 22" in printed.out + printed.err and "--resume" in printed.out + printed.err
    assert [p.name for p in list_checkpoints(out)] == ["step_000000015", "step_000000022"]
    (out / "metrics.jsonl").write_text('{"epoch": 1, "test_acc')  # truncated by a crash: the checkpoint rewrites it
    recipe.main([*argv, "--output", str(out), "--resume"])
    assert_same_tensors(tmp_path / "straight" / "model.safetensors", out / "model.safetensors")
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if "second" not in k}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(out / "metrics.jsonl") == strip(tmp_path / "straight" / "metrics.jsonl")


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_the_parameters_of_an_uninterrupted_run(tmp_path, mini):
    args = [sys.executable, str(RECIPE), *TINY, "--epochs", "4", "--data", mini]
    env = _env(tmp_path)
    subprocess.run([*args, "--output", str(tmp_path / "full")], env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    step = kill_after_checkpoint([*args, "--output", str(out)], out, env)
    assert step < 60
    resumed = subprocess.run(
        [*args, "--output", str(out), "--resume"], env=env, check=True, capture_output=True, text=True
    )
    assert f"resumed {out} at step {step}" in resumed.stdout + resumed.stderr
    assert_same_tensors(tmp_path / "full" / "model.safetensors", out / "model.safetensors")
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_the_random_base_is_rebuilt_bit_for_bit_from_its_seed(recipe, tmp_path, mini):
    _, model = recipe.training_function(recipe.parse_args(
        [*TINY, "--max-steps", "2", "--train", "random", "--data", mini, "--output", str(tmp_path / "run")]))
    rebuilt = normonly.models.cifar_resnet(8, 1, seed=0)
    recipe.set_trainable(rebuilt, "random", 0)
    trained, fresh = model.state_dict(), rebuilt.state_dict()
    frozen = [k for k, v in trained.items() if "frozen" in k or k.endswith("conv.weight")]
    assert frozen and all(torch.equal(trained[k], fresh[k]) for k in frozen)


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
    init = normonly.models.cifar_resnet(8, seed=0).state_dict()
    gamma_beta = normonly.norm_parameter_names(normonly.models.cifar_resnet(8))
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
        "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", free_port(),
        str(ROOT / "tests" / "helpers" / "resnet_cifar_rank_dump.py"),
        *TINY, "--max-steps", "6", "--data", mini, "--output", str(out),
    ]
    subprocess.run(cmd, env=_env(tmp_path, ACCELERATE_USE_CPU="1"), check=True, capture_output=True, timeout=300)
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    init = normonly.models.cifar_resnet(8, seed=0).state_dict()
    gamma_beta = normonly.norm_parameter_names(normonly.models.cifar_resnet(8))
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


@pytest.mark.parametrize("mode", ["norm", "norm+output"])
def test_a_norm_run_leaves_an_adapter_that_reloads_bit_for_bit_and_converts_to_peft(recipe, tmp_path, mini, mode):
    import peft

    results, model = recipe.training_function(recipe.parse_args(
        [*TINY, "--max-steps", "3", "--train", mode, "--data", mini, "--output", str(tmp_path / "run")]))
    adapter = tmp_path / "run" / results["adapter"]
    assert results["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)

    def base():  # rebuilt from the recorded seed; the recipe ran in channels_last, whose kernels round differently
        return normonly.build_base(adapter).to(memory_format=torch.channels_last)

    loaded = normonly.NormOnlyModel.from_pretrained(base(), adapter)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    normonly.to_peft_adapter(adapter, tmp_path / "peft", base())
    through_peft = peft.PeftModel.from_pretrained(base(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.equal(through_peft(x), expected)


@pytest.mark.slow
def test_two_machines_on_loopback_train_exactly_like_two_processes_on_one_machine(tmp_path, mini):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    recipe_args = [str(RECIPE), *TINY, "--max-steps", "6", "--data", mini, "--report-to", "none"]
    env = _env(tmp_path, ACCELERATE_USE_CPU="1")
    port = free_port()
    machines = [  # what `accelerate launch` runs on each of two machines, here both on this host
        subprocess.Popen([accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                          "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                          "--mixed_precision", "no", "--dynamo_backend", "no", *recipe_args,
                          "--output", str(tmp_path / "two-machines")],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for proc in machines:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    one = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
                          "--main_process_port", free_port(),
                          *recipe_args, "--output", str(tmp_path / "one-machine")], env=env, capture_output=True)
    assert one.returncode == 0, one.stderr[-3000:]
    results = json.loads((tmp_path / "two-machines" / "results.json").read_text())
    assert results["num_processes"] == 2
    assert_same_tensors(tmp_path / "two-machines" / "model.safetensors", tmp_path / "one-machine" / "model.safetensors")
