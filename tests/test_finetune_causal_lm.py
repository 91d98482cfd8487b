"""recipes/finetune_causal_lm.py on tiny random Llama, Qwen3, Gemma and GPT-2 models with text generated here."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from run_helpers import assert_same_tensors, free_port
from safetensors.torch import load_file

import normonly

recipe = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
    "finetune_causal_lm", ROOT / "recipes" / "finetune_causal_lm.py"))
spec.loader.exec_module(recipe)

WORDS = [f"w{i}" for i in range(40)]
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               num_key_value_heads=2, max_position_embeddings=128, head_dim=8)


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(vocab)


def _model(kind: str, vocab: int):
    import transformers as T

    ids = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if kind == "gpt2":  # LayerNorm with β, and the output layer tied to the input embeddings
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids))
    config = {"llama": T.LlamaConfig, "qwen3": T.Qwen3Config, "gemma": T.GemmaConfig}[kind](**DECODER, **ids)
    return {"llama": T.LlamaForCausalLM, "qwen3": T.Qwen3ForCausalLM, "gemma": T.GemmaForCausalLM}[kind](config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder per architecture: random weights and a word-level tokenizer over WORDS."""
    folders = {}
    for kind in ("llama", "qwen3", "gemma", "gpt2"):
        folder = tmp_path_factory.mktemp(kind)
        vocab = _tokenizer(folder)
        torch.manual_seed(0)
        _model(kind, vocab).save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Learnable text: every line walks the words in order from a random start (the next word is predictable)."""
    import datasets

    folder = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)

    def lines(n):
        starts = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        return [" ".join(WORDS[(s + k) % len(WORDS)] for k in range(24)) for s in starts]

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines(200)}),
                          "validation": datasets.Dataset.from_dict({"text": lines(40)})}).save_to_disk(folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run builds its own Accelerator (its mixed precision is fixed once per state)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def args(model, data, out, *extra):
    return ["--model", str(model), "--dataset", str(data), "--block-size", "32", "--batch-size", "8",
            "--eval-batches", "10", "--lr", "0.1", "--output", str(out), *extra]


def run(argv):
    return recipe.training_function(recipe.parse_args(argv))


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma", "gpt2"])
def test_norm_tuning_trains_exactly_the_norms_lowers_perplexity_and_leaves_a_loadable_adapter(
    kind, models, text_data, tmp_path
):
    results, trained = run(args(models[kind], text_data, tmp_path, "--max-steps", "150"))
    assert results["perplexity"] < 0.9 * results["perplexity_before"], results
    base = normonly.build_base(tmp_path / "adapter")  # the recorded base: the same pretrained folder
    before, after = dict(base.named_parameters()), dict(trained.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(normonly.norm_parameter_names(base)), sorted(changed ^ set(normonly.norm_parameter_names(base)))
    if kind == "gemma":  # Gemma scales by (1 + weight): its norms are found by the structural rule and trained
        assert any("input_layernorm" in n for n in changed)
    if kind == "gpt2":  # tied input/output embeddings stay frozen; LayerNorm β trains too
        assert "transformer.wte.weight" not in changed and any(n.endswith("ln_f.bias") for n in changed)

    loaded = normonly.NormOnlyModel.from_pretrained(base, tmp_path / "adapter")
    x = torch.randint(3, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, trained.eval()(input_ids=x).logits)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert results["adapter_bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert sum(t.numel() for t in saved.values()) == results["trainable_params"]
    assert 0 <= results["accuracy"] <= 1 and results["output"] == "."


def test_extra_trainable_adds_the_output_layer_and_lora_and_full_runs_save_their_formats(models, text_data, tmp_path):
    import peft

    results, trained = run(args(models["llama"], text_data, tmp_path / "head", "--max-steps", "3",
                                "--extra-trainable", "lm_head"))
    base = normonly.build_base(tmp_path / "head" / "adapter")
    assert not torch.equal(base.lm_head.weight, trained.lm_head.weight)
    assert results["trainable_params"] == len(normonly.norm_parameter_names(base)) * 32 + base.lm_head.weight.numel()

    lora, lora_model = run(args(models["llama"], text_data, tmp_path / "lora", "--method", "lora", "--max-steps", "3"))
    reloaded = peft.PeftModel.from_pretrained(normonly.build_base(tmp_path / "lora" / "adapter"),
                                              str(tmp_path / "lora" / "adapter")).eval()
    x = torch.randint(3, 40, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, lora_model.eval()(input_ids=x).logits)
    full, _ = run(args(models["gpt2"], text_data, tmp_path / "full", "--method", "full", "--max-steps", "3"))
    assert full["trainable_params"] == full["total_params"] and (tmp_path / "full" / "model.safetensors").is_file()


def test_instruction_data_puts_the_loss_on_the_response_only(models, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    folder = tmp_path / "instructions"
    rows = {"prompt": ["w1 w2 w3", "w4 w5"], "response": ["w6 w7", "w8 w9 w10"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
                         ).save_to_disk(folder)
    parsed = recipe.parse_args(args(models["llama"], folder, tmp_path / "run", "--prompt-column", "prompt",
                                    "--response-column", "response"))
    examples = recipe.load_examples(parsed, AutoTokenizer.from_pretrained(models["llama"]), "train")
    tok = AutoTokenizer.from_pretrained(models["llama"])
    first = examples[0]
    n_prompt = len(tok("w1 w2 w3")["input_ids"])
    assert first["labels"][:n_prompt] == [-100] * n_prompt
    assert first["labels"][n_prompt:] == first["input_ids"][n_prompt:] and first["labels"][-1] == tok.eos_token_id
    with pytest.raises(SystemExit):
        recipe.parse_args(args(models["llama"], folder, tmp_path / "x", "--prompt-column", "prompt"))


def test_gradient_checkpointing_and_bf16_train_the_norms(models, text_data, tmp_path):
    results, trained = run(args(models["qwen3"], text_data, tmp_path, "--max-steps", "4", "--gradient-checkpointing",
                                "--mixed-precision", "bf16"))
    base = normonly.build_base(tmp_path / "adapter")
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, dict(trained.named_parameters())[n])}
    assert changed == set(normonly.norm_parameter_names(base))
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")["model.norm.weight"].dtype == torch.float32
    assert results["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process_and_holds_half_the_parameters(models, text_data, tmp_path):
    common = args(models["llama"], text_data, "OUT", "--max-steps", "6")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", free_port(),
              "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "finetune_causal_lm.py")]
    outputs = {}

    def launch_run(name, *extra):
        out = tmp_path / name
        cmd = [*launch, *[str(out) if a == "OUT" else a for a in common], *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = json.loads((out / "results.json").read_text())

    launch_run("fsdp", "--fsdp", "--save-every", "3", "--keep-checkpoints", "5")
    launch_run("ddp")
    # resume the FSDP run from its step-3 checkpoint (what a kill after that step leaves): the same end, bit for bit
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "fsdp" / "config.json", tmp_path / "resumed")
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_000000003", tmp_path / "resumed" / "checkpoints" / "step_000000003")
    launch_run("resumed", "--fsdp", "--save-every", "3", "--keep-checkpoints", "5", "--resume")
    assert outputs["resumed"]["perplexity_before"] == outputs["fsdp"]["perplexity_before"]
    single = recipe.main([str(tmp_path / "single") if a == "OUT" else a for a in common])

    fsdp, ddp = outputs["fsdp"], outputs["ddp"]
    assert fsdp["num_processes"] == ddp["num_processes"] == 2
    assert fsdp["parameter_bytes_per_rank"] < 0.6 * ddp["parameter_bytes_per_rank"]  # frozen weights sharded
    adapters = {k: load_file(tmp_path / k / "adapter" / "adapter_model.safetensors") for k in ("fsdp", "ddp", "single")}
    for name in adapters["single"]:  # the same global batches: the same training up to float reduction order
        torch.testing.assert_close(adapters["fsdp"][name], adapters["single"][name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapters["ddp"][name], adapters["single"][name], rtol=1e-4, atol=1e-5)
    assert fsdp["perplexity"] == pytest.approx(single["perplexity"], rel=1e-3)
    assert_same_tensors(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors",
                        tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
