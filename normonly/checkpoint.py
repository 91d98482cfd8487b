"""Run checkpoints that resume bit for bit and load nothing but safetensors and JSON.

A checkpoint is a folder ``RUN/checkpoints/step_000001234/``:

    model.safetensors                 trainable parameters and persistent buffers, under the plain model's names
    state.json + state.safetensors    optimizer, scheduler, grad scaler and the recipe's progress
    rng_R.json + rng_R.safetensors    every random generator of process R (torch, CUDA, python, numpy, named ones)
    manifest.json                     sha256 of every file above, written last

It is written into a hidden sibling folder and renamed into place only when complete; older checkpoints are
deleted after that, so at every instant a complete checkpoint exists. Loading checks every digest before it
touches the model. Frozen weights are not saved: a resumed run rebuilds its base model as it first did.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .distributed import full_tensor, is_sharded, shard_like
from .safe_io import (
    file_digest,
    flatten_state,
    read_json,
    read_tensors,
    unflatten_state,
    write_files,
)

__all__ = [
    "CheckpointError",
    "write_json",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "set_rng_state",
    "unwrap_model",
    "model_state",
    "save_trainable",
    "load_trainable",
    "optimizer_groups",
]

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d{9})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or does not fit the run; the message is one line that says what to do."""


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path``; the file appears whole or not at all."""
    path = Path(path)
    write_files(path.parent, json_files={path.name: obj})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and persistent buffers of ``model`` (unwrapped), each shared tensor once."""
    model, state, seen = unwrap_model(model), {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            state[name] = p
    for mname, module in model.named_modules():
        for key, t in module._buffers.items():
            if t is not None and key not in module._non_persistent_buffers_set and id(t) not in seen:
                seen.add(id(t))
                state[f"{mname}.{key}" if mname else key] = t
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run folder (those with a manifest), oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    progress: dict | None = None,
    generators: dict[str, torch.Generator] | None = None,
    keep: int = 2,
    accelerator=None,
) -> Path:
    """Write the checkpoint of ``step`` into ``run_dir/checkpoints/`` and keep the newest ``keep`` of them.

    Call it on every process: each one saves its own random generators (``generators`` names any private
    ones, e.g. an augmentation generator); the main process saves the rest. Returns the checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:09d}"
    tmp = root / f".{final.name}.tmp"
    rank, main = _rank(accelerator), _is_main(accelerator)
    if main:
        _remove_temporaries(root)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    rng_tree, rng_tensors = flatten_state(_rng_state(generators or {}))
    write_files(tmp, json_files={f"rng_{rank}.json": {"rng": rng_tree}},
                tensor_files={f"rng_{rank}.safetensors": rng_tensors}, digest=False)
    # sharded (FSDP2) tensors are gathered whole on every rank: collectives, so all ranks take part
    tensors_of_model = {name: full_tensor(t) for name, t in model_state(model).items()}
    gathered_optimizer = optimizer_state(model, optimizer) if optimizer is not None else None
    if main:
        state = {
            "step": step,
            "num_processes": _world(accelerator),
            "optimizer": gathered_optimizer,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": _scaler_state(accelerator),
            "progress": progress or {},
        }
        tree, tensors = flatten_state(state)
        write_files(tmp, json_files={"state.json": {"state": tree}},
                    tensor_files={"state.safetensors": tensors, "model.safetensors": tensors_of_model}, digest=False)
    _barrier(accelerator)
    if main:
        digests = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if not p.name.startswith(".")}
        write_json(tmp / MANIFEST, {"step": step, "sha256": digests})
        replaced = root / f".{final.name}.old.tmp"
        if final.exists():  # a checkpoint of this very step: moved aside (still complete) until the new one is in
            os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def load_checkpoint(
    run_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    generators: dict[str, torch.Generator] | None = None,
    accelerator=None,
    restore_rng: bool = True,
) -> dict | None:
    """Restore the newest checkpoint of ``run_dir`` in place and return ``{"step": ..., **progress}``.

    With ``restore_rng=False`` the random generators are left alone and their saved state is returned under
    ``"rng"``, for :func:`set_rng_state` at the exact point of the loop where the checkpoint was taken.
    Returns None when the run has no checkpoint (a leftover temporary folder from a killed first save is
    reported and removed). Every file is checked against the manifest first; a mismatch raises
    :class:`CheckpointError` naming the file, and nothing is changed.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    if _is_main(accelerator):
        _recover_replaced(root)
    _barrier(accelerator)
    found = list_checkpoints(run_dir)
    if not found:
        leftovers = sorted(p.name for p in root.glob(".step_*.tmp")) if root.is_dir() else []
        if leftovers and _is_main(accelerator):
            print(f"warning: {root} holds no complete checkpoint, only {leftovers[-1]} from a save that was "
                  "interrupted; it is removed and the run starts from step 0")
            _remove_temporaries(root)
        _barrier(accelerator)
        return None
    folder = found[-1]
    previous = found[-2] if len(found) > 1 else None
    _verify(folder, previous)
    rank = _rank(accelerator)
    state = _read_state(folder, "state", "state", previous)
    if state.get("num_processes") != _world(accelerator):
        raise CheckpointError(
            f"{folder} was written by {state.get('num_processes')} process(es); resume it with the same number "
            f"(this launch has {_world(accelerator)})"
        )
    rng = _read_state(folder, f"rng_{rank}", "rng", previous)
    saved_model = _read(folder / "model.safetensors", previous)
    live = model_state(model)
    if set(saved_model) != set(live):
        diff = sorted(set(saved_model) ^ set(live))
        raise CheckpointError(
            f"{folder}/model.safetensors does not fit this run's model (first differing tensor {diff[0]!r}): "
            "it was written by another configuration; resume with the flags that wrote it or pass --overwrite"
        )
    for name, t in live.items():
        if saved_model[name].shape != t.shape:
            raise CheckpointError(f"{folder}/model.safetensors: {name} has shape {tuple(saved_model[name].shape)}, "
                                  f"the model {tuple(t.shape)}; resume with the flags that wrote it")
    with torch.no_grad():
        for name, t in live.items():
            t.copy_(shard_like(saved_model[name], t))
    if optimizer is not None and state.get("optimizer") is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(rng, generators)
    _barrier(accelerator)
    return {"step": state["step"], **state["progress"], **({} if restore_rng else {"rng": rng})}


