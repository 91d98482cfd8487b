"""Run state for training scripts: mid-run checkpoints that resume exactly, and outputs written atomically.

The fine-tuning recipes use these so that a killed run never leaves a half-written file and ``--resume``
continues from the last finished checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from .safe_io import write_files

__all__ = ["write_json", "save_checkpoint", "load_checkpoint", "save_trainable", "optimizer_groups"]

PROGRESS_FILE = "progress.json"


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path``; the file appears whole or not at all."""
    path = Path(path)
    write_files(path.parent, json_files={path.name: obj})


def save_checkpoint(accelerator, folder: str | os.PathLike, progress: dict) -> None:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG) plus ``progress`` into ``folder``.

    The state is written to a sibling folder and swapped in only when complete, so a kill during the save
    leaves the previous checkpoint intact. Call it on every process.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json(tmp / PROGRESS_FILE, progress)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, folder: str | os.PathLike) -> dict | None:
    """Restore the state saved by :func:`save_checkpoint` and return its ``progress``; None if there is none."""
    folder = Path(folder)
    if not (folder / PROGRESS_FILE).exists():
        return None
    accelerator.load_state(str(folder))
    return json.loads((folder / PROGRESS_FILE).read_text())


def save_trainable(model: nn.Module, path: str | os.PathLike, *, batchnorm_stats: bool = False) -> int:
    """Save the parameters of ``model`` that require grad (and, optionally, every BatchNorm's running statistics)
    to one safetensors file, atomically; return its size in bytes.

    This is the adapter of any method (norm, head, BitFit, LoRA, full) as a flat file; for normonly's own
    adapter format with a config use :class:`normonly.NormOnlyModel`.
    """
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if batchnorm_stats:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                prefix = f"{name}." if name else ""
                tensors.update({prefix + b: t for b, t in module.named_buffers(recurse=False) if t is not None})
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no trainable parameter to save")
    path = Path(path)
    write_files(path.parent, tensor_files={path.name: tensors}, digest=False)
    return path.stat().st_size


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups of the trainable parameters: weight decay on matrices and kernels, none on
    γ/β and biases (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]

