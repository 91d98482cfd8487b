"""Where a training step's time goes, from torch.profiler: per phase (forward, backward, optimizer) and op kind.

Same models, inputs and methods as scripts/bench_step.py. Each op's self CPU time is summed into its phase (the
record_function range it ran in) and a kind: convolutions and matrix products, normalization, dropout's random
numbers, softmax, and the rest (elementwise ops, copies, reductions). Milliseconds per step, averaged over --steps
profiled steps after warm-up.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/profile_step.py --models resnet50,bert-base \\
        --methods full,normonly --output results/perf/profile_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import METHODS, SPECS, _quiet, build_model, make_batch, prepare  # noqa: E402

PHASES = ("forward", "backward", "optimizer")
KINDS = {
    "conv / matmul": ("conv", "mm", "linear", "matmul"),
    "normalization": ("batch_norm", "layer_norm", "group_norm"),
    "dropout RNG": ("bernoulli", "dropout"),
    "softmax": ("softmax",),
}


def kind_of(op: str) -> str:
    return next((kind for kind, keys in KINDS.items() if any(k in op for k in keys)), "elementwise / other")


def profile_method(name: str, method: str, args) -> dict:
    spec = SPECS[name]
    inputs, labels = make_batch(spec, args.quick, torch.device("cpu"))
    model, opt = prepare(method, build_model(name, args.quick), spec)
    x = inputs.get("x")

    def step():
        with record_function("phase::forward"):
            out = model(x) if x is not None else model(**inputs)
            loss = torch.nn.functional.cross_entropy(out if isinstance(out, torch.Tensor) else out.logits, labels)
        with record_function("phase::backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("phase::optimizer"):
            opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    table = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("phase::"):
            continue
        top = event
        while top.cpu_parent is not None:
            top = top.cpu_parent
        phase = top.name.removeprefix("phase::") if top.name.startswith("phase::") else "outside"
        table[f"{phase} | {kind_of(event.name)}"] += event.self_cpu_time_total / 1000 / args.steps
    return dict(table)


def markdown(profiles: dict, quick: bool) -> str:
    lines = []
    for name, methods in profiles.items():
        keys = sorted({k for t in methods.values() for k in t}, key=lambda k: (PHASES.index(k.split(" | ")[0])
                      if k.split(" | ")[0] in PHASES else 9, k))  # fmt: skip
        lines += ["", f"**{name}** ({SPECS[name].describe(quick)}), ms per step (share of the step)", ""]
        lines.append("| phase | op kind | " + " | ".join(methods) + " |")
        lines.append("|---|---|" + "---|" * len(methods))
        totals = {m: sum(t.values()) for m, t in methods.items()}
        for key in keys:
            if max(t.get(key, 0) for t in methods.values()) < 0.5:
                continue
            cells = [f"{t.get(key, 0):,.0f} ({100 * t.get(key, 0) / totals[m]:.0f} %)" for m, t in methods.items()]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("| **total** | | " + " | ".join(f"**{v:,.0f}**" for v in totals.values()) + " |")
    return "\n".join(lines).strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="resnet50,bert-base", help=f"comma-separated, from {list(SPECS)}")
    p.add_argument("--methods", default="full,normonly", help=f"comma-separated, from {METHODS}")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per method, after 2 warm-up steps")
    p.add_argument("--quick", action="store_true", help="bench_step's --quick sizes")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--output", type=Path, help="write JSON here (and a .md table beside it)")
    args = p.parse_args(argv)
    models, methods = args.models.split(","), args.methods.split(",")
    bad = [m for m in models if m not in SPECS] + [m for m in methods if m not in METHODS]
    if bad or args.steps < 1:
        p.error(f"unknown model(s)/method(s) {bad} or --steps < 1; models: {list(SPECS)}; methods: {METHODS}")
    _quiet()
    torch.set_num_threads(args.threads)
    profiles = {name: {method: profile_method(name, method, args) for method in methods} for name in models}
    table = markdown(profiles, args.quick)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "torch": torch.__version__}
        args.output.write_text(json.dumps({"meta": meta, "profiles": profiles}, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