def save_trainable(model: nn.Module, path: str | os.PathLike, *, batchnorm_stats: bool = False) -> int:
    """Save the parameters of ``model`` that require grad (and, optionally, every BatchNorm's running statistics)
    to one safetensors file, atomically; return its size in bytes.

    This is the adapter of any method (norm, head, BitFit, LoRA, full) as a flat file; for normonly's own
    adapter format with a config use :class:`normonly.NormOnlyModel`.
    """
    model = unwrap_model(model)
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


def load_trainable(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy the tensors of a ``save_trainable`` file (or any safetensors file of the model's own names) into
    ``model`` in place; every name must exist in the model with the same shape, else nothing is changed.

    >>> base = normonly.build_base("runs/sst2-bitfit/adapter")
    >>> normonly.load_trainable(base, "runs/sst2-bitfit/adapter/trainable.safetensors")
    """
    tensors = read_tensors(path)
    live = unwrap_model(model).state_dict(keep_vars=True)
    for name, t in tensors.items():
        if name not in live:
            raise ValueError(f"{path}: {name!r} is not a tensor of this {type(model).__name__}; it was saved from another model")
        if live[name].shape != t.shape:
            raise ValueError(f"{path}: {name!r} has shape {tuple(t.shape)}, the model {tuple(live[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            live[name].copy_(t)
    return model


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups of the trainable parameters: weight decay on matrices and kernels, none on
    γ/β and biases (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------- internals
def _verify(folder: Path, previous: Path | None) -> None:
    manifest = _read_json(folder / MANIFEST, previous)
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or not digests:
        raise CheckpointError(f"{folder / MANIFEST} lists no files: the checkpoint is corrupt{_fallback(previous)}")
    for name, expected in digests.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint{_fallback(previous)}")
        if file_digest(path) != expected:
            raise CheckpointError(
                f"{path} failed its sha256 check: the file changed after it was written{_fallback(previous)}"
            )


def _fallback(previous: Path | None) -> str:
    if previous is None:
        return "; no earlier checkpoint is kept: start the run again with --overwrite"
    return f"; the previous checkpoint {previous.name} is kept: delete the corrupt one to resume from it"


def _read_json(path: Path, previous: Path | None = None) -> dict:
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"{err}{_fallback(previous)}") from None


def _read(path: Path, previous: Path | None = None) -> dict[str, torch.Tensor]:
    try:
        return read_tensors(path)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"{err}{_fallback(previous)}") from None


def _read_state(folder: Path, stem: str, key: str, previous: Path | None):
    tree = _read_json(folder / f"{stem}.json", previous)
    tensors = _read(folder / f"{stem}.safetensors", previous)
    try:
        return unflatten_state(tree[key], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / (stem + '.json')} is not a normonly checkpoint state ({err})") from None


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's ``state_dict``; for a sharded model the whole (gathered) one, keyed by parameter names."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if not is_sharded(unwrap_model(model)):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap_model(model), inner, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load a state from :func:`optimizer_state`: a sharded model's ranks each take their shard of the whole one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_sharded(unwrap_model(model)):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap_model(model), inner, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore the random generators saved in a checkpoint (``load_checkpoint(..., restore_rng=False)["rng"]``)."""
    generators = generators or {}
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise CheckpointError(f"the checkpoint holds no state for the random generator(s) {missing}")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def _scaler_state(accelerator) -> dict | None:
    scaler = getattr(accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def _recover_replaced(root: Path) -> None:
    """A save killed between moving a checkpoint of the same step aside and renaming its successor in: put it back."""
    for old in root.glob(".step_*.old.tmp") if root.is_dir() else []:
        final = root / old.name[1 : -len(".old.tmp")]
        if (old / MANIFEST).is_file() and not final.exists():
            os.replace(old, final)


def _remove_temporaries(root: Path) -> None:
    for tmp in root.glob(".step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _rank(accelerator) -> int:
    return accelerator.process_index if accelerator is not None else 0


def _world(accelerator) -> int:
    return accelerator.num_processes if accelerator is not None else 1


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()
