"""``NormOnlyTrainer``: ``transformers.Trainer`` for a ``NormOnlyModel``, with checkpoints that hold only the adapter.

Stock ``Trainer`` decides what to save and load by ``isinstance(model, (PreTrainedModel, PeftModel))``; any other
module gets its whole ``state_dict`` written to ``model.safetensors`` (the frozen base included), and it reads a
model's inputs and label names from the wrapper class's ``forward(*args, **kwargs)``, so it drops every dataset
column and computes no evaluation loss. This subclass changes only those points: it inspects the base model's
``forward``, saves each checkpoint with ``NormOnlyModel.save_pretrained`` and restores the trained adapter in place
on resume and for ``load_best_model_at_end``. Everything else (optimizer, scheduler, RNG and trainer state,
evaluation, logging, DDP) is ``Trainer``'s own.

With ``TrainingArguments(fsdp=True)`` the trainer shards the model itself with FSDP2 (``fully_shard`` block by
block, :func:`normonly.distributed.shard_blocks`) instead of handing the config to Accelerate, whose FSDP
integration runs on GPU processes only: the same code then runs on GPUs (NCCL) and on CPU processes (gloo). The
model is then given to Accelerate as one already sharded (Trainer's path for models sharded at load time: no DDP
wrapper), and checkpoints gather only the adapter and its optimizer state, never the frozen weights.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs
from transformers import PreTrainedModel, Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from ..checkpoint import load_optimizer_state, optimizer_state
from ..config import WEIGHTS_NAME
from ..distributed import is_sharded, shard_blocks
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
    parameters. Single process, DDP and FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={...})``, on GPU or CPU
    processes) are supported; DeepSpeed and Accelerate's own FSDP config (``accelerate launch --use_fsdp``) are
    refused.
    """

    def __init__(self, model: NormOnlyModel | None = None, *args, **kwargs):
        if model is not None:
            _check_model(model)
        training_args = kwargs.get("args", args[0] if args else None)
        if training_args is not None and training_args.fsdp:
            _check_fsdp_options(training_args.fsdp_plugin_args or {})
        super().__init__(model, *args, **kwargs)
        model = _check_model(self.model)  # also covers model_init
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "NormOnlyTrainer shards the model itself and does not run under DeepSpeed or Accelerate's FSDP config: "
                "launch without them (no --use_fsdp / FSDP config file) and pass "
                "TrainingArguments(fsdp=True, fsdp_config={...}) instead"
            )
        if self.args.fsdp and not self.is_fsdp_xla_enabled:
            self._shard(model)
        # Trainer inspected NormOnlyModel.forward(*args, **kwargs); the base model's forward is the real signature.
        base_class = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
        if self.model_accepts_loss_kwargs and not hasattr(model, "accepts_loss_kwargs"):
            parameters = inspect.signature(model.get_base_model().forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    def _shard(self, model: NormOnlyModel) -> None:
        """FSDP2-shard ``model`` in place as ``args.fsdp_config`` asks; Trainer then treats it as sharded at load."""
        options = self.args.fsdp_plugin_args or {}
        classes = None
        if names := options.get("transformer_cls_names_to_wrap"):
            wanted = set(names.split(","))
            classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
            missing = wanted - {c.__name__ for c in classes}
            if missing:
                raise ValueError(
                    f"fsdp_config['transformer_layer_cls_to_wrap'] names {sorted(missing)}, which the "
                    f"model does not contain"
                )
        kwargs = {"reshard_after_forward": bool(options.get("reshard_after_forward", True))}
        if options.get("cpu_offload") and self.args.device.type != "cpu":
            from torch.distributed.fsdp import CPUOffloadPolicy

            kwargs["offload_policy"] = CPUOffloadPolicy()
        shard_blocks(model, classes, **kwargs)
        # Trainer's path for a model sharded at load time: it owns its placement and gradient reduction, so
        # Accelerate neither moves it nor wraps it in DDP.
        self.is_distributed_loading_by_transformers = True
        self.place_model_on_device = False

    def _build_accelerator_args(self, **kwargs) -> dict:
        """No FSDP plugin for Accelerate (``_shard`` does it), and DDP's ``find_unused_parameters`` as Trainer picks
        it for a transformers model (False under activation checkpointing, where True makes reentrant checkpointing
        fail), decided on the base model."""
        kwargs.pop("fsdp_plugin", None)
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
        """Write the adapter(s), the processing class and the training arguments; never the base weights.

        A sharded model gathers its adapter on every rank (a collective), and the main process writes it."""
        if not self.args.should_save and not is_sharded(self.model):
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        processing_class = self.processing_class
        if processing_class is None:
            processing_class = getattr(self.data_collator, "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """For a sharded model, the whole optimizer state (only the adapter's tensors: small) gathered from every
        rank into one ``optimizer.pt`` of plain tensors, keyed by parameter name."""
        if not is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        state = optimizer_state(self.model, self.optimizer)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_sharded(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        files = [Path(checkpoint) / OPTIMIZER_NAME, Path(checkpoint) / SCHEDULER_NAME]
        if missing := [str(f) for f in files if not f.is_file()]:
            raise ValueError(f"cannot resume from {checkpoint}: {missing} missing (was it saved with save_only_model?)")
        load_optimizer_state(self.model, self.optimizer, torch.load(files[0], map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(files[1], weights_only=True))

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


def _check_fsdp_options(options: dict) -> None:
    """Refuse the FSDP settings (``TrainingArguments.fsdp_plugin_args``) that ``NormOnlyTrainer._shard`` cannot
    honour, before Trainer builds anything."""
    if options.get("fsdp_version", 2) != 2:
        raise ValueError("NormOnlyTrainer shards with FSDP2: set fsdp_config={'version': 2} (FSDP1 is deprecated)")
    if options.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        raise ValueError(
            "NormOnlyTrainer shards transformer blocks: drop fsdp_config['auto_wrap_policy'] (or set "
            "'TRANSFORMER_BASED_WRAP'), and name the blocks with fsdp_config['transformer_layer_cls_to_wrap']"
        )
    if options.get("activation_checkpointing"):
        raise ValueError(
            "fsdp_config['activation_checkpointing'] is not supported by NormOnlyTrainer: set "
            "TrainingArguments(gradient_checkpointing=True) instead"
        )


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
