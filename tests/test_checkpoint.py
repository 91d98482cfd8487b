import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from run_helpers import replace_with_pickle
from safetensors.torch import load_file
from torch import nn

import normonly
from normonly import checkpoint
from normonly.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_trainable,
    optimizer_groups,
    save_checkpoint,
    save_trainable,
    write_json,
)
from normonly.safe_io import flatten_state, unflatten_state


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    return normonly.freeze_all_but_norm(model, extra_trainable=["4"])


class Run:
    """A model, an optimizer with state, a scheduler and a private generator: what a recipe checkpoints."""

    def __init__(self):
        self.model = small_cnn()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 0.9**s)
        self.gen = torch.Generator().manual_seed(5)

    def step(self):
        x = torch.randn(4, 3, 5, 5, generator=self.gen) + torch.rand(())  # private and global random draws
        nn.functional.dropout(self.model(x), 0.5).square().mean().backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def save(self, folder, step, **kw):
        return save_checkpoint(folder, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               progress={"loss": float("nan"), "seen": (1, 2)}, generators={"g": self.gen}, **kw)

    def load(self, folder):
        return load_checkpoint(folder, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               generators={"g": self.gen})

    def state(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_from_a_checkpoint_replays_the_same_steps_bit_for_bit(tmp_path):
    run = Run()
    run.step()
    run.save(tmp_path, 1)
    random.random(), np.random.rand()
    python_next, numpy_next = random.random(), np.random.rand()
    run.step()
    run.step()
    after_three = run.state()

    other = Run()  # a fresh process: new model, optimizer, scheduler, generators
    progress = other.load(tmp_path)
    assert progress["step"] == 1 and progress["seen"] == (1, 2) and math.isnan(progress["loss"])
    random.random(), np.random.rand()
    assert (random.random(), np.random.rand()) == (python_next, numpy_next)  # python and numpy generators restored
    other.step()
    other.step()
    assert_same_state(other.state(), after_three)
    assert other.scheduler.last_epoch == run.scheduler.last_epoch == 3


def test_a_checkpoint_holds_only_trainable_parameters_buffers_and_json_no_pickle(tmp_path):
    run = Run()
    run.step()
    folder = run.save(tmp_path, 7)
    assert folder.name == "step_000000007" and list_checkpoints(tmp_path) == [folder]
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "model.safetensors", "rng_0.json", "rng_0.safetensors", "state.json", "state.safetensors"]
    saved = load_file(folder / "model.safetensors")
    assert set(saved) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
                          "4.weight", "4.bias"}  # the frozen conv is rebuilt, not saved
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["sha256"]) == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")


def test_older_checkpoints_are_deleted_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    run = Run()
    run.save(tmp_path, 1, keep=1)
    run.step()
    expected = run.state()

    def killed(*args, **kwargs):  # the process dies while deleting the old checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path, 2, keep=1)
    monkeypatch.undo()
    other = Run()
    assert other.load(tmp_path)["step"] == 2  # the new one was complete: it is resumed from
    assert_same_state(other.state(), expected)

    monkeypatch.setattr(checkpoint.os, "replace", killed)  # dies before the rename: the old one is still there
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path, 3, keep=1)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step_000000002"
    assert (tmp_path / "checkpoints" / ".step_000000003.tmp").is_dir()
    run.save(tmp_path, 4, keep=1)  # the next save removes the leftover temporary folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000004"]


def test_a_save_killed_while_replacing_a_checkpoint_of_the_same_step_keeps_the_old_one(tmp_path, monkeypatch):
    run = Run()
    run.save(tmp_path, 5, keep=1)
    expected = run.state()
    real_replace, calls = checkpoint.os.replace, []

    def killed_on_second_rename(src, dst):  # the old one was moved aside, then the process died
        if os.path.basename(dst).startswith(("step_", ".step_")):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_on_second_rename)
    run.step()
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path, 5, keep=1)
    monkeypatch.undo()
    assert not list_checkpoints(tmp_path)  # only the moved-aside copy is left ...
    other = Run()
    assert other.load(tmp_path)["step"] == 5  # ... and resuming puts it back
    assert_same_state(other.state(), expected)


