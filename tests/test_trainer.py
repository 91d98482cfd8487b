import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import safetensors.torch
import torch
import transformers
from adapter_helpers import tiny_bert, tiny_vit
from conftest import ROOT
from run_helpers import free_port, plant_pickles, replace_with_pickle
from safetensors import safe_open

from normonly import NormOnlyConfig, NormOnlyModel, get_normonly_model
from normonly.config import CONFIG_NAME, WEIGHTS_NAME
from normonly.integrations.trainer import NormOnlyTrainer

HELPER = ROOT / "tests" / "helpers" / "trainer_ddp.py"
HEAD = NormOnlyConfig(modules_to_save=["classifier"])
CHECKPOINT_FILES = {
    CONFIG_NAME,
    WEIGHTS_NAME,
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
}


def dataset(n: int = 48, seed: int = 0) -> datasets.Dataset:
    """Token sequences whose label is the first token mod 3, plus a text column the model does not take."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (n, 8), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist(), "text": [f"example {i}" for i in range(n)]}
    )


def args(output_dir, **overrides) -> transformers.TrainingArguments:
    defaults = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=0.02,
        lr_scheduler_type="constant",
        max_steps=6,
        logging_steps=1,
        save_steps=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return transformers.TrainingArguments(str(output_dir), **{**defaults, **overrides})


def trainer(output_dir, model=None, train=None, **overrides) -> NormOnlyTrainer:
    model = model if model is not None else get_normonly_model(tiny_bert(), HEAD)
    data = train if train is not None else dataset()
    return NormOnlyTrainer(
        model=model, args=args(output_dir, **overrides), train_dataset=data, eval_dataset=dataset(16)
    )


def adapter_file(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def live_adapter(model: NormOnlyModel) -> dict[str, torch.Tensor]:
    """The active adapter's tensors as they are in the model now (the keys of its safetensors file)."""
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.base_model.state_dict().items() if k in trainable}


def train_losses(t: NormOnlyTrainer) -> list[float]:
    return [h["loss"] for h in t.state.log_history if "loss" in h]


