"""What trained normalization layers do: γ/β statistics, channels that γ disables, dead ReLU channels, plots.

Frankle et al. report that BatchNorm-only training drives γ to near zero for "a quarter to a half" of the
channels. ``gamma_stats`` measures that per layer: a channel counts as *disabled* when ``|γ| < threshold``
(default 0.05, i.e. under 5 % of the mean |γ| = 0.5 of the U[0, 1] initialization; fractions at 0.01 and 0.1 are
reported too). ``dead_relu_fraction`` checks the functional effect: the channels of a ReLU that output zero for
every position of every input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .detect import norm_layers

__all__ = ["DISABLED_THRESHOLD", "dead_relu_fraction", "gamma_stats", "plot_gamma"]

DISABLED_THRESHOLD = 0.05
THRESHOLDS = (0.01, 0.05, 0.1)


def _share(mask: torch.Tensor) -> float:
    return int(mask.sum()) / mask.numel()


def _affine_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in norm_layers(model) if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no normalization layer with an affine γ")
    return layers


@torch.no_grad()
def gamma_stats(
    model: nn.Module, threshold: float = DISABLED_THRESHOLD, thresholds: Iterable[float] = THRESHOLDS
) -> dict:
    """γ/β summary of every affine normalization layer of ``model``, JSON-ready.

    Returns ``{"threshold", "channels", "disabled_fraction", "fraction_below": {t: f}, "gamma_abs_mean",
    "layers": [{"name", "channels", "disabled_fraction", "fraction_below", "gamma_abs_mean", "gamma_abs_median",
    "beta_mean", "beta_negative_fraction"}, ...]}``; fractions are over channels, the totals weight layers by
    their channel count.

    >>> gamma_stats(model)["disabled_fraction"]   # share of channels with |γ| < 0.05
    """
    thresholds = sorted(set(thresholds) | {threshold})
    layers, gammas = [], []
    for name, m in _affine_layers(model):
        g = m.weight.detach().float().abs().flatten().cpu()
        b = m.bias.detach().float().flatten().cpu() if isinstance(m.bias, torch.Tensor) else torch.zeros_like(g)
        gammas.append(g)
        layers.append(
            {
                "name": name,
                "channels": g.numel(),
                "disabled_fraction": _share(g < threshold),
                "fraction_below": {str(t): _share(g < t) for t in thresholds},
                "gamma_abs_mean": float(g.mean()),
                "gamma_abs_median": float(g.median()),
                "beta_mean": float(b.mean()),
                "beta_negative_fraction": _share(b < 0),
            }
        )
    g = torch.cat(gammas)
    return {
        "threshold": threshold,
        "channels": g.numel(),
        "disabled_fraction": _share(g < threshold),
        "fraction_below": {str(t): _share(g < t) for t in thresholds},
        "gamma_abs_mean": float(g.mean()),
        "layers": layers,
    }


@torch.inference_mode()
def dead_relu_fraction(model: nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str] | None = None) -> dict:
    """Per ``nn.ReLU`` module (or the ``names`` given): the fraction of channels whose output is zero at every
    position of every input in ``batches``, with the model in eval mode. Returns ``{name: fraction, ...}``.

    For a ReLU right after a BatchNorm, a channel with γ ≈ 0 and β ≤ 0 is dead: γ has switched it off.
    """
    modules = dict(model.named_modules())
    names = list(names) if names is not None else [n for n, m in modules.items() if isinstance(m, nn.ReLU)]
    unknown = [n for n in names if n not in modules]
    if unknown or not names:
        raise ValueError(f"no ReLU modules to watch (unknown names: {unknown})")
    alive: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inputs, output):
            active = (output > 0).flatten(2).any(2).any(0) if output.dim() > 2 else (output > 0).any(0)
            alive[name] = alive[name] | active if name in alive else active

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: 1 - _share(alive[n]) for n in names if n in alive}


def plot_gamma(runs: Mapping[str, nn.Module], path: str | Path, threshold: float = DISABLED_THRESHOLD) -> Path:
    """Save a PNG: histograms of γ and β over all channels for each run, and the disabled fraction per layer.

    ``runs`` maps a label ("norm-only", "all", "init", ...) to a model. Needs matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_gamma needs matplotlib: pip install matplotlib (or normonly[dev])") from err
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for label, model in runs.items():
        layers = _affine_layers(model)
        g = torch.cat([m.weight.detach().float().flatten().cpu() for _, m in layers]).numpy()
        b = torch.cat([m.bias.detach().float().flatten().cpu() for _, m in layers]).numpy()
        stats = gamma_stats(model, threshold)
        axes[0].hist(g, bins=80, histtype="step", linewidth=1.5, label=f"{label} ({100 * stats['disabled_fraction']:.0f} % |γ|<{threshold})")
        axes[1].hist(b, bins=80, histtype="step", linewidth=1.5, label=label)
        axes[2].plot([100 * layer["disabled_fraction"] for layer in stats["layers"]], marker="o", label=label)
    axes[0].axvspan(-threshold, threshold, color="grey", alpha=0.2)
    axes[0].set(title="γ over all BatchNorm channels", xlabel="γ", ylabel="channels")
    axes[1].set(title="β over all BatchNorm channels", xlabel="β", yscale="log")
    names = [n for n, _ in _affine_layers(next(iter(runs.values())))]
    axes[2].set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes[2].axhspan(25, 50, color="green", alpha=0.1, label="Frankle et al.: a quarter to a half")
    axes[2].set(title=f"channels with |γ| < {threshold}, per layer", ylabel="% of channels", ylim=(0, 100))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
