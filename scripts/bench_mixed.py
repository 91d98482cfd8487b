"""Serving many tasks from one base: per-sample adapters in one batch against one adapter and against switching.

For ResNet-50 and BERT-base (random weights; batch 64, eval, no autograd), side by side in interleaved rounds:

    one       one adapter for the whole batch: today's forward
    mixed     16 adapters mixed in the batch, 4 samples each: model(x, adapter_names=[...])
    switch    the same 16 tasks served by set_adapter + a forward of each task's 4 samples

Targets (issue 15): mixed ≤ 1.15 × one, and mixed ≥ 2 × faster than switch. Peak memory is the process's peak
resident-memory growth during one run of each variant on CPU (torch.cuda.max_memory_allocated on a GPU).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_mixed.py --output results/perf/bench_mixed.json
    PYTHONPATH=. python scripts/bench_mixed.py --device cuda --output results/perf/bench_mixed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from pathlib import Path

import torch
from bench_timing import timed_both

import normonly
from normonly import NormOnlyConfig

VARIANTS = ("one", "mixed", "switch")


def build(name: str, device: torch.device):
    """(wrapper with `adapters` different adapters, a batch of inputs as (args, kwargs))."""
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        base, head = torchvision.models.resnet50(num_classes=10), "fc"
    else:
        import transformers

        base = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
        head = "classifier"
    model = normonly.get_normonly_model(base, NormOnlyConfig(modules_to_save=[head]), "task0")
    return model, head


def inputs(name: str, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    if name == "resnet50":
        return (torch.randn(batch, 3, 224, 224, generator=g).to(device),), {}
    ids = torch.randint(0, 30522, (batch, 128), generator=g).to(device)
    return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def add_adapters(model, n: int, head: str) -> list[str]:
    names = ["task0"]
    for i in range(1, n):
        model.add_adapter(f"task{i}", NormOnlyConfig(modules_to_save=[head]))
        names.append(f"task{i}")
    g = torch.Generator().manual_seed(2)
    for name in names:  # every adapter differs in every tensor
        for value in model._adapters[name].values.values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=g).to(value))
    model.set_adapter("task0")
    return names


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_mib(fn) -> float:
    """How far resident memory rises above its level before ``fn()``, measured in a child forked for it (Linux), so
    that every variant starts from the same memory state and none reuses what another one freed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reset the peak, run, report
        try:
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_mib("VmRSS")
            with torch.inference_mode():
                fn()
            os.write(write, str(_status_mib("VmHWM") - before).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return float(f.read())


def make_loops(model, x_args, x_kwargs, assignment: list[str], rows: dict[str, list[int]]) -> dict:
    """The three ways of serving the batch, as functions of no arguments."""

    def one():
        model(*x_args, **x_kwargs)

    def mixed():
        model(*x_args, adapter_names=assignment, **x_kwargs)

    def switch():
        for task, index in rows.items():
            model.set_adapter(task)
            model(*[a[index] for a in x_args], **{k: v[index] for k, v in x_kwargs.items()})

    return {"one": one, "mixed": mixed, "switch": switch}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "bert-base"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
              "adapters": args.adapters, "models": {}}
    for name in args.models:
        model, head = build(name, device)
        names = add_adapters(model, args.adapters, head)
        model.to(device).eval()
        x_args, x_kwargs = inputs(name, args.batch, device)
        per_task = args.batch // args.adapters
        assignment = [names[i // per_task] for i in range(args.batch)]
        rows = {task: list(range(i * per_task, (i + 1) * per_task)) for i, task in enumerate(names)}

        loops = make_loops(model, x_args, x_kwargs, assignment, rows)
        times = {v: [] for v in VARIANTS}
        memory = {}
        if device.type == "cpu":  # before any forward: each child starts from the same state
            memory = {v: peak_growth_mib(loops[v]) for v in VARIANTS}
        with torch.inference_mode():
            for v in VARIANTS:  # warm-up (and on a GPU, each variant's peak memory)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                loops[v]()
                if device.type == "cuda":
                    memory[v] = torch.cuda.max_memory_allocated(device) / 2**20
            for _ in range(args.repeats):
                order = list(VARIANTS)
                random.shuffle(order)
                for v in order:
                    times[v].append(timed_both(loops[v], device)[0])
        median = {v: statistics.median(t) for v, t in times.items()}
        report["models"][name] = {
            "seconds": median, "all_seconds": times, "peak_memory_mib": memory,
            "mixed_over_one": median["mixed"] / median["one"], "switch_over_mixed": median["switch"] / median["mixed"],
        }
        print(f"{name}: one {median['one']:.3f} s | mixed {median['mixed']:.3f} s | switch {median['switch']:.3f} s; "
              f"mixed/one {median['mixed'] / median['one']:.3f} (target <= 1.15), switch/mixed "
              f"{median['switch'] / median['mixed']:.2f} (target >= 2); peak memory MiB {memory}", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
