"""Frankle et al.'s trend on this machine: BatchNorm-only accuracy across depth and width, with its controls.

    python scripts/frankle_sweep.py --list            # every run, its exact command and its state
    nohup python scripts/frankle_sweep.py > runs/sweep.log 2>&1 &   # run what is unfinished, one after another
    python scripts/frankle_sweep.py --report          # table + figure from whatever has finished
    python scripts/frankle_sweep.py --gpu --list      # Frankle's full 160-epoch sweep, for a GPU machine

Every CPU run shares one budget: 15 epochs, cosine schedule, seed 0, bf16 autocast, one thread, full CIFAR-10
(JPEG q75 copy). Run folders live in results/frankle/sweep/NAME/ and are committed with their (kilobyte-sized)
checkpoints, so an interrupted sweep resumes in a later session: each run is started with --resume. After each
run the table (results/frankle/sweep/table.md, sweep.json) and figure (sweep.png) are rebuilt.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path("results/frankle/sweep")
GPU_RUNS = Path("runs/frankle-gpu")
DATA = "../shared/data/cifar10"
# Frankle, Schwab & Morcos (ICLR 2021), BatchNorm-only CIFAR-10 test accuracy read off their Figure 2 / text
PAPER = {("norm", 14, 1): 0.48, ("norm", 110, 1): 0.695, ("norm", 866, 1): 0.82, ("random", 866, 1): 0.56}


@dataclass(frozen=True)
class Run:
    depth: int
    width: int
    train: str
    epochs: int = 15
    schedule: str = "cosine"
    precision: str = "bf16"

    @property
    def name(self) -> str:
        mode = self.train.replace("+", "-")
        budget = "" if (self.epochs, self.schedule) == (15, "cosine") else f"-e{self.epochs}-{self.schedule}"
        return f"r{self.depth}-w{self.width}-{mode}{budget}"

    def command(self, folder: Path, extra: tuple[str, ...] = ()) -> list[str]:
        return [
            "recipes/resnet_cifar.py", "--depth", str(self.depth), "--width", str(self.width), "--train", self.train,
            "--epochs", str(self.epochs), "--schedule", self.schedule, "--mixed-precision", self.precision,
            "--seed", "0", "--data", DATA, "--output", str(folder / self.name), "--keep-checkpoints", "1",
            "--report-to", "none", "--log-every", "50", *extra, "--resume",
        ]


def cpu_plan() -> list[Run]:
    """In the order they run: the BatchNorm-only trend first, then its controls, widths, full training, 160 epochs."""
    depths = [14, 20, 32, 56, 110]
    plan = [Run(d, 1, "norm") for d in depths]
    plan += [Run(d, 1, "output") for d in depths]
    plan += [Run(d, 1, "random") for d in (14, 56, 110)]
    plan += [Run(14, w, "norm") for w in (2, 4)]
    plan += [Run(d, 1, "all") for d in (14, 56)]
    plan += [Run(14, 1, "norm", epochs=160, schedule="multistep")]
    plan += [Run(218, 1, "norm")]
    return plan


def gpu_plan() -> list[Run]:
    """Frankle's own sweep: 160 epochs, lr x0.1 at 80 and 120, every depth and width he ran."""
    plan = [Run(d, 1, m, 160, "multistep") for d in (14, 32, 56, 110, 218, 434, 866) for m in ("norm", "random", "output")]
    plan += [Run(14, w, m, 160, "multistep") for w in (2, 4, 8, 16, 32) for m in ("norm", "random", "output")]
    plan += [Run(d, 1, "all", 160, "multistep") for d in (14, 56, 110)]
    return plan


# GPU times are ESTIMATES (no GPU was available to measure): a step costs the larger of its arithmetic at an assumed
# 150 TFLOP/s of bf16 convolution and its kernel launches (about 30 a layer per training step, 10 µs each)
GPU_FLOPS, LAUNCH_SECONDS, LAUNCHES_PER_LAYER = 150e12, 10e-6, 30


def forward_flops(depth: int, width: int) -> int:
    """Multiply-adds x 2 of one 32x32 image through CIFAR ResNet-depth-width (convolutions and the output layer)."""
    n, flops, size, channels = (depth - 2) // 6, 0, 32, 16 * width
    flops += 2 * 3 * channels * 9 * size * size
    for stage, out in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            size //= stride
            flops += 2 * channels * out * 9 * size * size + 2 * out * out * 9 * size * size
            if stride != 1 or channels != out:
                flops += 2 * channels * out * size * size
            channels = out
    return flops + 2 * channels * 10