# ---------------------------------------------------------------- training and checkpoints
def test_trainer_trains_the_adapter_only_and_checkpoints_hold_only_the_adapter(tmp_path):
    t = trainer(tmp_path, max_steps=12, save_steps=4)
    model = t.model
    assert t.label_names == ["labels"]  # read from BertForSequenceClassification.forward, not the wrapper's
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    trainable = set(live_adapter(model))
    loss_before = t.evaluate()["eval_loss"]
    t.train()  # the "text" column is dropped as with any transformers model, "input_ids" kept
    assert t.evaluate()["eval_loss"] < loss_before

    after = model.base_model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in trainable)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in trainable)

    full_size = sum(v.numel() * v.element_size() for v in before.values())
    for step in (4, 8, 12):
        folder = tmp_path / f"checkpoint-{step}"
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        assert set(adapter_file(folder)) == trainable
        assert (folder / WEIGHTS_NAME).stat().st_size < 0.05 * full_size
        assert (folder / "optimizer.pt").stat().st_size < 0.2 * full_size  # Adam moments of the adapter only
    final = adapter_file(tmp_path / "checkpoint-12")
    assert all(torch.equal(final[k], v) for k, v in live_adapter(model).items())

    t.save_model(tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, "training_args.bin"}
    loaded = NormOnlyModel.from_pretrained(tiny_bert(), tmp_path / "final")
    x = torch.tensor(dataset(4, seed=9)["input_ids"])
    model.eval()
    assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    scores = iter([0.2, 0.9, 0.5])  # evaluations at steps 2, 4, 6: step 4 is the best

    t = trainer(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    t.compute_metrics = lambda prediction: {"score": next(scores)}
    t.train()
    assert t.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    best, last = adapter_file(tmp_path / "checkpoint-4"), adapter_file(tmp_path / "checkpoint-6")
    live = live_adapter(t.model)
    assert live.keys() == best.keys()
    assert all(torch.equal(live[k], best[k]) for k in best)
    assert not all(torch.equal(last[k], best[k]) for k in best)  # the end of training was elsewhere
    assert any(p.requires_grad for p in t.model.parameters()) and t.model.base_model.classifier.weight.requires_grad


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_interrupted_run_resumes_from_its_last_checkpoint_to_the_same_result(tmp_path):
    reference = trainer(tmp_path / "reference")
    reference.train()

    interrupted = trainer(tmp_path / "run")
    interrupted.add_callback(StopAt(3))
    interrupted.train()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint-2"]

    resumed = trainer(tmp_path / "run")  # a fresh base model, as after a restart
    restored = {}
    original_load = resumed.model.load_adapter

    def spy(directory, *a, **kw):  # the adapter is back before the first resumed step runs
        original_load(directory, *a, **kw)
        restored.update(live_adapter(resumed.model))

    resumed.model.load_adapter = spy
    resumed.train(resume_from_checkpoint=True)
    saved = adapter_file(tmp_path / "run" / "checkpoint-2")
    assert restored.keys() == saved.keys() and all(torch.equal(restored[k], saved[k]) for k in saved)
    assert train_losses(resumed) == train_losses(reference)  # the first two come from checkpoint-2's trainer state
    final, expected = live_adapter(resumed.model), live_adapter(reference.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_never_unpickles_code_from_any_checkpoint_file(tmp_path):
    interrupted = trainer(tmp_path / "run")
    interrupted.add_callback(StopAt(3))
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoint, pristine)
    marker = tmp_path / "pwned"
    plant_pickles(checkpoint, marker, names=("training_args.bin", "pytorch_model.bin", "model.safetensors.bin"))
    trainer(tmp_path / "run").train(resume_from_checkpoint=True)  # files a resume never reads: no effect
    assert not marker.exists()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", WEIGHTS_NAME, CONFIG_NAME, "trainer_state.json"):
        shutil.rmtree(checkpoint)
        shutil.copytree(pristine, checkpoint)
        replace_with_pickle(checkpoint / name, marker)
        with pytest.raises(Exception) as err:  # torch's weights_only unpickler, safetensors or JSON refuse it
            trainer(tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))
        assert not marker.exists(), name
        assert not isinstance(err.value, AssertionError)


