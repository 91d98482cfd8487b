"""How much memory a norm-only forward pass saves for backward, plain and inside normonly.lean_frozen_convs().

Counts every distinct tensor storage that autograd saves (torch.autograd.graph.saved_tensors_hooks), leaving out
the model's own parameters, for torchvision models with random weights, norm-only (freeze_all_but_norm), in
train mode. Also checks that both ways give bit-identical γ/β gradients.

    PYTHONPATH=. python scripts/saved_activations.py --output results/perf/saved_activations.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision

import normonly

MODELS = ["efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "regnet_y_400mf", "resnet18", "resnet50"]


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, lean: bool) -> tuple[int, list[torch.Tensor]]:
    """Bytes saved for backward by one forward pass, and the trainable parameters' gradients after backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout / stochastic-depth draws both ways
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with normonly.lean_frozen_convs() if lean else torch.enable_grad():
            loss = model(x).pow(2).mean()
    loss.backward()
    return sum(storages.values()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="torchvision model names")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--output", type=Path, help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print("| model | saved, plain | saved, lean_frozen_convs() | gradients identical |\n|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = normonly.freeze_all_but_norm(getattr(torchvision.models, name)()).train()
        x = torch.randn(args.batch, 3, args.size, args.size)
        plain, g_plain = saved_bytes(model, x, lean=False)
        lean, g_lean = saved_bytes(model, x, lean=True)
        same = all(torch.equal(a, b) for a, b in zip(g_plain, g_lean))
        rows.append({"model": name, "plain_bytes": plain, "lean_bytes": lean, "identical_gradients": same})
        print(
            f"| {name} | {plain / 2**20:.1f} MB | {lean / 2**20:.1f} MB ({100 * (lean / plain - 1):+.0f} %) | {same} |"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"batch": args.batch, "size": args.size, "torch": torch.__version__}
        args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
