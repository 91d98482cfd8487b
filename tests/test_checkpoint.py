import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

import normonly
from normonly.checkpoint import load_checkpoint, optimizer_groups, save_checkpoint, save_trainable, write_json


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_save_trainable_writes_only_trainable_tensors_and_optionally_batchnorm_stats(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    normonly.freeze_all_but_norm(model)
    model[1].running_mean.fill_(0.5)

    save_trainable(model, tmp_path / "a.safetensors")
    assert set(load_file(tmp_path / "a.safetensors")) == {"1.weight", "1.bias"}

    size = save_trainable(model, tmp_path / "b.safetensors", batchnorm_stats=True)
    saved = load_file(tmp_path / "b.safetensors")
    assert set(saved) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    torch.testing.assert_close(saved["1.running_mean"], torch.full((4,), 0.5))
    assert size == (tmp_path / "b.safetensors").stat().st_size


def test_save_trainable_of_a_frozen_model_raises_and_writes_nothing(tmp_path):
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        save_trainable(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_write_json_replaces_whole_file_and_a_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"accuracy": 0.5})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_optimizer_groups_decay_only_matrices_and_kernels():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[0].bias.requires_grad_(False)
    decay, no_decay = optimizer_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(3, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2  # LayerNorm γ, β; the frozen bias is out


def test_checkpoint_round_trip_restores_model_optimizer_and_progress(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = small_cnn()
    model(torch.zeros(1, 3, 5, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.randn(4, 3, 5, 5)

    def step():
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    assert load_checkpoint(accelerator, tmp_path / "ckpt") is None
    save_checkpoint(accelerator, tmp_path / "ckpt", {"step": 1})
    assert not (tmp_path / "ckpt.tmp").exists()
    step()
    after_two = {k: v.clone() for k, v in model.state_dict().items()}

    step()  # move away, then restore and redo the second step
    assert load_checkpoint(accelerator, tmp_path / "ckpt") == {"step": 1}
    step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after_two[k])
