"""Benchmark norm-only adapters against full checkpoints: size on disk, set_adapter, save and load time.

Models have random weights (nothing is downloaded): torchvision ResNet-50 (BatchNorm γ/β plus running
statistics, or γ/β alone with bn_stats="freeze") and a BERT-base-sized BertForSequenceClassification
(LayerNorm γ/β plus a new 2-class head). Everything runs on the CPU, one thread, side by side in one run.

    PYTHONPATH=. python scripts/bench_adapters.py --output results/bench_adapters.json
    PYTHONPATH=. python scripts/bench_adapters.py --repeats 50          # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
import transformers
from safetensors.torch import load_file, save_file

import normonly
from normonly import NormOnlyConfig, get_normonly_model


def build(name: str):
    torch.manual_seed(0)
    if name.startswith("resnet50"):
        return torchvision.models.resnet50()
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))  # 110M, BERT-base


CASES = {
    "resnet50 (BN γ/β + running stats)": NormOnlyConfig(),
    "resnet50 (BN γ/β, bn_stats=freeze)": NormOnlyConfig(bn_stats="freeze"),
    "bert-base (LayerNorm γ/β + 2-class head)": NormOnlyConfig(modules_to_save=["classifier"]),
}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(name: str, config: NormOnlyConfig, repeats: int, tmp: Path) -> dict:
    base = build(name)
    full_state = {k: v.contiguous() for k, v in base.state_dict().items()}
    full_path = tmp / "full.safetensors"
    full_save = timed(lambda: save_file(full_state, full_path), 3)
    full_load = timed(lambda: base.load_state_dict(load_file(full_path)), 3)

    model = get_normonly_model(base, config, adapter_name="a")
    model.add_adapter("b", replace(config, init="frankle"))
    trainable, total = model.get_nb_trainable_parameters()
    switch = timed(lambda: [model.set_adapter(n) for n in ("b", "a")], repeats)  # two switches per sample
    adapter_dir = tmp / "adapter" / "a"  # as in peft, a non-default adapter goes to a subfolder
    save = timed(lambda: model.save_pretrained(adapter_dir.parent, selected_adapters=["a"]), max(repeats // 10, 5))

    def load():
        model.load_adapter(adapter_dir, adapter_name="c")
        model.delete_adapter("c")

    load_times = timed(load, max(repeats // 10, 5))
    adapter_bytes = folder_bytes(adapter_dir)
    return {
        "model": name,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_tensors": len(load_file(adapter_dir / "adapter_model.safetensors")),
        "adapter_bytes": adapter_bytes,
        "full_checkpoint_bytes": full_path.stat().st_size,
        "size_ratio": full_path.stat().st_size / adapter_bytes,
        "set_adapter_median_ms": statistics.median(switch) / 2 * 1e3,
        "set_adapter_p90_ms": sorted(switch)[int(0.9 * len(switch))] / 2 * 1e3,
        "adapter_save_median_ms": statistics.median(save) * 1e3,
        "adapter_load_median_ms": statistics.median(load_times) * 1e3,
        "full_save_median_ms": statistics.median(full_save) * 1e3,
        "full_load_median_ms": statistics.median(full_load) * 1e3,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | trainable / total | adapter on disk | full checkpoint | smaller by | set_adapter median (p90) "
        "| adapter save / load | full save / load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trainable_params']:,} / {r['total_params']:,} | {r['adapter_bytes'] / 1e3:,.1f} kB "
            f"| {r['full_checkpoint_bytes'] / 1e6:,.1f} MB | {r['size_ratio']:,.0f}× "
            f"| {r['set_adapter_median_ms']:.3f} ms ({r['set_adapter_p90_ms']:.3f}) "
            f"| {r['adapter_save_median_ms']:.1f} / {r['adapter_load_median_ms']:.1f} ms "
            f"| {r['full_save_median_ms']:,.0f} / {r['full_load_median_ms']:,.0f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="set_adapter samples (save/load use a tenth)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, config in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(bench(name, config, args.repeats, Path(tmp)))
        print(f"done: {name}", flush=True)
    print(table(rows))
    if args.output:
        env = {
            "torch": torch.__version__,
            "normonly": normonly.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "repeats": args.repeats,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
