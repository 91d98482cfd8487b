"""Table and figure of the Frankle sweep (scripts/frankle_sweep.py) from whatever runs have finished."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from normonly.analysis import DISABLED_THRESHOLD, gamma_stats
from normonly.checkpoint import load_checkpoint
from normonly.models import cifar_resnet


def trained_model(run_dir: Path, config: dict) -> torch.nn.Module:
    """The run's final network: the random base rebuilt from its seed, the last checkpoint's tensors on top."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("resnet_cifar", Path("recipes/resnet_cifar.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    model = cifar_resnet(config["depth"], config["width"], num_classes=10, seed=config["seed"])
    recipe.set_trainable(model, config["train"], config["seed"])
    load_checkpoint(run_dir, model=model)
    return model.eval()


def gamma_shares(model: torch.nn.Module) -> dict:
    """Share of BatchNorm channels with |γ| < 0.05: all of them, and those that feed a ReLU directly."""
    stats = gamma_stats(model, DISABLED_THRESHOLD)
    layers = {layer["name"]: layer for layer in stats["layers"]}
    feeding = [n for n in layers if n == "bn" or n.endswith("bn1")]  # bn2 and shortcut BNs feed the residual sum
    channels = sum(layers[n]["channels"] for n in feeding)
    before_relu = sum(layers[n]["disabled_fraction"] * layers[n]["channels"] for n in feeding) / channels
    return {"gamma_disabled": stats["disabled_fraction"], "gamma_disabled_before_relu": before_relu}


def backfill(run_dir: Path, results: dict) -> None:
    """curves.png and, for BatchNorm-only runs, adapter/ for runs finished before the recipe wrote them."""
    from normonly.models import base_spec
    from normonly.report import plot_curves
    from normonly.runs import save_run_weights

    if not (run_dir / "curves.png").exists():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        plot_curves(records, run_dir / "curves.png")
    if results["train"] == "norm" and not (run_dir / "adapter").exists():
        spec = base_spec("cifar_resnet", depth=results["depth"], width=results["width"], num_classes=10,
                         seed=results["seed"])
        save_run_weights(trained_model(run_dir, results), run_dir, method="norm", base_spec=spec)


def collect(folder: Path, plan) -> list[dict]:
    rows = []
    for run in plan:
        run_dir = folder / run.name
        if not (run_dir / "results.json").is_file():
            continue
        results = json.loads((run_dir / "results.json").read_text())
        row = {
            "name": run.name, "depth": run.depth, "width": run.width, "train": run.train, "epochs": run.epochs,
            "schedule": run.schedule, "precision": run.precision, "accuracy": results["accuracy"],
            "trainable_params": results["trainable_params"], "total_params": results["total_params"],
            "hours": results["seconds"] / 3600, "torch_threads": results.get("torch_threads"),
        }
        if run.train in ("norm", "all"):
            row.update(gamma_shares(trained_model(run_dir, results)))
        backfill(run_dir, results)
        rows.append(row)
    return rows


def write_report(folder: Path, plan, paper: dict) -> None:
    rows = collect(folder, plan)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({"runs": rows, "paper": {str(k): v for k, v in paper.items()}},
                                                  indent=2) + "\n")
    lines = [
        "| run | depth | width | trained | epochs | test accuracy | trainable | \\|γ\\| < 0.05 (all / before ReLU) | hours |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        gamma = (f"{100 * r['gamma_disabled']:.1f} % / {100 * r['gamma_disabled_before_relu']:.1f} %"
                 if "gamma_disabled" in r else "–")
        lines.append(
            f"| {r['name']} | {r['depth']} | {r['width']} | {r['train']} | {r['epochs']} {r['schedule']} | "
            f"{100 * r['accuracy']:.2f} % | {r['trainable_params']:,} | {gamma} | {r['hours']:.2f} |"
        )
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    plot(rows, paper, folder / "sweep.png")
    print(f"wrote {folder / 'table.md'}, {folder / 'sweep.json'} and {folder / 'sweep.png'} ({len(rows)} runs)")


