"""What a Trainer checkpoint of a norm-only fine-tune holds: stock ``Trainer`` vs ``NormOnlyTrainer``, file by file.

A BERT-base-sized BertForSequenceClassification (random weights, nothing downloaded) is trained for one step on
random tokens with LayerNorm γ/β and a new 2-class head trainable, once frozen with ``freeze_all_but_norm`` and
stock ``transformers.Trainer``, once as a ``NormOnlyModel`` with ``NormOnlyTrainer``; each writes checkpoint-1.

    PYTHONPATH=. python scripts/trainer_checkpoints.py --output results/trainer_checkpoints.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
import transformers

import normonly
from normonly import NormOnlyConfig, NormOnlyTrainer, get_normonly_model


def bert_base() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))


def checkpoint_files(trainer_class, model, output_dir: Path) -> dict[str, int]:
    """Train one step, save checkpoint-1, return {file: bytes}."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (8, 32), generator=g)
    data = [{"input_ids": ids[i], "labels": int(ids[i, 0] % 2)} for i in range(8)]
    args = transformers.TrainingArguments(
        str(output_dir), max_steps=1, save_steps=1, per_device_train_batch_size=8, use_cpu=True, report_to=[]
    )
    trainer_class(model=model, args=args, train_dataset=data).train()
    folder = output_dir / "checkpoint-1"
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="write the results as JSON here (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        stock_model = normonly.freeze_all_but_norm(bert_base(), extra_trainable=["classifier"])
        stock = checkpoint_files(transformers.Trainer, stock_model, Path(tmp) / "stock")
        model = get_normonly_model(bert_base(), NormOnlyConfig(modules_to_save=["classifier"]))
        ours = checkpoint_files(NormOnlyTrainer, model, Path(tmp) / "normonly")
    trainable, total = normonly.count_parameters(model.base_model)
    results = {
        "model": "BertForSequenceClassification, BERT-base config, random weights",
        "trainable_params": trainable,
        "total_params": total,
        "stock_trainer_files": stock,
        "normonly_trainer_files": ours,
        "stock_trainer_bytes": sum(stock.values()),
        "normonly_trainer_bytes": sum(ours.values()),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
