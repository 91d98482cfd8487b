"""``NormOnlyTrainer``: ``transformers.Trainer`` for a ``NormOnlyModel``, with checkpoints that hold only the adapter.

Stock ``Trainer`` decides what to save and load by ``isinstance(model, (PreTrainedModel, PeftModel))``; any other
module gets its whole ``state_dict`` written to ``model.safetensors`` (the frozen base included), and it reads a
model's inputs and label names from the wrapper class's ``forward(*args, **kwargs)``, so it drops every dataset
column and computes no evaluation loss. This subclass changes only those points: it inspects the base model's
``forward``, saves each checkpoint with ``NormOnlyModel.save_pretrained`` and restores the trained adapter in place
on resume and for ``load_best_model_at_end``. Everything else (optimizer, scheduler, RNG and trainer state,
evaluation, logging, DDP) is ``Trainer``'s own.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from ..config import WEIGHTS_NAME
from ..model import NormOnlyModel

__all__ = ["NormOnlyTrainer"]


def _adapter_directory(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where ``NormOnlyModel.save_pretrained(save_directory)`` puts ``adapter_name``: the folder itself for
    ``"default"``, else a subfolder named after the adapter (as in peft)."""
    return Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name


class NormOnlyTrainer(Trainer):
    """``transformers.Trainer`` for a ``NormOnlyModel``: same arguments, checkpoints without the base model.

    >>> model = normonly.get_normonly_model(base, NormOnlyConfig(modules_to_save=["classifier"]))
    >>> trainer = NormOnlyTrainer(model=model, args=TrainingArguments("out", eval_strategy="steps",
    ...                           load_best_model_at_end=True), train_dataset=train, eval_dataset=val)
    >>> trainer.train()                               # out/checkpoint-*/ hold adapter_model.safetensors
    >>> trainer.train(resume_from_checkpoint=True)    # restores the adapter, optimizer, scheduler, RNG

    Each checkpoint folder holds what ``model.save_pretrained`` writes (every loaded adapter: ``"default"`` in the
    folder itself, others in subfolders) plus Trainer's ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
    ``trainer_state.json`` and ``training_args.bin``; the optimizer state covers only the trainable tensors.
    Resuming and ``load_best_model_at_end`` copy the active adapter's saved values back into the model's own
    parameters. Single process and DDP are supported; FSDP and DeepSpeed are refused.
    """

    def __init__(self, model: NormOnlyModel | None = None, *args, **kwargs):
        if model is not None:
            _check_model(model)
        super().__init__(model, *args, **kwargs)
        model = _check_model(self.model)  # also covers model_init
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "NormOnlyTrainer supports single-process and DDP training, not FSDP or DeepSpeed: launch without them. "
                "To shard a large model's frozen weights, use recipes/finetune_causal_lm.py --fsdp or "
                "normonly.distributed.shard_blocks in your own loop"
            )
        # Trainer inspected NormOnlyModel.forward(*args, **kwargs); the base model's forward is the real signature.
        base_class = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
        if self.model_accepts_loss_kwargs and not hasattr(model, "accepts_loss_kwargs"):
            parameters = inspect.signature(model.get_base_model().forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    def _build_accelerator_args(self, **kwargs) -> dict:
        """DDP's ``find_unused_parameters`` as Trainer picks it for a transformers model (False under activation
        checkpointing, where True makes reentrant checkpointing fail), decided on the base model."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        base = self.model.get_base_model() if isinstance(self.model, NormOnlyModel) else None
        if self.args.ddp_find_unused_parameters is None and isinstance(base, PreTrainedModel):
            checkpointing = getattr(base, "is_activation_checkpointing", False) or self.args.activation_checkpointing
            for handler in accelerator_args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.find_unused_parameters = not checkpointing
        return accelerator_args

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            forward = self.model.get_base_model().forward
            self._signature_columns = [*inspect.signature(forward).parameters, "label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter(s), the processing class and the training arguments; never the base weights."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.model.save_pretrained(output_dir)
        processing_class = self.processing_class
        if processing_class is None:
            processing_class = getattr(self.data_collator, "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: NormOnlyModel | None = None) -> None:
        self._restore_active_adapter(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._restore_active_adapter(self.state.best_model_checkpoint)

    def _restore_active_adapter(self, checkpoint: str | os.PathLike) -> None:
        """Copy the active adapter's values saved in ``checkpoint`` into the model, in its existing parameters."""
        name = self.model.active_adapter
        directory = _adapter_directory(checkpoint, name)
        if not (directory / WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{checkpoint} holds no adapter {name!r} (no {directory / WEIGHTS_NAME}): it was not written by "
                "NormOnlyTrainer for this model. Resume from a NormOnlyTrainer checkpoint of the same adapter."
            )
        self.model.load_adapter(directory, name, is_trainable=True, overwrite=True)


def _check_model(model) -> NormOnlyModel:
    if not isinstance(model, NormOnlyModel):
        raise TypeError(
            f"NormOnlyTrainer trains a NormOnlyModel, got {type(model).__name__}: wrap the model with "
            "normonly.get_normonly_model(model, NormOnlyConfig(...)) first, or use transformers.Trainer"
        )
    if model.active_adapter is None or not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"the active adapter {model.active_adapter!r} has nothing to train: load it with "
            "NormOnlyModel.from_pretrained(base, directory, is_trainable=True) or create one with get_normonly_model"
        )
    return model