def plot(rows: list[dict], paper: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = [r for r in rows if (r["epochs"], r["schedule"]) == (15, "cosine")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    styles = {"norm": ("BatchNorm only", "C0", "o"), "random": ("random params per channel", "C1", "s"),
              "output": ("output layer only", "C2", "^"), "all": ("full training", "C3", "D")}
    ax = axes[0]
    for mode, (label, color, marker) in styles.items():
        pts = sorted((r["depth"], r["accuracy"]) for r in budget if r["train"] == mode and r["width"] == 1)
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, label=f"{label} (15 epochs, this machine)")
    labelled = set()
    for (mode, depth, _width), acc in paper.items():
        label, color, _ = styles[mode]
        ax.scatter([depth], [acc], marker="*", s=160, color=color, edgecolor="black", zorder=5,
                   label=None if mode in labelled else f"Frankle et al., {label} (160 epochs)")
        labelled.add(mode)
    full_schedule = [r for r in rows if r["train"] == "norm" and (r["epochs"], r["schedule"]) == (160, "multistep")]
    if full_schedule:
        ax.scatter([r["depth"] for r in full_schedule], [r["accuracy"] for r in full_schedule], marker="P", s=90,
                   color="C0", edgecolor="black", zorder=6, label="BatchNorm only (160 epochs, this machine)")
    ax.set(xscale="log", xlabel="ResNet depth", ylabel="CIFAR-10 test accuracy", title="accuracy against depth",
           ylim=(0.1, 0.9))
    ax.set_xticks([14, 20, 32, 56, 110, 218, 866], ["14", "20", "32", "56", "110", "218", "866"])
    ax = axes[1]
    for mode, (label, color, marker) in styles.items():
        pts = sorted((r["width"], r["accuracy"]) for r in budget if r["train"] == mode and r["depth"] == 14)
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
    ax.set(xscale="log", xlabel="width multiplier k (WRN-14-k)", ylabel="CIFAR-10 test accuracy",
           title="accuracy against width (ResNet-14)")
    ax.set_xticks([1, 2, 4], ["1", "2", "4"])
    ax.set_xlim(0.8, 5)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[2]
    for mode in ("norm", "all"):
        label, color, marker = styles[mode]
        pts = sorted((r["depth"], r["gamma_disabled"], r["gamma_disabled_before_relu"])
                     for r in budget if r["train"] == mode and r["width"] == 1 and "gamma_disabled" in r)
        if pts:
            depth, share, relu = zip(*pts)
            ax.plot(depth, [100 * s for s in share], marker=marker, color=color, label=f"{label}: all channels")
            ax.plot(depth, [100 * s for s in relu], marker=marker, color=color, linestyle="--",
                    label=f"{label}: channels feeding a ReLU")
    full_gamma = [r for r in full_schedule if "gamma_disabled" in r]
    if full_gamma:
        ax.scatter([r["depth"] for r in full_gamma for _ in range(2)],
                   [100 * r[key] for r in full_gamma for key in ("gamma_disabled", "gamma_disabled_before_relu")],
                   marker="P", s=90, color="C0", edgecolor="black", zorder=6,
                   label="BatchNorm only, 160 epochs: all / feeding a ReLU")
    ax.axhspan(25, 50, color="green", alpha=0.1, label="Frankle et al.: a quarter to a half")
    ax.set(xscale="log", xlabel="ResNet depth", ylabel="% of BatchNorm channels with |γ| < 0.05", ylim=(0, 100),
           title="channels that γ switches off")
    ax.set_xticks([14, 20, 32, 56, 110], ["14", "20", "32", "56", "110"])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())  # log axes: only the depths and widths are labelled
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # the depth panel's legend goes below the panels, clear of the paper's marks
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