def test_a_named_adapter_is_saved_in_its_subfolder_and_resumed_from_it(tmp_path):
    def two_adapters():
        model = get_normonly_model(tiny_bert(), HEAD)  # "default" stays as initialized
        model.add_adapter("task", HEAD)
        model.set_adapter("task")
        return model

    reference = trainer(tmp_path / "reference", two_adapters(), max_steps=4)
    reference.train()
    run = trainer(tmp_path / "run", two_adapters(), max_steps=4)
    run.add_callback(StopAt(3))
    run.train()
    folder = tmp_path / "run" / "checkpoint-2"
    assert {p.name for p in (folder / "task").iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    untouched = live_adapter(get_normonly_model(tiny_bert(), HEAD))
    assert all(torch.equal(v, untouched[k]) for k, v in adapter_file(folder).items())  # "default", in the folder

    resumed = trainer(tmp_path / "run", two_adapters(), max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    final, expected = live_adapter(resumed.model), live_adapter(reference.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- gradient checkpointing, bf16
def images(n: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return [{"pixel_values": x[i], "labels": int(x[i, 0, 0, 0] > 0)} for i in range(n)]


MODELS = {  # in the last two, nothing before the first checkpointed layer is trainable
    "bert": (tiny_bert, HEAD, None),
    "bert-frozen-embedding-norm": (
        tiny_bert,
        NormOnlyConfig(modules_to_save=["classifier"], exclude_modules=["bert.embeddings.LayerNorm"]),
        None,
    ),
    "vit": (tiny_vit, HEAD, images),
}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_gradient_checkpointing_trains_the_same_as_without(tmp_path, kind, use_reentrant):
    build, config, data = MODELS[kind]
    train = data() if data is not None else None
    reference = trainer(tmp_path / "plain", get_normonly_model(build(), config), train, max_steps=3)
    reference.train()
    t = trainer(
        tmp_path / "checkpointed",
        get_normonly_model(build(), config),
        train,
        max_steps=3,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    t.train()
    assert t.model.base_model.is_activation_checkpointing
    assert train_losses(t) == pytest.approx(train_losses(reference), rel=1e-5)
    got, expected = live_adapter(t.model), live_adapter(reference.model)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    start = live_adapter(get_normonly_model(build(), config))
    assert all(not torch.equal(got[k], start[k]) for k in start)  # every γ/β got gradients


def test_bf16_autocast_trains_and_saves_a_float32_adapter(tmp_path):
    t = trainer(tmp_path, bf16=True, max_steps=4)
    dtypes = set()
    t.model.base_model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, output: dtypes.add(output.dtype)
    )
    start = live_adapter(t.model)
    t.train()
    assert dtypes == {torch.bfloat16}  # the matmuls ran in bf16
    live = live_adapter(t.model)
    assert all(v.dtype == torch.float32 and not torch.equal(v, start[k]) for k, v in live.items())
    saved = adapter_file(tmp_path / "checkpoint-4")
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], live[k]) for k in live)


def test_bf16_model_trains_saves_and_resumes_in_bf16(tmp_path):
    def bf16_model():
        return get_normonly_model(tiny_bert().to(torch.bfloat16), HEAD)

    reference = trainer(tmp_path / "reference", bf16_model(), max_steps=6)
    reference.train()
    t = trainer(tmp_path / "run", bf16_model(), max_steps=6)
    t.add_callback(StopAt(4))
    start = live_adapter(t.model)
    t.train()
    live = live_adapter(t.model)
    assert all(v.dtype == torch.bfloat16 and not torch.equal(v, start[k]) for k, v in live.items())
    saved = adapter_file(tmp_path / "run" / "checkpoint-4")
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], live[k]) for k in live)

    resumed = trainer(tmp_path / "run", bf16_model(), max_steps=6)
    resumed.train(resume_from_checkpoint=True)
    final, expected = live_adapter(resumed.model), live_adapter(reference.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- bad input
def test_a_model_that_is_not_a_normonly_model_is_refused_before_anything_changes(tmp_path):
    base = tiny_bert()
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(TypeError, match="wrap the model with normonly.get_normonly_model"):
        NormOnlyTrainer(model=base, args=args(tmp_path / "out"))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before
    assert not (tmp_path / "out").exists()


def test_a_frozen_adapter_is_refused(tmp_path):
    get_normonly_model(tiny_bert(), HEAD).save_pretrained(tmp_path / "adapter")
    frozen = NormOnlyModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    with pytest.raises(ValueError, match="is_trainable=True"):
        NormOnlyTrainer(model=frozen, args=args(tmp_path / "out"))


def test_resuming_from_a_checkpoint_without_the_adapter_names_the_missing_file(tmp_path):
    t = trainer(tmp_path, max_steps=2)
    t.train()
    (tmp_path / "checkpoint-2" / WEIGHTS_NAME).unlink()
    resumed = trainer(tmp_path, max_steps=4)
    before = live_adapter(resumed.model)
    with pytest.raises(ValueError, match=r"holds no adapter 'default' \(no .*checkpoint-2/adapter_model"):
        resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(v, before[k]) for k, v in live_adapter(resumed.model).items())


