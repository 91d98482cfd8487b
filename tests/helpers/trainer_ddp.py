"""NormOnlyTrainer on tiny BERT under DDP; run by tests/test_trainer.py with 2 CPU processes:

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/trainer_ddp.py OUTPUT_DIR [--resume] [--reentrant]

``--reentrant`` turns on activation checkpointing with ``use_reentrant=True``.

Each rank writes OUTPUT_DIR/rank<r>.safetensors with its adapter values at the end.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapter_helpers import tiny_bert  # noqa: E402

from normonly import NormOnlyConfig, NormOnlyTrainer, get_normonly_model  # noqa: E402
from normonly.runs import end_process  # noqa: E402

output, resume, reentrant = Path(sys.argv[1]), "--resume" in sys.argv, "--reentrant" in sys.argv
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 99, (32, 8), generator=g)
data = [{"input_ids": ids[i], "labels": int(ids[i, 0] % 3)} for i in range(32)]
model = get_normonly_model(tiny_bert(), NormOnlyConfig(modules_to_save=["classifier"]))
args = transformers.TrainingArguments(
    str(output),
    per_device_train_batch_size=4,
    learning_rate=0.02,
    lr_scheduler_type="constant",
    max_steps=4,
    save_steps=2,
    use_cpu=True,
    report_to=[],
    disable_tqdm=True,
    seed=0,
    activation_checkpointing=reentrant,
    activation_checkpointing_kwargs={"use_reentrant": True} if reentrant else None,
)
trainer = NormOnlyTrainer(model=model, args=args, train_dataset=data)
trainer.train(resume_from_checkpoint=True if resume else None)
assert dist.get_world_size() == 2, "expected 2 processes"
trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
values = {k: v.contiguous() for k, v in model.base_model.state_dict().items() if k in trainable}
save_file(values, str(output / f"rank{dist.get_rank()}.safetensors"))
end_process()  # see its docstring: a gloo rank can abort in the interpreter's shutdown
