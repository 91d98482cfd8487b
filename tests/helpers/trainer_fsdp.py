"""NormOnlyTrainer on a tiny random Llama, one process or several; run by tests/test_trainer.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/trainer_fsdp.py OUTPUT_DIR --fsdp [--resume]
    python tests/helpers/trainer_fsdp.py OUTPUT_DIR
    python -m torch.distributed.run --nproc_per_node 1 tests/helpers/trainer_fsdp.py OUTPUT_DIR --refusals

Every run sees the same global batches of 8 sequences (per process: 8 / processes). ``--fsdp`` passes
``TrainingArguments(fsdp=True)``. Writes OUTPUT_DIR/rank<r>.json: the parameter bytes this rank holds, whether its
frozen weights and its adapter are sharded, and the losses. ``--gradient-checkpointing`` turns it on. ``--refusals`` instead tries fsdp_configs that
NormOnlyTrainer refuses and writes OUTPUT_DIR/refusals.json: each error, and whether the model was left unsharded.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.tensor import DTensor

from normonly import NormOnlyConfig, NormOnlyTrainer, get_normonly_model
from normonly.runs import end_process

output, fsdp, resume = Path(sys.argv[1]), "--fsdp" in sys.argv, "--resume" in sys.argv
checkpointing = "--gradient-checkpointing" in sys.argv
BAD_CONFIGS = {
    "fsdp1": {"version": 1},
    "size_based_wrap": {"version": 2, "auto_wrap_policy": "SIZE_BASED_WRAP"},
    "fsdp_activation_checkpointing": {"version": 2, "activation_checkpointing": True},
    "unknown_block": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
}
torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
g = torch.Generator().manual_seed(0)
starts = torch.randint(0, 20, (64,), generator=g)
data = [{"input_ids": (torch.arange(12) + s) % 40 + 3, "labels": (torch.arange(12) + s) % 40 + 3} for s in starts]
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=43, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, head_dim=8, max_position_embeddings=64)
model = get_normonly_model(transformers.LlamaForCausalLM(config), NormOnlyConfig())


def arguments(fsdp_config: dict | None) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        str(output),
        per_device_train_batch_size=8 // world,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=checkpointing,
        fsdp=fsdp_config is not None,
        fsdp_config=fsdp_config,
    )


if "--refusals" in sys.argv:
    errors = {}
    for name, bad in BAD_CONFIGS.items():
        try:
            NormOnlyTrainer(model=model, args=arguments(bad), train_dataset=data)
        except ValueError as err:
            errors[name] = str(err)
    unsharded = not any(isinstance(p, DTensor) for p in model.parameters())
    (output / "refusals.json").write_text(json.dumps({"errors": errors, "unsharded": unsharded}))
    sys.exit()

trainer = NormOnlyTrainer(model=model, args=arguments({"version": 2} if fsdp else None), train_dataset=data)
trainer.train(resume_from_checkpoint=True if resume else None)
rank = dist.get_rank() if dist.is_initialized() else 0
params = list(model.base_model.named_parameters())
local = [p.to_local() if isinstance(p, DTensor) else p for _, p in params]
report = {
    "processes": world,
    "parameter_bytes": sum(t.numel() * t.element_size() for t in local),
    "frozen_sharded": all(isinstance(p, DTensor) for _, p in params if not p.requires_grad),
    "adapter_sharded": all(isinstance(p, DTensor) for _, p in params if p.requires_grad),
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
}
(output / f"rank{rank}.json").write_text(json.dumps(report))
trainer.save_model(str(output / "final"))
end_process()  # every file is written; see its docstring: a gloo rank can abort in the interpreter's shutdown