def gpu_hours_estimate(run: Run, batch: int = 128, steps_per_epoch: int = 390) -> float:
    compute = 3 * forward_flops(run.depth, run.width) * batch / GPU_FLOPS  # forward + backward
    launches = (run.depth + 2) * LAUNCHES_PER_LAYER * LAUNCH_SECONDS
    return max(compute, launches) * steps_per_epoch * run.epochs / 3600


def state(folder: Path) -> str:
    if (folder / "results.json").is_file():
        return f"done ({json.loads((folder / 'results.json').read_text())['accuracy']:.4f})"
    checkpoints = sorted((folder / "checkpoints").glob("step_*"))
    return f"in progress (step {int(checkpoints[-1].name[5:])})" if checkpoints else "not started"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print every run, its command and state, and exit")
    p.add_argument("--report", action="store_true", help="only rebuild the table and figure from finished runs")
    p.add_argument("--gpu", action="store_true", help="Frankle's full 160-epoch sweep into runs/frankle-gpu/ "
                   "(on a GPU machine: bf16, one process; add --launch-args for several GPUs)")
    p.add_argument("--only", nargs="+", default=None, help="run only these run names (see --list)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; recorded per run)")
    p.add_argument("--check", metavar="NAME", default=None, help="rerun NAME's first epoch with its recorded command "
                   "(into a temporary folder) and compare its test accuracy with NAME's metrics.jsonl")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    folder, plan = (GPU_RUNS, gpu_plan()) if args.gpu else (SWEEP, cpu_plan())
    if args.only:
        unknown = sorted(set(args.only) - {r.name for r in plan})
        if unknown:
            p.error(f"--only: no run named {unknown}; see --list")
        plan = [r for r in plan if r.name in args.only]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    if args.check:
        run = next((r for r in plan if r.name == args.check), None)
        if run is None:
            p.error(f"--check: no run named {args.check!r}; see --list")
        check_first_epoch(run, folder, env)
        return
    if args.list:
        for run in plan:
            estimate = f"~{gpu_hours_estimate(run):.1f} GPU h (estimate)  " if args.gpu else ""
            print(f"{run.name:32s} {state(folder / run.name):24s} {estimate}OMP_NUM_THREADS={args.threads} python "
                  f"{shlex.join(run.command(folder))}")
        if args.gpu:
            total = sum(gpu_hours_estimate(r) for r in plan)
            print(f"total ~{total:.0f} GPU hours on one H100-class GPU (an estimate from FLOPs and kernel launches, "
                  "not a measurement); the runs are independent: spread them over GPUs with --only")
        return
    if not args.report:
        for run in plan:
            if state(folder / run.name).startswith("done"):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {state(folder / run.name)}", flush=True)
            done = subprocess.run([sys.executable, *run.command(folder)], env=env)
            if done.returncode != 0:
                print(f"{run.name} exited with {done.returncode}; rerun this script to resume it", flush=True)
                if done.returncode in (130, 143):  # stopped by a signal: stop the sweep too
                    return
            if not args.gpu:
                report(plan=cpu_plan())
    if not args.gpu:
        report(plan=cpu_plan())


def check_first_epoch(run: Run, folder: Path, env: dict) -> bool:
    """Rerun ``run``'s recorded command until its first epoch is logged (then stop it with SIGTERM, which the recipe
    handles) and compare the test accuracy with the committed metrics.jsonl; prints the verdict."""
    import signal
    import tempfile

    committed = json.loads((folder / run.name / "metrics.jsonl").read_text().splitlines()[0])
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, *run.command(Path(tmp))]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = Path(tmp) / run.name / "metrics.jsonl"
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        rerun = json.loads(metrics.read_text().splitlines()[0])
    same = rerun["test_accuracy"] == committed["test_accuracy"]
    print(f"{run.name} epoch 1: committed test accuracy {committed['test_accuracy']:.4f}, rerun "
          f"{rerun['test_accuracy']:.4f}: {'identical' if same else 'DIFFERENT'} "
          f"(OMP_NUM_THREADS={env['OMP_NUM_THREADS']})")
    return same


def report(plan: list[Run]) -> None:
    """Write results/frankle/sweep/{table.md, sweep.json, sweep.png} from the finished runs."""
    from sweep_report import write_report

    write_report(SWEEP, plan, PAPER)


if __name__ == "__main__":
    main()