# ---------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_ddp_processes_train_one_adapter_and_resume_with_reentrant_checkpointing(tmp_path):
    def launch(output, *flags):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--master-addr", "127.0.0.1",
                   "--master-port", free_port(), "--nproc_per_node", "2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([*command, str(HELPER), str(output), *flags], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        ranks = [safetensors.torch.load_file(output / f"rank{r}.safetensors") for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP kept the replicas equal
        return ranks[0]

    full = launch(tmp_path / "full")
    folder = tmp_path / "full" / "checkpoint-4"
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES - {"rng_state.pth"} | {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    saved = adapter_file(folder)
    assert saved.keys() == full.keys() and all(torch.equal(saved[k], full[k]) for k in full)

    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = launch(tmp_path / "resumed", "--resume", "--reentrant")
    assert all(torch.allclose(resumed[k], full[k], atol=1e-6) for k in full)
    start = live_adapter(get_normonly_model(tiny_bert(), HEAD))
    assert all(not torch.equal(resumed[k], start[k]) for k in start)


# ---------------------------------------------------------------- FSDP
FSDP_HELPER = ROOT / "tests" / "helpers" / "trainer_fsdp.py"


def tiny_llama() -> transformers.LlamaForCausalLM:
    """The helper's model architecture (its weights do not matter here)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=43, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, head_dim=8, max_position_embeddings=64))


def _run_fsdp_helper(output, processes: int, *flags) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--master-addr", "127.0.0.1",
                "--master-port", free_port(), "--nproc_per_node", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(FSDP_HELPER), str(output), *flags], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_on_two_processes_shards_the_frozen_weights_checkpoints_the_adapter_and_resumes(tmp_path):
    from normonly import norm_parameter_names

    _run_fsdp_helper(tmp_path / "fsdp", 2, "--fsdp")
    _run_fsdp_helper(tmp_path / "single", 1)
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    _run_fsdp_helper(tmp_path / "resumed", 2, "--fsdp", "--resume", "--gradient-checkpointing")
    reports = {k: [json.loads(f.read_text()) for f in sorted((tmp_path / k).glob("rank*.json"))]
               for k in ("fsdp", "single", "resumed")}

    single = reports["single"][0]
    for rank in reports["fsdp"]:
        assert rank["frozen_sharded"] and rank["adapter_sharded"]
        assert rank["parameter_bytes"] < 0.55 * single["parameter_bytes"]
        assert rank["losses"] == pytest.approx(single["losses"], abs=1e-5)  # the same global batches
    folder = tmp_path / "fsdp" / "checkpoint-3"
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES - {"rng_state.pth"} | {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    saved = adapter_file(folder)  # the adapter alone, gathered whole; no frozen weight was gathered or written
    assert set(saved) == set(norm_parameter_names(tiny_llama()))
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)  # whole and plain: keyed by parameter name
    assert set(optimizer["state"]) == {f"base_model.{k}" for k in saved}

    final = {k: adapter_file(tmp_path / k / "final") for k in ("fsdp", "single", "resumed")}
    for name in final["single"]:
        torch.testing.assert_close(final["fsdp"][name], final["single"][name], rtol=1e-5, atol=1e-6)
        assert torch.equal(final["resumed"][name], final["fsdp"][name])  # resumed (with checkpointing) = uninterrupted
    loaded = NormOnlyModel.from_pretrained(tiny_llama(), tmp_path / "fsdp" / "final")  # an unsharded model takes it
    live = loaded.base_model.state_dict()
    assert all(torch.equal(live[n], final["fsdp"][n]) for n in final["fsdp"])


def test_fsdp_settings_it_cannot_honour_are_refused_before_the_model_is_sharded(tmp_path):
    _run_fsdp_helper(tmp_path, 1, "--refusals")
    report = json.loads((tmp_path / "refusals.json").read_text())
    errors = report["errors"]
    assert report["unsharded"]
    assert "fsdp_config={'version': 2}" in errors["fsdp1"]
    assert "transformer_layer_cls_to_wrap" in errors["size_based_wrap"]
    assert "gradient_checkpointing=True" in errors["fsdp_activation_checkpointing"]
    assert "['BertLayer']" in errors["unknown_block"]