def test_keep_two_keeps_the_previous_checkpoint_and_a_corrupt_newest_one_names_it(tmp_path):
    run = Run()
    run.save(tmp_path, 1)
    run.step()
    newest = run.save(tmp_path, 2)
    run.save(tmp_path, 3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000002", "step_000000003"]
    model_file = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the tensor data
    model_file.write_bytes(bytes(data))
    other = Run()
    before = other.state()
    with pytest.raises(CheckpointError, match=r"model\.safetensors failed its sha256 check.*step_000000002 is kept"):
        other.load(tmp_path)
    assert_same_state(other.state(), before)  # nothing was changed
    shutil.rmtree(model_file.parent)
    assert other.load(tmp_path)["step"] == 2 and newest.exists()


@pytest.mark.parametrize("name", ["manifest.json", "state.json", "state.safetensors", "rng_0.json",
                                  "rng_0.safetensors", "model.safetensors"])
def test_a_hostile_pickle_in_place_of_any_checkpoint_file_is_refused_without_running(tmp_path, name):
    run = Run()
    run.save(tmp_path, 1)
    marker = tmp_path / "pwned"
    replace_with_pickle(list_checkpoints(tmp_path)[-1] / name, marker)
    with pytest.raises(CheckpointError) as err:
        Run().load(tmp_path)
    assert not marker.exists()
    assert name in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    run = Run()
    run.save(tmp_path, 1)
    other = Run()
    other.model[4].requires_grad_(False)  # e.g. --method norm resumed from a norm+head run
    with pytest.raises(CheckpointError, match="does not fit this run's model.*'4.bias'"):
        other.load(tmp_path)


def test_only_a_leftover_temporary_folder_is_reported_and_the_run_starts_over(tmp_path, capsys):
    (tmp_path / "checkpoints" / ".step_000000005.tmp").mkdir(parents=True)
    assert Run().load(tmp_path) is None
    assert "only .step_000000005.tmp from a save that was interrupted" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints" / ".step_000000005.tmp").exists()
    assert Run().load(tmp_path / "nothing") is None


def test_nested_state_round_trips_without_pickle_and_refuses_objects():
    state = {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}}, "lr": [0.1, float("inf")],
             "betas": (0.9, 0.999), "__weird": None, "flag": True}
    tree, tensors = flatten_state(state)
    json.dumps(tree)  # JSON-ready
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["betas"] == (0.9, 0.999) and back["lr"] == [0.1, float("inf")] and back["__weird"] is None
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(3)) and list(back["state"]) == [0]
    with pytest.raises(TypeError, match="'.fn' is a function"):
        flatten_state({"fn": lambda: 0})


def test_save_trainable_writes_only_trainable_tensors_and_load_trainable_puts_them_back(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    normonly.freeze_all_but_norm(model)
    model[1].running_mean.fill_(0.5)
    save_trainable(model, tmp_path / "a.safetensors")
    assert set(load_file(tmp_path / "a.safetensors")) == {"1.weight", "1.bias"}
    size = save_trainable(model, tmp_path / "b.safetensors", batchnorm_stats=True)
    assert size == (tmp_path / "b.safetensors").stat().st_size

    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_trainable(fresh, tmp_path / "b.safetensors")
    torch.testing.assert_close(fresh[1].running_mean, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="'1.(weight|bias)' has shape"):
        load_trainable(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)), tmp_path / "b.safetensors")


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


def test_unwrap_model_strips_data_parallel_and_compile_wrappers():
    model = nn.Linear(2, 2)
    assert checkpoint.unwrap_model(torch.compile(nn.DataParallel(model))) is model
