"""Fine-tune a Hugging Face causal language model by training only its RMSNorm/LayerNorm γ (or a baseline).

Methods, all on the same data, schedule and budget:

    norm    the norms' γ (and β where they have one), plus --extra-trainable modules (normonly.freeze_all_but_norm)
    lora    LoRA on peft's default projections for the architecture, plus --extra-trainable modules (stock peft)
    full    everything

Data: a text dataset (a `--text-column`, tokenized, joined with EOS and packed into `--block-size` blocks) or an
instruction dataset (`--prompt-column` + `--response-column`: the loss covers the response only). Perplexity on
the evaluation split is measured before and after training. Runs on one process, under DDP, and under FSDP2
(`--fsdp`: every decoder block sharded with torch's fully_shard, frozen weights included; works over NCCL and gloo).

    python recipes/finetune_causal_lm.py --model Qwen/Qwen3-0.6B --dataset Salesforce/wikitext \\
        --dataset-config wikitext-2-raw-v1 --output runs/qwen3-wikitext-norm                   # with internet
    accelerate launch --multi_gpu --num_processes 8 recipes/finetune_causal_lm.py --fsdp --mixed-precision bf16 \\
        --model meta-llama/Llama-3.2-1B --dataset tatsu-lab/alpaca --prompt-column instruction \\
        --response-column output --gradient-checkpointing --output runs/llama-alpaca-norm   # 8 GPUs, FSDP2
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/finetune_causal_lm.py --fsdp \\
        --model PATH --dataset PATH --output runs/cpu-fsdp                                       # 2 CPU processes

Writes DIR/config.json, DIR/results.json (perplexity before and after, next-token accuracy on the evaluation split
as `accuracy`, parameter counts, per-rank parameter bytes,
timings, every flag) and DIR/adapter/ (norm: a normonly adapter; lora: a peft adapter) or DIR/model.safetensors
(full), each with base.json. `--save-every N`, Ctrl-C/SIGTERM and `--resume` work as in the other recipes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

METHODS = ("norm", "lora", "full")
DEFAULT_LR = {"norm": 1e-3, "lora": 1e-3, "full": 5e-5}
MAY_DIFFER = {"output", "dataset", "model", "save_every", "keep_checkpoints"}


def parse_args(argv=None) -> argparse.Namespace:
    from normonly.runs import add_run_flags, check_training_flags

    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=doc[0] + "\n\n" + doc[2], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Full description and examples: the docstring of recipes/finetune_causal_lm.py")
    p.add_argument("--method", choices=METHODS, default="norm", help="what to train (see above; default norm)")
    p.add_argument("--model", required=True, help="hub id or local folder of a transformers causal LM")
    p.add_argument("--dataset", required=True, help="hub id or local folder of a dataset")
    p.add_argument("--dataset-config", default=None, help="hub configuration name (default: none)")
    p.add_argument("--train-split", default="train", help="split to train on; slicing works (default train)")
    p.add_argument("--eval-split", default="validation", help="split for perplexity, e.g. `train[95%%:]` when the "
                   "dataset has no validation split (default validation)")
    p.add_argument("--text-column", default="text", help="column of plain text (default text)")
    p.add_argument("--prompt-column", default=None, help="instruction data: the prompt column (default: none, "
                   "plain text)")
    p.add_argument("--response-column", default=None, help="instruction data: the response column; the loss covers "
                   "only these tokens (default: none)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per training sequence (default 256)")
    p.add_argument("--extra-trainable", nargs="+", default=None, help="modules trained in full besides the norms "
                   "(e.g. lm_head, embed_tokens); with lora they are peft's modules_to_save (default: none)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs, may be fractional (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: none)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices, never on γ/β "
                   "(default 0)")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps in linear warm-up (default 0.03)")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch of sequences, split over processes "
                   "(default 8)")
    p.add_argument("--eval-batches", type=int, default=50, help="batches of the eval split for perplexity (default 50)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, --method lora (default 8)")
    p.add_argument("--fsdp", action="store_true", help="shard every decoder block with FSDP2 (needs >= 2 processes; default off)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (default off)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="autocast precision (default: the accelerate config's, else no)")
    p.add_argument("--seed", type=int, default=0, help="random seed: data order, LoRA init, dropout (default 0)")
    add_run_flags(p)
    args = p.parse_args(argv)
    if (args.prompt_column is None) != (args.response_column is None):
        p.error("instruction data needs both --prompt-column and --response-column")
    check_training_flags(p, args, positive=("block_size", "batch_size", "eval_batches", "lora_r"), default_lr=DEFAULT_LR)
    return args


def load_examples(args, tokenizer, split: str):
    """Token blocks of one split: packed plain text, or prompt + response with the prompt masked out of the loss."""
    from datasets import load_dataset

    try:
        ds = load_dataset(args.dataset, args.dataset_config, split=split)
    except ValueError as e:
        raise ValueError(f"dataset {args.dataset} has no split {split!r} ({e}): pass --train-split / --eval-split") from e
    columns = [args.prompt_column, args.response_column] if args.prompt_column else [args.text_column]
    missing = sorted(set(columns) - set(ds.column_names))
    if missing:
        raise ValueError(f"split {split!r} of {args.dataset} lacks columns {missing} (it has {ds.column_names}): pass "
                         "--text-column, or --prompt-column and --response-column")
    eos = tokenizer.eos_token_id
    if args.prompt_column is None:
        ids = [t for text in ds[args.text_column] for t in [*tokenizer(text)["input_ids"], eos]]
        n = len(ids) // args.block_size * args.block_size
        blocks = [ids[i : i + args.block_size] for i in range(0, n, args.block_size)]
        return [{"input_ids": b, "labels": b} for b in blocks]
    examples = []
    for prompt, response in zip(ds[args.prompt_column], ds[args.response_column]):
        p_ids, r_ids = tokenizer(prompt)["input_ids"], [*tokenizer(response, add_special_tokens=False)["input_ids"], eos]
        ids = (p_ids + r_ids)[: args.block_size]
        labels = ([-100] * len(p_ids) + r_ids)[: args.block_size]
        if any(label != -100 for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(pad_id: int):
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    import torch

    def batch(rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad_id] * k for r, k in zip(rows, pad)]),
            "labels": torch.tensor([r["labels"] + [-100] * k for r, k in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * k for r, k in zip(rows, pad)]),
        }

    return batch


def build_model(args):
    """The pretrained model with exactly the parameters of ``--method`` trainable (LoRA wraps it with peft)."""
    import normonly

    model = normonly.build_base(base_spec(args))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if args.method == "norm":
        normonly.freeze_all_but_norm(model, extra_trainable=args.extra_trainable)
    elif args.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                            modules_to_save=args.extra_trainable)
        model = get_peft_model(model, config)
    return model


def base_spec(args) -> dict:
    from normonly.models import base_spec as spec

    return spec("causal_lm", model=args.model, seed=args.seed)


def evaluate(model, loader, accelerator, batches: int) -> tuple[float, float]:
    """(perplexity, next-token accuracy) over the predicted tokens of the first ``batches`` batches, all processes."""
    import torch

    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == batches:
                break
            with accelerator.autocast():
                out = model(**batch)
            labels = batch["labels"][:, 1:]
            scored = labels != -100
            hits = ((out.logits[:, :-1].argmax(-1) == labels) & scored).sum()
            tokens = scored.sum()
            total += torch.stack([out.loss.double() * tokens, hits.double(), tokens.double()])
    model.train()
    loss, hits, tokens = accelerator.reduce(total, reduction="sum").tolist()
    return math.exp(loss / max(tokens, 1)), hits / max(tokens, 1)


def training_function(args) -> tuple[dict, object]:
    """Train as the flags say; returns (results, the trained model)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    import normonly
    from normonly.checkpoint import list_checkpoints, optimizer_groups, write_json
    from normonly.distributed import shard_blocks
    from normonly.loop import train_steps
    from normonly.runs import RunError, prepare_run_folder, relative_to_run, save_run_weights, source_fingerprint
    from normonly.safe_io import read_json

    output = Path(args.output)
    start = time.time()
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # torchrun / --multi_gpu launches on CPUs: gloo processes
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True),
    )
    world = accelerator.num_processes
    if args.batch_size % world:
        raise RunError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    if args.fsdp and world < 2:
        raise RunError("--fsdp shards over several processes: launch with accelerate launch --num_processes N (N >= 2)")
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    config.update(output=".", dataset=relative_to_run(args.dataset, output), model=relative_to_run(args.model, output),
                  data_fingerprint=source_fingerprint(args.dataset) + f"/{args.dataset_config}",
                  model_fingerprint=source_fingerprint(args.model), torch_threads=torch.get_num_threads(),
                  num_processes=world)
    state = prepare_run_folder(output, config, resume=args.resume, overwrite=args.overwrite, may_differ=MAY_DIFFER,
                               lock=accelerator.is_main_process)
    if state == "finished":
        accelerator.print(f"{output} holds a finished run of these flags; its results are in {output / 'results.json'}")
        return read_json(output / "results.json"), None
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with accelerator.main_process_first():
        train_rows, eval_rows = load_examples(args, tokenizer, args.train_split), load_examples(args, tokenizer, args.eval_split)
    if len(train_rows) < args.batch_size or not eval_rows:
        raise RunError(f"{len(train_rows)} training and {len(eval_rows)} evaluation sequences of --block-size "
                       f"{args.block_size}: too few for a batch of {args.batch_size}; lower --block-size")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_loader = DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              collate_fn=collate(pad_id))
    eval_loader = DataLoader(eval_rows, batch_size=args.batch_size, collate_fn=collate(pad_id))

    model = build_model(args)
    trainable, total = normonly.count_parameters(model)
    if args.fsdp:  # shard first: the optimizer must see the sharded parameters
        shard_blocks(model)
    local_bytes = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.lr)
    if args.fsdp:  # accelerate would wrap the sharded model in DDP: it gets the optimizer and data only
        optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    accelerator.print(f"{args.method}: trainable params: {trainable:,} || all params: {total:,} || trainable%: "
                      f"{100 * trainable / total:.4f}; {world} process(es){', FSDP2' if args.fsdp else ''}; "
                      f"{local_bytes / 2**20:.1f} MiB of parameters on each")
    steps_per_epoch = len(train_loader)
    max_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup * max_steps), max_steps)

    before = None if state == "resume" and list_checkpoints(output) else evaluate(model, eval_loader, accelerator,
                                                                                  args.eval_batches)[0]
    if accelerator.is_main_process:
        write_json(output / "config.json", config)

    def loss_fn(batch, step):
        with accelerator.autocast():
            return model(**batch).loss

    progress = train_steps(accelerator, model, optimizer, scheduler, train_loader, loss_fn, max_steps=max_steps,
                           output=output, resume=state == "resume", save_every=args.save_every,
                           keep=args.keep_checkpoints, desc=args.method, progress={"perplexity_before": before})
    after, accuracy = evaluate(model, eval_loader, accelerator, args.eval_batches)
    results = {"accuracy": accuracy, "perplexity_before": progress["perplexity_before"], "perplexity": after,
               "trainable_params": trainable, "total_params": total, "parameter_bytes_per_rank": local_bytes,
               "steps": max_steps, "steps_per_epoch": steps_per_epoch, "train_seconds": progress["train_seconds"],
               **config}
    saved = save_run_weights(model, output, method=args.method, base_spec=base_spec(args),
                             modules_to_save=args.extra_trainable, is_main=accelerator.is_main_process)
    if accelerator.is_main_process:
        results.update(adapter=saved["adapter"], adapter_bytes=saved["adapter_bytes"], seconds=time.time() - start)
        write_json(output / "results.json", results)
        print(f"{args.method}: perplexity {results['perplexity_before']:.2f} -> {after:.2f}; results in "
              f"{output / 'results.json'}; load the trained model with:\n{saved['load']}")
    accelerator.wait_for_everyone()
    return results, model if args.fsdp else accelerator.unwrap_model(model)


def main(argv=None) -> dict:
    from normonly.runs import run_recipe

    return run_recipe(training_function, parse_args(argv))


if __name__ == "__main__":
    from normonly.runs import end_process

    main()
    end_process()  # under gloo, exits before interpreter shutdown, where torch 2.14 can abort a finished rank
