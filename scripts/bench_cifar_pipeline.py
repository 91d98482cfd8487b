"""How much of a ResNet training step the CIFAR-10 data pipeline costs, and images/s per mode, side by side.

    OMP_NUM_THREADS=1 python scripts/bench_cifar_pipeline.py --data ../shared/data/cifar10 --steps 60 \
        --out results/frankle/bench_cpu1.json

For each mode the same loop as recipes/resnet_cifar.py runs: index the uint8 training tensor, pad-crop-flip and
normalize the batch (data), then forward, backward and SGD step (compute). Both parts are timed per step on the
same batches (on GPU with a synchronize around each part); the first steps are warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import normonly
from normonly.baselines import train_random_per_channel
from normonly.data import augment, load_cifar10, normalize
from normonly.models import cifar_resnet


def bench(mode: str, x: torch.Tensor, y: torch.Tensor, args, device) -> dict:
    torch.manual_seed(0)
    model = cifar_resnet(args.depth)
    if mode == "norm":
        normonly.freeze_all_but_norm(model)
    elif mode == "random":
        train_random_per_channel(model)
    elif mode == "output":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("fc."))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    order = torch.randperm(len(x), device=device, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data_t = compute_t = 0.0
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        idx = order[step * args.batch_size : (step + 1) * args.batch_size]
        images, labels = normalize(augment(x[idx], gen), args.channels_last), y[idx]
        sync()
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            data_t, compute_t = data_t + t1 - t0, compute_t + t2 - t1
    step_t = (data_t + compute_t) / args.steps
    return {
        "mode": mode,
        "ms_per_step": 1000 * step_t,
        "data_ms_per_step": 1000 * data_t / args.steps,
        "data_share": data_t / (data_t + compute_t),
        "images_per_second": args.batch_size / step_t,
        "seconds_per_epoch": (len(x) // args.batch_size) * step_t,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 folder or hub name (default: see normonly.data)")
    p.add_argument("--depth", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per mode (default 60)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["norm", "all", "output", "random"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = load_cifar10(args.data, progress=False)
    x, y = d["x_train"].to(device), d["y_train"].to(device).long()
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "depth": args.depth,
        "batch_size": args.batch_size,
        "channels_last": args.channels_last,
        "runs": [],
    }
    for mode in args.modes:
        r = bench(mode, x, y, args, device)
        report["runs"].append(r)
        print(
            f"ResNet-{args.depth} {mode:7s}: {r['ms_per_step']:6.1f} ms/step = {r['images_per_second']:5.0f} img/s "
            f"(epoch ≈ {r['seconds_per_epoch']:.0f} s); data pipeline {r['data_ms_per_step']:.2f} ms = "
            f"{100 * r['data_share']:.1f} % of the step",
            flush=True,
        )
    norm = next((r for r in report["runs"] if r["mode"] == "norm"), None)
    full = next((r for r in report["runs"] if r["mode"] == "all"), None)
    if norm and full:
        report["norm_over_all_step_time"] = norm["ms_per_step"] / full["ms_per_step"]
        print(f"norm-only step time / full step time = {report['norm_over_all_step_time']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
