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
    # continue an interrupted run (same flags plus --resume); Ctrl-C or SIGTERM saves the current step first
    accelerate launch --cpu --num_processes 1 recipes/resnet_cifar.py --depth 14 --train norm \
        --epochs 30 --schedule cosine --output runs/r14-norm --resume

--train picks what is trained: all | norm (BatchNorm γ/β only) | norm+output | output (the linear layer only) |
random (2 random weights per output channel of every conv, as many as BatchNorm has: Frankle's control).
Writes to --output: config.json (every flag; a run folder belongs to one configuration), metrics.jsonl (one line
per epoch), checkpoints/step_N/ (safetensors + JSON with sha256 digests, the latest --keep-checkpoints),
model.safetensors and results.json (flat: accuracy in [0, 1], trainable_params, total_params, seconds,
images_per_second and every flag).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, accelerate and normonly are imported when training starts: `--help` answers at once
    import torch

MODES = ("all", "norm", "norm+output", "output", "random")
# flags that may change when resuming; every other flag (and the data's fingerprint) must match the run folder's
MAY_DIFFER = {"report_to", "log_every", "data", "output", "keep_checkpoints"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=14, help="ResNet depth 6n+2: 8, 14, 20, 32, 56, 110, ... (default 14)")
    p.add_argument("--width", type=int, default=1, help="channel multiplier k: stages of 16k/32k/64k (default 1)")
    p.add_argument("--train", choices=MODES, default="norm", help="which parameters train (default norm):\n"
                   "  all          every parameter (full training from the random init)\n"
                   "  norm         BatchNorm γ/β only (Frankle's BatchNorm-only)\n"
                   "  norm+output  BatchNorm γ/β and the output layer\n"
                   "  output       the output layer only\n"
                   "  random       2 random conv weights per channel, as many as BatchNorm has (Frankle's control)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder in the uoft-cs/cifar10 layout, or a hub name "
                   "(default: $NORMONLY_CIFAR10, else ../shared/data/cifar10, else uoft-cs/cifar10)")
    p.add_argument("--output", default="runs/resnet_cifar", help="run folder (default runs/resnet_cifar)")
    p.add_argument("--epochs", type=int, default=160, help="training epochs (default 160, Frankle)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps; the lr "
                   "schedule is compressed to fit (for short runs and tests; default: none)")
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
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (multi-GPU; default off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (Accelerate's inductor backend; default off)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default on; faster on CPU and GPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint (default off)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output (default off: refused)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep (default 2: the "
                   "previous one is the fallback if the newest is damaged)")
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
    if not all(map(math.isfinite, (args.lr, args.momentum, args.weight_decay, args.lr_decay))):
        p.error("--lr, --momentum, --weight-decay and --lr-decay must be finite numbers (not nan or inf)")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0 or not 0 < args.lr_decay <= 1:
        p.error("need --lr > 0, --momentum >= 0, --weight-decay >= 0 and 0 < --lr-decay <= 1")
    if any(not 0 < m < 1 for m in args.milestones) or args.milestones != sorted(args.milestones):
        p.error(f"--milestones must be increasing fractions of training in (0, 1), got {args.milestones}")
    return args


def set_trainable(model: torch.nn.Module, mode: str, seed: int) -> torch.nn.Module:
    """requires_grad for --train; must run before accelerator.prepare."""
    import normonly
    from normonly.baselines import train_random_per_channel

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


def evaluate(model, loader, accelerator, channels_last: bool) -> tuple[float, float]:
    """Test accuracy and loss in eval mode (BatchNorm running statistics), gathered over processes."""
    import torch
    import torch.nn.functional as F

    from normonly.data import normalize

    model.eval()
    correct = loss = total = 0.0
    with torch.inference_mode():
        for images, labels in loader:
            logits = model(normalize(images, channels_last))
            losses = F.cross_entropy(logits.float(), labels.long(), reduction="none")
            hits, losses = accelerator.gather_for_metrics((logits.argmax(1) == labels, losses))
            correct, loss, total = correct + hits.sum(), loss + losses.sum(), total + hits.numel()
    model.train()
    return float(correct / total), float(loss / total)


def training_function(args: argparse.Namespace) -> tuple[dict, torch.nn.Module | None]:
    """Train as the flags say; returns (results, the trained model unwrapped from DDP/compile)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from normonly.checkpoint import load_checkpoint, save_checkpoint, unwrap_model, write_json
    from normonly.data import augment, load_cifar10, normalize, resolve_cifar10
    from normonly.models import cifar_resnet
    from normonly.runs import RunError, StopSignal, check_finite, end_run, prepare_run_folder, resume_command
    from normonly.safe_io import read_json

    output = Path(args.output)
    tracker = {"auto": "tensorboard" if _has_tensorboard() else None, "none": None}.get(args.report_to, args.report_to)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # lets torchrun / --multi_gpu launches run N CPU processes (gloo)
        mixed_precision=args.mixed_precision,
        dynamo_backend="inductor" if args.compile else None,
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # the test loader's batch is global too
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.sync_bn and device.type == "cpu":
        raise RunError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on CPU processes")
    if args.batch_size % world:
        raise RunError(f"--batch-size {args.batch_size} is not divisible by {world} processes")

    # data: decoded once (main process first, the others read its cache), then kept on the device as uint8
    source = resolve_cifar10(args.data)
    with accelerator.main_process_first():
        try:
            data = load_cifar10(source, progress=accelerator.is_local_main_process)
        except (FileNotFoundError, ValueError) as err:
            raise RunError(str(err)) from None
    config = run_config(args, source, data, torch.get_num_threads())
    state = prepare_run_folder(output, config, resume=args.resume, overwrite=args.overwrite, may_differ=MAY_DIFFER,
                               lock=accelerator.is_main_process)
    if state == "finished":
        accelerator.print(f"{output} holds a finished run of these flags; its results are in {output / 'results.json'}")
        return read_json(output / "results.json"), None
    accelerator.wait_for_everyone()  # every rank has checked the folder before the main one writes to it
    x_train, y_train = data["x_train"].to(device), data["y_train"].to(device).long()
    test_set = torch.utils.data.TensorDataset(data["x_test"], data["y_test"].long())
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=128 * world)  # 128 a process: cache-friendly on CPU

    set_seed(args.seed)
    model = cifar_resnet(args.depth, args.width, num_classes=10, seed=args.seed)  # rebuilt bit for bit from the seed
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
        raise RunError(f"{len(x_train)} training images are fewer than one batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(args.schedule, total_steps, args.milestones, args.lr_decay)
    )
    model, optimizer, test_loader = accelerator.prepare(model, optimizer, test_loader)
    aug_gen = torch.Generator(device=device)

    # everything a resume needs is in the checkpoint (metrics.jsonl is rewritten from it)
    progress = {"step": 0, "records": [], "seconds": 0.0, "train_seconds": 0.0}
    if state == "resume":
        restored = load_checkpoint(output, model=model, optimizer=optimizer, scheduler=scheduler,
                                   generators={"augment": aug_gen}, accelerator=accelerator)
        if restored is not None:
            progress = restored
            accelerator.print(f"resumed {output} at step {progress['step']} of {total_steps}")
        else:
            accelerator.print(f"--resume: {output} has no checkpoint yet, starting from step 0")
    step = progress["step"]
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "config.json", config)
        write_metrics(output, progress["records"])
    accelerator.init_trackers("resnet_cifar", config={k: str(v) for k, v in config.items()})
    accelerator.print(
        f"ResNet-{args.depth}-{args.width} --train {args.train}: trainable {trainable_params:,} of {total_params:,} "
        f"parameters ({100 * trainable_params / total_params:.3f} %); {world} process(es) on {device}, "
        f"{torch.get_num_threads()} thread(s); {steps_per_epoch} steps/epoch x {epochs} epochs, batch {args.batch_size}"
    )

    def checkpoint(epoch: int, steps: int, loss_sum, correct) -> None:
        done = {**progress, "epoch": epoch, "steps_in_epoch": steps, "loss_sum": loss_sum, "correct": correct}
        done.pop("step")
        save_checkpoint(output, step, model=model, optimizer=optimizer, scheduler=scheduler, progress=done,
                        generators={"augment": aug_gen}, keep=args.keep_checkpoints, accelerator=accelerator)

    def stop_here(stop, how: str):
        bar.close()
        accelerator.print(f"stopped by signal {how}; continue with:\n  {resume_command()}")
        return SystemExit(stop.exit_code)

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    start_epoch, start_in_epoch = divmod(step, steps_per_epoch)
    with StopSignal() as stop:
        for epoch in range(start_epoch, epochs):
            # all randomness of an epoch comes from (seed, epoch[, rank]): a resumed run replays it exactly
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 10_000 + epoch))
            order = order.to(device)
            steps = 0
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            if epoch == start_epoch and start_in_epoch:  # mid-epoch resume: the generator's state came back too
                steps, loss_sum, correct = start_in_epoch, progress["loss_sum"].to(device), progress["correct"].to(device)
            else:
                aug_gen.manual_seed((args.seed * 10_000 + epoch) * 1_000 + rank)
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            tic, first = time.perf_counter(), steps
            while steps < steps_per_epoch and step < total_steps:
                idx = order[steps * args.batch_size + rank * batch : steps * args.batch_size + (rank + 1) * batch]
                images, labels = normalize(augment(x_train[idx], aug_gen), args.channels_last), y_train[idx]
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                if device.type == "cpu":  # free on CPU; on accelerators the loss is checked at each log interval
                    check_finite(loss, step + 1)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(1) == labels).sum()
                steps, step = steps + 1, step + 1
                bar.update()
                at_log = steps % args.log_every == 0
                if at_log:  # the only host-device sync in the loop
                    check_finite(loss_sum, step)
                    bar.set_postfix(loss=f"{loss_sum.item() / steps:.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
                if (world == 1 or at_log) and stop.requested(accelerator) and steps < steps_per_epoch:
                    progress["seconds"] += time.perf_counter() - tic
                    progress["train_seconds"] += time.perf_counter() - tic
                    checkpoint(epoch, steps, loss_sum, correct)
                    raise stop_here(stop, f"at step {step}")
            epoch_train_seconds = time.perf_counter() - tic
            check_finite(loss_sum, step)
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps
            train_acc = accelerator.reduce(correct, reduction="sum").item() / (steps * args.batch_size)
            test_acc, test_loss = evaluate(model, test_loader, accelerator, args.channels_last)
            progress["train_seconds"] += epoch_train_seconds
            progress["seconds"] += time.perf_counter() - tic
            record = {
                "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc,
                "images_per_second": (steps - first) * args.batch_size / epoch_train_seconds,
                "seconds": progress["seconds"], "train_seconds": progress["train_seconds"],
            }
            progress["records"].append(record)
            accelerator.log(record, step=step)
            if accelerator.is_local_main_process:
                bar.write(
                    f"epoch {epoch + 1}: train loss {train_loss:.3f} acc {train_acc:.3f} | test acc {test_acc:.4f} "
                    f"| {record['images_per_second']:.0f} img/s"
                )
            if accelerator.is_main_process:
                write_metrics(output, progress["records"])
            checkpoint(epoch + 1, 0, loss_sum, correct)
            if stop.requested(accelerator) and step < total_steps:
                raise stop_here(stop, f"after epoch {epoch + 1}")
    bar.close()

    records = progress["records"]
    results = {
        "accuracy": records[-1]["test_accuracy"],
        "trainable_params": trainable_params, "total_params": total_params,
        "seconds": progress["seconds"], "train_seconds": progress["train_seconds"],
        "images_per_second": step * args.batch_size / max(progress["train_seconds"], 1e-9),
        "steps": step, "epochs_run": epochs, "num_processes": world, "device": str(device),
        "precision": accelerator.mixed_precision, "mode": args.train, **config,
    }
    accelerator.wait_for_everyone()
    model = unwrap_model(model)  # the model's own names, not DDP's module.* or torch.compile's _orig_mod.*
    if accelerator.is_main_process:
        save_outputs(model, args, output, results, records)
    end_run(accelerator)
    return results, model


def run_config(args: argparse.Namespace, source: str, data: dict, threads: int) -> dict:
    """Every flag's value, plus what identifies the data and the arithmetic (a run folder belongs to one config)."""
    from normonly.runs import relative_to_run

    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    config["data"] = relative_to_run(source, args.output)  # no machine's absolute path: the run folder can move
    config["output"] = "."  # paths are relative to the run folder
    config["data_fingerprint"] = data_fingerprint(data)
    config["torch_threads"] = threads  # the thread count changes float results: recorded, and checked on resume
    return config


def data_fingerprint(data: dict) -> str:
    """sha256 (16 hex digits) of the decoded images and labels: the same data wherever its folder lies."""
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode())
        digest.update(data[key].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_metrics(output: Path, records: list[dict]) -> None:
    """metrics.jsonl, one line per finished epoch, replaced whole (the checkpoint holds the same records)."""
    tmp = output / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, output / "metrics.jsonl")


def save_outputs(model, args: argparse.Namespace, output: Path, results: dict, records: list[dict]) -> None:
    """model.safetensors (final parameters and BatchNorm statistics), adapter/ for the norm modes, results.json and
    curves.png (train/test accuracy and loss per epoch)."""
    from normonly.checkpoint import write_json
    from normonly.models import base_spec
    from normonly.report import plot_curves
    from normonly.runs import save_run_weights
    from normonly.safe_io import write_files

    write_files(output, tensor_files={"model.safetensors": model.state_dict()}, digest=False)
    if args.train in ("norm", "norm+output"):  # a normonly adapter of the seed-rebuilt random base
        spec = base_spec("cifar_resnet", depth=args.depth, width=args.width, num_classes=10, seed=args.seed)
        saved = save_run_weights(model, output, method="norm", base_spec=spec,
                                 modules_to_save=["fc"] if args.train == "norm+output" else None)
        results.update(adapter=saved["adapter"], adapter_bytes=saved["adapter_bytes"])
    write_json(output / "results.json", results)
    plot_curves(records, output / "curves.png")
    print(f"test accuracy {results['accuracy']:.4f}; results in {output / 'results.json'}, curves in "
          f"{output / 'curves.png'}")
    if "adapter" in results:
        print(f"load the trained network with:\n{saved['load']}")


def _has_tensorboard() -> bool:
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())


def main(argv=None) -> dict:
    from normonly.runs import run_recipe

    return run_recipe(training_function, parse_args(argv))


if __name__ == "__main__":
    from normonly.runs import end_process

    main()
    end_process()  # under gloo, exits before interpreter shutdown, where torch 2.14 can abort a finished rank
