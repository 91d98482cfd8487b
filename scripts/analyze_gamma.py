"""γ/β analysis of trained recipes/resnet_cifar.py runs: histograms, disabled channels per layer, dead ReLUs.

    python scripts/analyze_gamma.py runs/frankle/r14-norm runs/frankle/r14-all --out results/frankle/gamma
    # -> results/frankle/gamma.json and results/frankle/gamma.png

Each run folder needs the config.json and model.safetensors the recipe writes. The initialization of the
first run (same depth, width and seed, before training) is added as the reference "init".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from normonly.analysis import DISABLED_THRESHOLD, dead_relu_fraction, gamma_stats, plot_gamma
from normonly.baselines import train_random_per_channel
from normonly.data import load_cifar10, normalize
from normonly.models import cifar_resnet


def load_run(run: Path) -> tuple[dict, torch.nn.Module]:
    for f in ("config.json", "model.safetensors"):
        if not (run / f).is_file():
            raise SystemExit(f"error: {run / f} is missing; pass folders written by recipes/resnet_cifar.py")
    config = json.loads((run / "config.json").read_text())
    torch.manual_seed(config["seed"])
    model = cifar_resnet(config["depth"], config["width"])
    if config["train"] == "random":
        train_random_per_channel(model, per_channel=2, seed=config["seed"])
    model.load_state_dict(load_file(run / "model.safetensors"))
    return config, model.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of recipes/resnet_cifar.py")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.json and OUT.png")
    p.add_argument("--threshold", type=float, default=DISABLED_THRESHOLD, help="|γ| below this = disabled")
    p.add_argument("--images", type=int, default=2000, help="test images for the dead-ReLU count (default 2000)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: the first run's)")
    args = p.parse_args(argv)

    runs = {}
    for run in args.runs:
        config, model = load_run(run)
        config["run_dir"] = str(run)
        runs[f"{run.name} ({config['train']})"] = (config, model)
    first = next(iter(runs.values()))[0]
    torch.manual_seed(first["seed"])
    runs["init"] = (first, cifar_resnet(first["depth"], first["width"]).eval())  # the same draw as set_seed(seed)

    recorded = Path(first["run_dir"]) / first["data"]  # recorded relative to the run folder (hub names as they are)
    x = load_cifar10(args.data or (str(recorded) if recorded.exists() else first["data"]), progress=False)["x_test"]
    x = x[: args.images]
    batches = [normalize(x[i : i + 500], channels_last=False) for i in range(0, len(x), 500)]
    report = {"threshold": args.threshold, "images": len(x), "runs": {}}
    for label, (config, model) in runs.items():
        # `bn` and every `bn1` feed a ReLU directly; `bn2` and the shortcut BatchNorms feed the residual sum
        relus = [n for n, _ in model.named_modules() if n == "relu" or n.endswith("relu1")]
        dead = dead_relu_fraction(model, batches, names=relus)
        stats = gamma_stats(model, args.threshold)
        layers = {layer["name"]: layer for layer in stats["layers"]}
        feeding = [n[: -len("relu1")] + "bn1" if n.endswith("relu1") else "bn" for n in relus]
        channels = [layers[n]["channels"] for n in feeding]
        stats["dead_after_relu_fraction"] = sum(f * c for f, c in zip(dead.values(), channels)) / sum(channels)
        stats["dead_after_relu_per_layer"] = dead
        for group, names in (("before_relu", feeding), ("before_add", [n for n in layers if n not in feeding])):
            n_ch = sum(layers[n]["channels"] for n in names)
            stats[f"disabled_fraction_{group}"] = (
                sum(layers[n]["disabled_fraction"] * layers[n]["channels"] for n in names) / n_ch
            )
        report["runs"][label] = {"accuracy": _accuracy(config, label), **stats}
        print(
            f"{label:28s} |γ|<{args.threshold}: {100 * stats['disabled_fraction']:5.1f} % of {stats['channels']} "
            f"channels (<0.01: {100 * stats['fraction_below']['0.01']:.1f} %, <0.1: "
            f"{100 * stats['fraction_below']['0.1']:.1f} %); BatchNorms feeding a ReLU: "
            f"{100 * stats['disabled_fraction_before_relu']:.1f} %, feeding the residual sum: "
            f"{100 * stats['disabled_fraction_before_add']:.1f} %; ReLU channels dead on every test input: "
            f"{100 * stats['dead_after_relu_fraction']:.1f} %"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot_gamma({label: model for label, (_, model) in runs.items()}, args.out.with_suffix(".png"), args.threshold)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return report


def _accuracy(config: dict, label: str) -> float | None:
    results = Path(config.get("run_dir", config["output"])) / "results.json"
    return None if label == "init" or not results.is_file() else json.loads(results.read_text())["accuracy"]


if __name__ == "__main__":
    main()
