"""Print the README's fine-tuning table (markdown) from the recipes' results.json files.

    python scripts/finetune_table.py results/finetune/sst2-*.json
    python scripts/finetune_table.py results/finetune/cifar10-*.json
"""

import argparse
import json
from pathlib import Path

ORDER = ("norm", "head", "bitfit", "lora", "full")
LABEL = {"norm": "norm (γ/β + head)", "head": "head only", "bitfit": "BitFit (biases + head)",
         "lora": "LoRA r=8 (+ head)", "full": "full fine-tuning"}


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def table(results: list[dict]) -> str:
    rows = ["| method | accuracy | trainable params | adapter size | time / epoch |", "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: ORDER.index(r["method"])):
        rows.append(f"| {LABEL[r['method']]} | {100 * r['accuracy']:.1f} % | {r['trainable_params']:,} "
                    f"({r['trainable_percent']:.3g} %) | {size(r['adapter_bytes'])} | {r['seconds_per_epoch'] / 60:.1f} min |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="results.json files, one per method")
    print(table([json.loads(f.read_text()) for f in p.parse_args(argv).files]))


if __name__ == "__main__":
    main()
