"""Training-step time and peak memory of norm-only training against full fine-tuning, peft LN tuning, BitFit and LoRA.

Models have random weights (nothing is downloaded): torchvision ResNet-18/50 on small images, Frankle et al.'s
CIFAR ResNet-14/56, a BERT-base-sized and a ViT-B-sized transformers config at a modest sequence length.
Methods, each on a fresh copy of the same model, all with the same fused AdamW:

    full            every parameter trains
    normonly        normonly.freeze_all_but_norm + normonly.trainable_parameters
    peft-ln         stock peft LN tuning on the same layers, via normonly.to_peft_config
    bitfit          biases only (requires_grad=False on everything else)
    lora            peft LoRA r=8 (attention query/value; every ungrouped Conv2d of a CNN)
    normonly-model  normonly's PEFT-style path: get_normonly_model(model, NormOnlyConfig()) + trainable_parameters
    normonly-plain  (ablation) normonly's freezing, but AdamW(model.parameters()) with torch's default implementation
    normonly-lean   (ablation) normonly with the forward pass inside normonly.lean_frozen_convs()
    normonly-again  (control) a second, independent normonly copy: how far two identical setups differ (the noise)

Time: per model, every method runs warm-up steps, then --repeats rounds; in each round the methods take turns in a
shuffled order, each running one untimed step (the previous method left its own tensors in the caches) and then a
few timed steps (forward + backward + optimizer step), so load on the machine hits all methods alike.
The table shows the median wall-clock step time over rounds and the median over rounds of its ratio to full
fine-tuning in the same round with the interquartile range of those per-round ratios (the noise), and that ratio
for this process's CPU time (time.process_time), which leaves out time spent waiting for a shared CPU. A second table
compares normonly with each other method directly: the median over rounds of normonly's step time divided by that
method's in the same round, with its IQR, and the A/A control (normonly-again) as the resolution of the machine.
Work: after the rounds, each method's step runs once more under a dispatch mode that counts its module calls, aten
ops, flops and tensor bytes (scripts/step_work.py): exact counts, the same on every run, which settle
what timing cannot between methods that run nearly the same kernels. Memory: each (model, method) runs again
in a fresh process (forked from a server that has imported the libraries and built nothing); on the CPU its peak
resident set size (ru_maxrss) minus its resident size just before the model is built, so weights, gradients,
optimizer state and activations all count and the interpreter and libraries do not; on a GPU
torch.cuda.max_memory_allocated minus what was allocated before the model was built.

    PYTHONPATH=. python scripts/bench_step.py --output results/perf/bench_step.json --eval     # defaults, ~25 min
    PYTHONPATH=. python scripts/bench_step.py --quick                                           # < 3 min on CPU
    PYTHONPATH=. python scripts/bench_step.py --models efficientnet-b0,convnext-tiny,mobilenet-v3 \\
        --methods full,normonly-plain,normonly,normonly-lean                                    # library changes
    PYTHONPATH=. python scripts/bench_step.py --device cuda --output results/perf/bench_step_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from bench_timing import timed_both
from step_work import step_work
from torch import nn

import normonly

DEFAULT_METHODS = ["full", "normonly", "peft-ln", "bitfit", "lora"]
METHODS = DEFAULT_METHODS + ["normonly-model", "normonly-plain", "normonly-lean", "normonly-again"]
DEFAULT_MODELS = ["resnet18", "resnet50", "cifar-resnet14", "cifar-resnet56", "bert-base", "vit-base"]


@dataclass
class Spec:
    """A model to benchmark: how to build it and its input, at the default and at the --quick size."""

    build: Callable[[bool], nn.Module]  # quick -> model with random weights
    kind: str  # "image" (tensor in), "hf-image" (pixel_values=), "text" (input_ids=)
    size: int  # image side or sequence length
    batch: int
    quick_size: int
    quick_batch: int
    classes: int = 10
    lora_targets: list[str] | None = None  # None: every Conv2d with groups == 1

    def shape(self, quick: bool) -> tuple[int, int]:
        return (self.quick_batch, self.quick_size) if quick else (self.batch, self.size)

    def describe(self, quick: bool) -> str:
        batch, size = self.shape(quick)
        return f"batch {batch} × {size} tokens" if self.kind == "text" else f"batch {batch} × {size}²"


def _cifar_resnet(depth: int) -> Callable[[bool], nn.Module]:
    def build(quick: bool) -> nn.Module:
        try:
            from normonly.models import cifar_resnet
        except ImportError:
            raise SystemExit(
                f"cifar-resnet{depth} needs normonly.models.cifar_resnet, which comes with the CIFAR recipe "
                "(branch 'cifar'); merge it, or leave the model out with --models"
            ) from None
        return cifar_resnet(depth, num_classes=10)

    return build


def _bert(quick: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    return BertForSequenceClassification(BertConfig(num_labels=2, **(small if quick else {})))  # BERT-base: 110M


def _vit(quick: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    size = SPECS["vit-base"].shape(quick)[1]
    small = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)
    return ViTForImageClassification(ViTConfig(image_size=size, num_labels=10, **(small if quick else {})))  # ViT-B/16


def _tv(name: str, **kwargs) -> Callable[[bool], nn.Module]:
    return lambda quick: getattr(torchvision.models, name)(num_classes=10, **kwargs)


SPECS: dict[str, Spec] = {
    "resnet18": Spec(_tv("resnet18"), "image", 96, 16, 64, 8),
    "resnet50": Spec(_tv("resnet50"), "image", 96, 16, 64, 4),
    "cifar-resnet14": Spec(_cifar_resnet(14), "image", 32, 128, 32, 32),
    "cifar-resnet56": Spec(_cifar_resnet(56), "image", 32, 128, 32, 16),
    "bert-base": Spec(_bert, "text", 128, 8, 64, 8, classes=2, lora_targets=["query", "value"]),
    "vit-base": Spec(_vit, "hf-image", 128, 8, 64, 8, lora_targets=["q_proj", "v_proj"]),
    # not in the default set: CNNs whose frozen convolutions keep inputs nothing else needs (lean_frozen_convs)
    "efficientnet-b0": Spec(_tv("efficientnet_b0"), "image", 96, 16, 64, 4),
    "convnext-tiny": Spec(_tv("convnext_tiny"), "image", 96, 16, 64, 4),
    "mobilenet-v3": Spec(_tv("mobilenet_v3_large"), "image", 96, 16, 64, 4),
}


def make_batch(spec: Spec, quick: bool, device: torch.device, channels_last: bool = False) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch, size = spec.shape(quick)
    labels = torch.randint(0, spec.classes, (batch,), generator=g)
    if spec.kind == "text":
        inputs = {"input_ids": torch.randint(0, 30_000, (batch, size), generator=g)}
    else:
        key = "pixel_values" if spec.kind == "hf-image" else "x"
        inputs = {key: torch.randn(batch, 3, size, size, generator=g)}
    if channels_last and spec.kind == "image":
        inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def place(model: nn.Module, spec: Spec, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on ``device``, CNNs in channels_last memory format when asked."""
    fmt = torch.channels_last if channels_last and spec.kind == "image" else torch.preserve_format
    return model.to(device, memory_format=fmt)


