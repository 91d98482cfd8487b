"""Train Frankle et al.'s CIFAR ResNets on CIFAR-10 with only BatchNorm trainable (or a baseline), with Accelerate.

Reproduces Frankle, Schwab & Morcos, "Training BatchNorm and Only BatchNorm" (ICLR 2021). Defaults are their
recipe: SGD lr 0.1, momentum 0.9, weight decay 1e-4 on the trainable parameters, global batch 128, 160 epochs,
lr x0.1 at 50 % and 75 % of training (epochs 80 and 120), pad-4 crop + flip.

    # one CPU process (what `make train` runs), or simply `python recipes/resnet_cifar.py ...`
    accelerate launch --cpu --num_processes 1 recipes/resnet_cifar.py --depth 14 --train norm \
        --epochs 30 --schedule cosine --output runs/r14-norm
    # two CPU processes (DDP over gloo), the global batch of 128 split 64 + 64. Not `--cpu --num_processes 2`:
    # without MPI, accelerate's CPU launcher silently starts one process; this config uses torchrun instead
    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/resnet_cifar.py \
        --depth 14 --train norm --output runs/r14-ddp
    # all GPUs of a machine, bf16 autocast, BatchNorm statistics synchronized across GPUs
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/resnet_cifar.py \
        --depth 110 --train norm --mixed-precision bf16 --sync-bn --output runs/r110-norm
    # continue an interrupted run from its last finished epoch (same flags plus --resume)
    accelerate launch --cpu --num_processes 1 recipes/resnet_cifar.py --depth 14 --train norm \
        --epochs 30 --schedule cosine --output runs/r14-norm --resume

--train picks what is trained: all | norm (BatchNorm γ/β only) | norm+output | output (the linear layer only) |
random (2 random weights per output channel of every conv, as many as BatchNorm has: Frankle's control).
Writes to --output: config.json, metrics.jsonl (one line per epoch), checkpoints/epoch_NNNN/ (accelerate
save_state, the latest --keep-checkpoints), model.safetensors and results.json (flat: accuracy in [0, 1],
trainable_params, total_params, seconds, images_per_second and every flag).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

import normonly
from normonly.baselines import train_random_per_channel
from normonly.checkpoint import write_json
from normonly.data import augment, load_cifar10, normalize, resolve_cifar10
from normonly.models import cifar_resnet

MODES = ("all", "norm", "norm+output", "output", "random")
# flags that may change when resuming; every other flag must match the checkpointed run
RESUMABLE = {"resume", "report_to", "log_every", "data", "keep_checkpoints"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=14, help="ResNet depth 6n+2: 8, 14, 20, 32, 56, 110, ... (default 14)")
    p.add_argument("--width", type=int, default=1, help="channel multiplier k: stages of 16k/32k/64k (default 1)")
    p.add_argument("--train", choices=MODES, default="norm", help="which parameters train (default norm)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder in the uoft-cs/cifar10 layout, or a hub name "
                   "(default: $NORMONLY_CIFAR10, else ../shared/data/cifar10, else uoft-cs/cifar10)")
    p.add_argument("--output", default="runs/resnet_cifar", help="run folder (default runs/resnet_cifar)")
    p.add_argument("--epochs", type=int, default=160, help="training epochs (default 160, Frankle)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps; the lr "
                   "schedule is compressed to fit (for short runs and tests)")
    p.add_argument("--batch-size", type=int, default=128, help="GLOBAL batch, split over processes (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="on trainable parameters only (default 1e-4)")
    p.add_argument("--schedule", choices=("multistep", "cosine"), default="multistep",
                   help="multistep: lr x --lr-decay at each milestone (Frankle); cosine: to 0 (default multistep)")
    p.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75], help="multistep milestones as "
                   "fractions of training, so they scale with --epochs (default 0.5 0.75 = epochs 80, 120 of 160)")
    p.add_argument("--lr-decay", type=float, default=0.1, help="multistep factor (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="initialization, data order, augmentation (default 0)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="passed to Accelerate (default: the accelerate config's, else no)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (multi-GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (Accelerate's inductor backend)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default on; faster on CPU and GPU)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="how many epoch checkpoints to keep (default 1)")
    p.add_argument("--log-every", type=int, default=50, help="progress-bar update interval in steps (default 50)")
    p.add_argument("--report-to", default="auto", help="Accelerate tracker (tensorboard, wandb, trackio, ...), "
                   "'none', or 'auto' = tensorboard when installed (default auto)")
    args = p.parse_args(argv)
    if args.depth < 8 or (args.depth - 2) % 6:
        p.error(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {args.depth}")
    for flag in ("width", "epochs", "batch_size", "keep_checkpoints", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0 or not 0 < args.lr_decay <= 1:
        p.error("need --lr > 0, --momentum >= 0, --weight-decay >= 0 and 0 < --lr-decay <= 1")
    if any(not 0 < m < 1 for m in args.milestones) or args.milestones != sorted(args.milestones):
        p.error(f"--milestones must be increasing fractions of training in (0, 1), got {args.milestones}")
    return args


def set_trainable(model: torch.nn.Module, mode: str, seed: int) -> torch.nn.Module:
    """requires_grad for --train; must run before accelerator.prepare."""
    if mode == "norm":
        return normonly.freeze_all_but_norm(model)
    if mode == "norm+output":
        return normonly.freeze_all_but_norm(model, extra_trainable=["fc"])
    if mode == "random":
        return train_random_per_channel(model, per_channel=2, seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "all" or name.startswith("fc."))
    return model


def lr_factor(schedule: str, total_steps: int, milestones: list[float], decay: float):
    marks = [round(m * total_steps) for m in milestones]
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return lambda step: decay ** sum(step >= m for m in marks)


def checkpoints(output: Path) -> list[Path]:
    """Finished checkpoints, oldest first (an interrupted save leaves only a tmp folder, never listed)."""
    return sorted((output / "checkpoints").glob("epoch_[0-9][0-9][0-9][0-9]"))


@torch.inference_mode()
def evaluate(model, loader, accelerator, channels_last: bool) -> tuple[float, float]:
    """Test accuracy and loss in eval mode (BatchNorm running statistics), gathered over processes."""
    model.eval()
    correct = loss = total = 0.0
    for images, labels in loader:
        logits = model(normalize(images, channels_last))
        losses = F.cross_entropy(logits.float(), labels.long(), reduction="none")
        hits, losses = accelerator.gather_for_metrics((logits.argmax(1) == labels, losses))
        correct, loss, total = correct + hits.sum(), loss + losses.sum(), total + hits.numel()
    model.train()
    return float(correct / total), float(loss / total)


def training_function(args: argparse.Namespace) -> tuple[dict, torch.nn.Module]:
    """Train as the flags say; returns (results, the trained model unwrapped from DDP/compile)."""
    output = Path(args.output)
    tracker = {"auto": "tensorboard" if _has_tensorboard() else None, "none": None}.get(args.report_to, args.report_to)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # lets torchrun / --multi_gpu launches run N CPU processes (gloo)
        mixed_precision=args.mixed_precision,
        dynamo_backend="inductor" if args.compile else None,
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # the test loader's batch is global too
        log_with=tracker,
        project_dir=str(output),
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.sync_bn and device.type == "cpu":
        raise SystemExit("error: --sync-bn needs GPUs: torch's SyncBatchNorm does not run on CPU processes")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by {world} processes")
    config = {k: v for k, v in vars(args).items()}
    config["data"] = resolve_cifar10(args.data)
    last = checkpoints(output)
    if output.exists() and not args.resume and (last or (output / "results.json").exists()):
        raise SystemExit(f"error: {output} already holds a run; pass --resume to continue it or pick another --output")
    if args.resume and last and (output / "config.json").exists():
        saved = json.loads((output / "config.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in config.items() if k not in RESUMABLE and saved.get(k) != v}
        if changed:
            raise SystemExit(f"error: --resume with flags that differ from the checkpointed run: {changed}")

    # data: decoded once (main process first, the others read its cache), then kept on the device as uint8
    with accelerator.main_process_first():
        try:
            data = load_cifar10(args.data, progress=accelerator.is_local_main_process)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
    x_train, y_train = data["x_train"].to(device), data["y_train"].to(device).long()
    test_set = torch.utils.data.TensorDataset(data["x_test"], data["y_test"].long())
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=128 * world)  # 128 a process: cache-friendly on CPU

    set_seed(args.seed)
    model = cifar_resnet(args.depth, args.width, num_classes=10)
    total_params = sum(p.numel() for p in model.parameters())
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    set_trainable(model, args.train, args.seed)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]  # weight decay reaches only these
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    batch = args.batch_size // world
    steps_per_epoch = len(x_train) // args.batch_size  # the last partial batch is dropped, as in Frankle's code
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(x_train)} training images are fewer than one batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(args.schedule, total_steps, args.milestones, args.lr_decay)
    )
    model, optimizer, test_loader = accelerator.prepare(model, optimizer, test_loader)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per global step, by us

    start_epoch, seconds, train_seconds = 0, 0.0, 0.0
    if args.resume and last:
        accelerator.load_state(str(last[-1]))
        start_epoch = int(last[-1].name.split("_")[1])
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
        records = [r for r in records if r["epoch"] <= start_epoch]  # drop epochs redone after the checkpoint
        seconds, train_seconds = records[-1]["seconds"], records[-1]["train_seconds"]
        if accelerator.is_main_process:
            (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        accelerator.print(f"resumed from {last[-1]} (epoch {start_epoch} of {epochs})")
    elif args.resume:
        accelerator.print(f"--resume: no checkpoint in {output}, starting from scratch")
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "config.json", config)
        if start_epoch == 0:
            (output / "metrics.jsonl").write_text("")
    accelerator.init_trackers("resnet_cifar", config={k: str(v) for k, v in config.items()})
    accelerator.print(
        f"ResNet-{args.depth}-{args.width} --train {args.train}: trainable {trainable_params:,} of {total_params:,} "
        f"parameters ({100 * trainable_params / total_params:.3f} %); {world} process(es) on {device}; "
        f"{steps_per_epoch} steps/epoch x {epochs} epochs, batch {args.batch_size}"
    )

    step = start_epoch * steps_per_epoch
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    for epoch in range(start_epoch, epochs):
        # all randomness of an epoch comes from (seed, epoch[, rank]): a resumed run replays it exactly
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 10_000 + epoch))
        order = order.to(device)
        aug_gen = torch.Generator(device=device).manual_seed((args.seed * 10_000 + epoch) * 1_000 + rank)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar.set_description(f"epoch {epoch + 1}/{epochs}")
        tic, steps = time.perf_counter(), 0
        while steps < steps_per_epoch and step < total_steps:
            idx = order[steps * args.batch_size + rank * batch : steps * args.batch_size + (rank + 1) * batch]
            images, labels = normalize(augment(x_train[idx], aug_gen), args.channels_last), y_train[idx]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == labels).sum()
            steps, step = steps + 1, step + 1
            bar.update()
            if steps % args.log_every == 0:  # the only host-device sync in the loop
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
        epoch_train_seconds = time.perf_counter() - tic
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps
        train_acc = accelerator.reduce(correct, reduction="sum").item() / (steps * args.batch_size)
        test_acc, test_loss = evaluate(model, test_loader, accelerator, args.channels_last)
        train_seconds += epoch_train_seconds
        seconds += time.perf_counter() - tic
        record = {
            "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
            "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc,
            "images_per_second": steps * args.batch_size / epoch_train_seconds,
            "seconds": seconds, "train_seconds": train_seconds,
        }
        accelerator.log(record, step=step)
        if accelerator.is_local_main_process:
            bar.write(
                f"epoch {epoch + 1}: train loss {train_loss:.3f} acc {train_acc:.3f} | test acc {test_acc:.4f} "
                f"| {record['images_per_second']:.0f} img/s"
            )
        if accelerator.is_main_process:
            with open(output / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        save_checkpoint(accelerator, output, epoch + 1, args.keep_checkpoints)
    bar.close()

    results = {
        "accuracy": record["test_accuracy"] if epochs > start_epoch else _last_accuracy(output),
        "trainable_params": trainable_params, "total_params": total_params,
        "seconds": seconds, "train_seconds": train_seconds,
        "images_per_second": min(step, total_steps) * args.batch_size / max(train_seconds, 1e-9),
        "steps": step, "epochs_run": epochs, "num_processes": world, "device": str(device),
        "precision": accelerator.mixed_precision,
        "mode": args.train, **config,
    }
    accelerator.wait_for_everyone()
    # --compile: accelerate wraps torch.compile around everything else; save the model's own names, not _orig_mod.*
    model = getattr(model, "_orig_mod", model)
    accelerator.save_model(model, output)  # model.safetensors: the final parameters and BatchNorm statistics
    if accelerator.is_main_process:
        write_json(output / "results.json", results)
        print(f"test accuracy {results['accuracy']:.4f}; results in {output / 'results.json'}")
    accelerator.end_training()
    return results, accelerator.unwrap_model(model)


def save_checkpoint(accelerator: Accelerator, output: Path, epoch: int, keep: int) -> None:
    """accelerate save_state into a tmp folder, then an atomic rename: a killed save is never resumed from."""
    tmp = output / "checkpoints" / "tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, output / "checkpoints" / f"epoch_{epoch:04d}")
        for old in checkpoints(output)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _last_accuracy(output: Path) -> float:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["test_accuracy"]


def _has_tensorboard() -> bool:
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())


def main(argv=None) -> dict:
    return training_function(parse_args(argv))[0]


if __name__ == "__main__":
    main()
