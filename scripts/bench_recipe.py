"""Images/s of the CIFAR recipe's training loop against the plain PyTorch loop a user would write, side by side.

Both loops train the same CIFAR ResNet norm-only (normonly.freeze_all_but_norm) with the same SGD (lr 0.1,
momentum 0.9, weight decay 1e-4 on the trainable γ/β), batch 128, pad-4 crop + flip, Frankle's normalization:

    plain   torchvision-style: a Dataset that turns each uint8 image into a PIL image (as
            torchvision.datasets.CIFAR10 does), RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
            Normalize per image, a shuffling DataLoader (--workers processes), fp32, NCHW, loss.item() per step
    recipe  recipes/resnet_cifar.py's loop, built from its public pieces: normonly.data.load_cifar10 (decoded
            once, uint8 tensors on the device), normonly.data.augment + normalize on whole batches, channels_last,
            no host-device sync in the step
    recipe-bf16, recipe-compile (optional): the same with bf16 autocast / torch.compile

Time: warm-up steps, then --repeats rounds; in each round every loop runs one untimed step and --steps timed steps,
in a shuffled order. The table gives the median images/s over rounds and the ratio to the plain loop, and (no
DataLoader workers, CPU) the median over rounds of the plain loop's CPU time divided by this loop's in the same round,
which a shared, loaded machine disturbs less than wall-clock time.
--accuracy-steps N then trains a fresh model with each loop for N steps and reports test accuracy (same seed
for model init; the augmentation draws differ), to show the loops learn alike.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_recipe.py --data ../shared/data/cifar10 \\
        --output results/perf/bench_recipe.json                       # ResNet-14 and -56 on the CPU
    PYTHONPATH=. python scripts/bench_recipe.py --device cuda --depths 14 56 110 \\
        --variants plain recipe recipe-bf16 --output results/perf/bench_recipe_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_timing import timed_both
from torch import nn

import normonly
from normonly.data import CIFAR10_MEAN, CIFAR10_STD, augment, load_cifar10, normalize
from normonly.models import cifar_resnet

VARIANTS = ("plain", "recipe", "recipe-nchw", "recipe-bf16", "recipe-compile")


class CIFAR10Images(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: a PIL image from the uint8 array, then transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images, self.labels, self.transform = images.numpy(), labels.numpy(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def plain_transform(train: bool):
    import torchvision.transforms as T

    augmentation = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*augmentation, T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def make_model(depth: int, device: torch.device, channels_last: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = normonly.freeze_all_but_norm(cifar_resnet(depth, num_classes=10))
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    opt = torch.optim.SGD(normonly.trainable_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, opt


def plain_loop(data: dict, depth: int, args, device: torch.device) -> tuple[Callable[[], None], nn.Module]:
    model, opt = make_model(depth, device, channels_last=False)
    dataset = CIFAR10Images(data["x_train"], data["y_train"], plain_transform(train=True))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    batches = iter(loader)
    running = {"loss": 0.0}

    def step():
        nonlocal batches
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        opt.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        running["loss"] += loss.item()

    return step, model


def recipe_loop(data: dict, depth: int, variant: str, args, device) -> tuple[Callable[[], None], nn.Module]:
    channels_last = variant != "recipe-nchw"
    model, opt = make_model(depth, device, channels_last)
    forward = torch.compile(model) if variant == "recipe-compile" else model
    x, y = data["x_train"].to(device), data["y_train"].to(device).long()
    gen = torch.Generator(device=device).manual_seed(0)
    order = torch.randperm(len(x), device=device, generator=gen)
    n_batches = len(x) // args.batch_size
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if variant == "recipe-bf16" else nullcontext()
    state = {"i": 0}

    def step():
        i = state["i"] % n_batches
        state["i"] += 1
        idx = order[i * args.batch_size : (i + 1) * args.batch_size]
        images, labels = normalize(augment(x[idx], gen), channels_last), y[idx]
        with amp:
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def make_loop(variant: str, data: dict, depth: int, args, device):
    if variant == "plain":
        return plain_loop(data, depth, args, device)
    return recipe_loop(data, depth, variant, args, device)


def bench_depth(depth: int, data: dict, args, device: torch.device) -> dict[str, dict]:
    loops = {v: make_loop(v, data, depth, args, device)[0] for v in args.variants}
    for _ in range(args.warmup):
        for step in loops.values():
            step()
    rounds, cpu_rounds = {v: [] for v in loops}, {v: [] for v in loops}
    shuffle = random.Random(0)
    for r in range(args.repeats):
        for variant in shuffle.sample(list(loops), len(loops)):
            loops[variant]()  # untimed: the previous loop left its own tensors in the caches
            seconds, cpu = timed_both(lambda v=variant: [loops[v]() for _ in range(args.steps)], device)
            rounds[variant].append(args.steps * args.batch_size / seconds)
            cpu_rounds[variant].append(cpu)
        print(f"  ResNet-{depth}: round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    out = {}
    for v, ips in rounds.items():
        out[v] = {"images_per_second": statistics.median(ips), "round_images_per_second": ips}
        # CPU time per round relative to the plain loop in the same round (median over rounds); only meaningful
        # when every loop runs in this process: no DataLoader workers, CPU device
        paired = [p / c for p, c in zip(cpu_rounds["plain"], cpu_rounds[v])]
        in_process = args.workers == 0 and device.type == "cpu"
        out[v]["cpu_ratio_to_plain"] = statistics.median(paired) if in_process else None
    return out


def test_accuracy(model: nn.Module, data: dict, variant: str, device: torch.device) -> float:
    """Test accuracy in eval mode, each loop feeding the test set its own way."""
    x, y = data["x_test"], data["y_test"].long()
    if variant == "plain":
        batches = torch.utils.data.DataLoader(CIFAR10Images(x, y, plain_transform(train=False)), batch_size=1000)
    else:
        batches = ((normalize(x[i : i + 1000].to(device), variant != "recipe-nchw"), y[i : i + 1000])
                   for i in range(0, len(x), 1000))  # fmt: skip
    correct = 0
    with normonly.eval_mode(model):
        for images, labels in batches:
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    return correct / len(x)


def accuracy_check(depth: int, data: dict, args, device) -> dict[str, float]:
    out = {}
    for variant in args.variants:
        step, model = make_loop(variant, data, depth, args, device)
        for _ in range(args.accuracy_steps):
            step()
        out[variant] = test_accuracy(model, data, variant, device)
        print(f"  ResNet-{depth} {variant}: test accuracy {out[variant]:.4f}", file=sys.stderr, flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 folder or hub name (default: see normonly.data)")
    p.add_argument("--depths", type=int, nargs="+", default=[14, 56], help="CIFAR ResNet depths (default 14 56)")
    p.add_argument("--variants", nargs="+", default=["plain", "recipe"], choices=VARIANTS, help="loops to compare")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128, Frankle)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop per round (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first (default 3)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the plain loop (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--accuracy-steps", type=int, default=0, help="also train N steps per loop and report test accuracy")
    p.add_argument("--output", type=Path, help="write the results as JSON here (a .md table beside it)")
    args = p.parse_args(argv)
    if "plain" not in args.variants:
        args.variants = ["plain", *args.variants]
    if min(args.steps, args.repeats, args.warmup, args.batch_size, args.threads) < 1 or args.workers < 0:
        p.error("--steps, --repeats, --warmup, --batch-size and --threads must be >= 1, --workers >= 0")
    if any(d < 8 or (d - 2) % 6 for d in args.depths):
        p.error(f"--depths must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {args.depths}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        data = load_cifar10(args.data, progress=False)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": args.threads,
        "workers": args.workers,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "train_images": len(data["x_train"]),
        "load_before": os.getloadavg(),
    }
    results = {}
    for depth in args.depths:
        rows = bench_depth(depth, data, args, device)
        for row in rows.values():
            row["ratio_to_plain"] = row["images_per_second"] / rows["plain"]["images_per_second"]
        if args.accuracy_steps:
            for variant, acc in accuracy_check(depth, data, args, device).items():
                rows[variant]["test_accuracy"] = acc
        results[f"resnet{depth}"] = rows
    meta["load_after"] = os.getloadavg()
    lines = [
        f"{meta['device']}, {args.threads} thread(s), DataLoader workers {args.workers}, batch {args.batch_size}; "
        f"median of {args.repeats} interleaved rounds of {args.steps} steps; load average "
        f"{meta['load_before'][0]:.1f} → {meta['load_after'][0]:.1f}",
        "",
        "| model (norm-only) | loop | images/s | × plain | CPU time: plain ÷ loop |" + (" test acc. |" if args.accuracy_steps else ""),
        "|---|---|---|---|---|" + ("---|" if args.accuracy_steps else ""),
    ]
    for model, rows in results.items():
        for variant, row in rows.items():
            acc = f" {row['test_accuracy']:.4f} |" if args.accuracy_steps else ""
            cpu = "–" if row["cpu_ratio_to_plain"] is None else f"{row['cpu_ratio_to_plain']:.2f}"
            lines.append(
                f"| {model} | {variant} | {row['images_per_second']:,.0f} | {row['ratio_to_plain']:.2f} | {cpu} |{acc}"
            )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(table + "\n")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