def build_model(name: str, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    return SPECS[name].build(quick)


def prepare(method: str, model: nn.Module, spec: Spec) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Set up ``method`` on ``model`` (in place) and return (model to call, optimizer)."""
    fused = {"fused": True}
    if method == "full":
        params = list(model.parameters())
    elif method in ("normonly", "normonly-lean", "normonly-again"):
        params = normonly.trainable_parameters(normonly.freeze_all_but_norm(model))
    elif method == "normonly-model":
        model = normonly.get_normonly_model(model, normonly.NormOnlyConfig())
        params = normonly.trainable_parameters(model)
    elif method == "normonly-plain":
        normonly.freeze_all_but_norm(model)
        params, fused = list(model.parameters()), {}  # what a first loop looks like: every parameter, default AdamW
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
        params = normonly.trainable_parameters(model)
    elif method == "peft-ln":
        import peft

        model = peft.get_peft_model(model, normonly.to_peft_config(normonly.NormOnlyConfig(), model))
        params = normonly.trainable_parameters(model)
    elif method == "lora":
        import peft

        targets = spec.lora_targets or [
            n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1
        ]
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
        )
        params = normonly.trainable_parameters(model)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model.train(), torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **fused)


def make_step(method: str, model: nn.Module, opt: torch.optim.Optimizer, inputs: dict, labels: torch.Tensor):
    lean = method == "normonly-lean"
    x = inputs.get("x")

    def step():
        with normonly.lean_frozen_convs() if lean else nullcontext():
            out = model(x) if x is not None else model(**inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``."""
    return timed_both(fn, device)[0]



def bench_time(name: str, methods: list[str], args, device: torch.device) -> dict[str, dict]:
    """Interleaved step times of every method on one model; per method the per-round mean step times."""
    spec = SPECS[name]
    base = build_model(name, args.quick)
    inputs, labels = make_batch(spec, args.quick, device, args.channels_last)
    runs = {}
    for method in methods:
        model, opt = prepare(method, place(copy.deepcopy(base), spec, device, args.channels_last), spec)
        trainable, total = normonly.count_parameters(model)
        runs[method] = {"step": make_step(method, model, opt, inputs, labels), "trainable": trainable, "total": total}
    del base
    for _ in range(args.warmup):
        warm = {method: timed(r["step"], device) for method, r in runs.items()}
    steps = args.steps or max(1, min(20, round((0.1 if args.quick else 1.0) / max(warm["full"], 1e-4))))
    for r in runs.values():
        r["rounds"], r["cpu_rounds"] = [], []
    shuffle = random.Random(0)
    for i in range(args.repeats):
        order = shuffle.sample(methods, len(methods))
        for method in order:
            run = runs[method]
            run["step"]()  # untimed: the previous method left other tensors in the caches
            wall, cpu = zip(*(timed_both(run["step"], device) for _ in range(steps)))
            run["rounds"].append(statistics.mean(wall))
            run["cpu_rounds"].append(statistics.mean(cpu))
        print(f"  {name}: round {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
    for run in runs.values():
        run["work"] = step_work(run["step"])
    out = {}
    for method, run in runs.items():
        out[method] = {
            "trainable_params": run["trainable"],
            "total_params": run["total"],
            "steps_per_round": steps,
            "round_seconds": run["rounds"],
            "step_seconds": statistics.median(run["rounds"]),
            "cpu_round_seconds": run["cpu_rounds"],
            "cpu_step_seconds": statistics.median(run["cpu_rounds"]),
            "work": run["work"],
        }
    return out


def bench_eval(name: str, args, device: torch.device) -> dict[str, float]:
    """Median forward time of the norm-only model in eval mode: autograd on, no_grad, normonly.eval_mode."""
    spec = SPECS[name]
    model = place(normonly.freeze_all_but_norm(build_model(name, args.quick)), spec, device, args.channels_last)
    inputs, _ = make_batch(spec, args.quick, device, args.channels_last)
    x = inputs.get("x")

    def forward():
        return model(x) if x is not None else model(**inputs)

    def grad_on():
        model.eval()
        forward()
        model.train()

    def no_grad():
        model.eval()
        with torch.no_grad():
            forward()
        model.train()

    def eval_mode():
        with normonly.eval_mode(model):
            forward()

    modes = {"eval, autograd on": grad_on, "eval + no_grad": no_grad, "normonly.eval_mode": eval_mode}
    for fn in modes.values():
        fn()
    times = {k: [] for k in modes}
    shuffle = random.Random(0)
    for _ in range(args.repeats):
        for key in shuffle.sample(list(modes), len(modes)):
            modes[key]()
            times[key].append(timed(modes[key], device))
    return {k: statistics.median(v) for k, v in times.items()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"CPU ({name}, {os.cpu_count()} cores)"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_memory(name: str, method: str, args, device: torch.device) -> int:
    """Peak memory of a few training steps, above what the process held before the model existed (bytes)."""
    spec = SPECS[name]
    inputs, labels = make_batch(spec, args.quick, device, args.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    model, opt = prepare(method, place(build_model(name, args.quick), spec, device, args.channels_last), spec)
    step = make_step(method, model, opt, inputs, labels)
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux reports KiB


def _quiet():
    warnings.filterwarnings("ignore", message="Unsupported layer type")  # peft LN tuning on BatchNorm
    warnings.filterwarnings("ignore", category=FutureWarning)


def _probe_child(name: str, method: str, args) -> int:
    _quiet()
    torch.set_num_threads(args.threads)
    return probe_memory(name, method, args, torch.device(args.device))


def memory_in_subprocess(pool_context, name: str, method: str, args) -> int:
    """``probe_memory`` in a fresh process forked from a server that has only imported the libraries."""
    with pool_context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_probe_child, (name, method, args))


def _quartiles(values: list[float]) -> list[float]:
    """First and third quartile (both the value itself when there is only one)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def _paired(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios: load that comes and goes between rounds cancels out."""
    return [a / b for a, b in zip(num, den)]


def _work_ratio(num: dict, den: dict) -> dict:
    return {k: v / den[k] for k, v in num.items()}


def normonly_over(norm: dict, other: dict) -> dict:
    """normonly's step time and work divided by another method's: per-round time ratios (median, IQR), exact work."""
    paired = _paired(norm["round_seconds"], other["round_seconds"])
    work = _work_ratio(norm["work"], other["work"])
    return {"time": statistics.median(paired), "time_quartiles": _quartiles(paired), **work}


def markdown(results: list[dict], evals: dict, meta: dict) -> str:
    lines = [
        f"{meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}"
        f"{', channels_last CNNs' if meta['channels_last'] else ''}; median of {meta['repeats']} interleaved rounds; "
        f"load average {meta['load_before'][0]:.1f} → {meta['load_after'][0]:.1f}; {meta['optimizer']}",
        "",
        "| model (input) | method | trainable params | step (ms) | × full (IQR over rounds) | CPU time × full "
        "| peak memory (MB) | × full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = "–" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:,.0f}"
        mem_ratio = "–" if r.get("peak_ratio") is None else f"{r['peak_ratio']:.2f}"
        lo, hi = r.get("time_ratio_quartiles") or (r["time_ratio"], r["time_ratio"])
        lines.append(
            f"| {r['model']} ({r['input']}) | {r['method']} | {r['trainable_params']:,} | "
            f"{1000 * r['step_seconds']:,.1f} | {r['time_ratio']:.3f} ({lo:.2f}–{hi:.2f}) | "
            f"{r['cpu_time_ratio']:.3f} | {mem} | {mem_ratio} |"
        )
    lines += [
        "",
        "| model | method | module calls | aten ops | GFLOP | tensor MB taken + returned | ops × full | flops × full "
        "| bytes × full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w, x = r["work"], r["work_ratio"]
        lines.append(
            f"| {r['model']} | {r['method']} | {w['modules']:,} | {w['ops']:,} | {w['flops'] / 1e9:,.2f} | "
            f"{w['bytes'] / 2**20:,.1f} | {x['ops']:.3f} | {x['flops']:.3f} | {x['bytes']:.4f} |"
        )
    versus = [r for r in results if "normonly_over" in r]
    if versus:
        lines += [
            "",
            "| model | normonly ÷ method | step time, median of per-round ratios (IQR) | module calls | aten ops "
            "| flops | bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in versus:
            v = r["normonly_over"]
            lo, hi = v["time_quartiles"]
            lines.append(
                f"| {r['model']} | {r['method']} | {v['time']:.3f} ({lo:.3f}–{hi:.3f}) | {v['modules']:.3f} | "
                f"{v['ops']:.3f} | {v['flops']:.3f} | {v['bytes']:.5f} |"
            )
    if evals:
        keys = list(next(iter(evals.values())))
        lines += ["", "| model (norm-only, eval forward) | " + " | ".join(f"{k} (ms)" for k in keys) + " |"]
        lines.append("|---|" + "---|" * len(keys))
        for name, row in evals.items():
            lines.append(f"| {name} | " + " | ".join(f"{1000 * row[k]:,.1f}" for k in keys) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from {list(SPECS)}")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {METHODS}; 'full' always runs"
    )
    p.add_argument("--quick", action="store_true", help="small models and batches: the whole run takes < 3 min on CPU")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per model (the median is reported)")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="steps per method per round; 0: enough for ~1 s of full fine-tuning (0.1 s quick)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the rounds")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for timing and memory probes")
    p.add_argument("--channels-last", action="store_true", help="CNNs and their images in channels_last, all methods")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory via torch.cuda.max_memory_allocated)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--eval", action="store_true", help="also time eval forward passes: autograd on, no_grad, eval_mode")
    p.add_argument("--output", type=Path, help="write the results as JSON here (a .md table is written beside it)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = ["full"] + [m for m in args.methods.split(",") if m and m != "full"]
    bad = [m for m in args.models if m not in SPECS] + [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown model(s)/method(s) {bad}; models: {list(SPECS)}; methods: {METHODS}")
    if args.repeats < 1 or args.warmup < 1 or args.steps < 0 or args.threads < 1:
        p.error("--repeats, --warmup and --threads must be >= 1 and --steps >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    return args


def main(argv=None):
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    pool_context = multiprocessing.get_context("forkserver")
    pool_context.set_forkserver_preload(["torch", "torchvision", "transformers", "peft", "normonly"])
    started = time.time()
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "channels_last": args.channels_last,
        "repeats": args.repeats,
        "load_before": os.getloadavg(),
        "optimizer": "AdamW(lr=1e-5, weight_decay=0.01, fused=True) for every method but normonly-plain",
    }
    results, evals = [], {}
    for name in args.models:
        spec = SPECS[name]
        print(f"{name} ({spec.describe(args.quick)})", file=sys.stderr, flush=True)
        times = bench_time(name, args.methods, args, device)
        full = times["full"]
        for method in args.methods:
            t = times[method]
            # ratio to full fine-tuning in the same round, then the median over rounds
            paired = _paired(t["round_seconds"], full["round_seconds"])
            cpu_paired = _paired(t["cpu_round_seconds"], full["cpu_round_seconds"])
            row = {"model": name, "input": spec.describe(args.quick), "method": method, **t}
            row["time_ratio"] = statistics.median(paired)
            row["time_ratio_quartiles"] = _quartiles(paired)
            row["cpu_time_ratio"] = statistics.median(cpu_paired)
            row["ratio_of_medians"] = t["step_seconds"] / full["step_seconds"]
            row["work_ratio"] = _work_ratio(t["work"], full["work"])
            if "normonly" in times and method not in ("full", "normonly"):
                row["normonly_over"] = normonly_over(times["normonly"], t)
            if not args.no_memory:
                row["peak_bytes"] = memory_in_subprocess(pool_context, name, method, args)
            results.append(row)
        if not args.no_memory:
            for row in results[-len(args.methods) :]:
                row["peak_ratio"] = row["peak_bytes"] / results[-len(args.methods)]["peak_bytes"]
        if args.eval:
            evals[name] = bench_eval(name, args, device)
    meta["load_after"] = os.getloadavg()
    meta["seconds"] = round(time.time() - started, 1)
    table = markdown(results, evals, meta)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"meta": meta, "results": results, "eval": evals}, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
