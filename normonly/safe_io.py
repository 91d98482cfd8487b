"""Atomic, pickle-free reading and writing of adapter and checkpoint files (JSON + safetensors) with clear errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "write_files",
    "write_directories",
    "read_json",
    "read_tensors",
    "tensors_digest",
    "file_digest",
    "remove_stale_temporaries",
    "flatten_state",
    "unflatten_state",
]

DIGEST_KEY = "normonly_sha256"
MAX_JSON_BYTES = 16 * 2**20  # configs and run state are kilobytes; refuse what no writer of ours produces
_TEMP_SUFFIX = ".tmp"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors``, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_files(
    directory: str | os.PathLike,
    *,
    json_files: Mapping[str, dict] = (),
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]] = (),
    digest: bool = True,
) -> None:
    """Write JSON and safetensors files into ``directory`` so that each either appears whole or not at all.

    Every file is first written completely to a temporary file beside its target; only when all of
    them are written are they renamed into place (``os.replace``), so an error while writing (disk
    full, a tensor that cannot be saved, Ctrl-C) leaves the old files untouched and no partial file.
    Temporaries that an earlier, killed write of the same files left behind are removed first.
    """
    write_directories({directory: {"json_files": json_files, "tensor_files": tensor_files}}, digest=digest)


def write_directories(plan: Mapping[str | os.PathLike, Mapping[str, Mapping]], *, digest: bool = True) -> None:
    """``write_files`` for several directories at once: ``{directory: {"json_files": ..., "tensor_files": ...}}``.

    Nothing is renamed into place until every file of every directory is written, so a failure while writing
    leaves all directories as they were (used to save several adapters all or nothing).
    """
    pending: list[tuple[str, Path]] = []
    try:
        for directory, files in plan.items():
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            json_files, tensor_files = dict(files.get("json_files", ())), dict(files.get("tensor_files", ()))
            remove_stale_temporaries(directory, [*json_files, *tensor_files])
            for name, obj in json_files.items():
                tmp = _temp_beside(directory / name)
                pending.append((tmp, directory / name))
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(obj, f, indent=2, sort_keys=True)
                    f.write("\n")
                _finish(tmp)
            for name, tensors in tensor_files.items():
                tmp = _temp_beside(directory / name)
                pending.append((tmp, directory / name))
                tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
                metadata = {"format": "pt"}
                if digest:
                    metadata[DIGEST_KEY] = tensors_digest(tensors)
                save_file(tensors, tmp, metadata=metadata)
                _finish(tmp)
        while pending:
            tmp, target = pending[0]
            os.replace(tmp, target)
            pending.pop(0)
    finally:
        for tmp, _ in pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def remove_stale_temporaries(directory: str | os.PathLike, names) -> list[Path]:
    """Delete the hidden temporaries (``.NAME.*.tmp``) that a killed write of ``names`` left in ``directory``."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for name in names:
        for stale in directory.glob(f".{name}.*{_TEMP_SUFFIX}"):
            try:
                stale.unlink()
                removed.append(stale)
            except (FileNotFoundError, IsADirectoryError):
                pass
    return removed


def _temp_beside(target: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TEMP_SUFFIX)
    os.close(fd)
    return tmp


def _finish(path: str) -> None:
    """fsync, and give the permissions of an ordinary new file (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """Read a JSON object; a missing, oversized, unreadable or non-object file raises an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a directory written by save_pretrained")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size:,} bytes, more than the {max_bytes:,} any normonly file needs: refused")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated: save it again") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a normonly file: refused") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected an object of config fields")
    return obj


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU, checking normonly's digest when the file carries one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a directory written by save_pretrained")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: save it again"
        ) from None
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise ValueError(f"{path} failed its sha256 check: the tensor data is corrupt; save it again")
    return tensors


# ---------------------------------------------------------------- nested state without pickle
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (an optimizer's or scheduler's ``state_dict``, RNG states, progress counters) into a
    JSON-ready tree and a flat dict of tensors for safetensors; ``unflatten_state`` puts it back together exactly.

    Handles dicts (any str/int/float/bool/None keys), lists, tuples, tensors, str, int, float (nan/inf too), bool
    and None; anything else raises ``TypeError`` naming where it sits, so nothing ever needs pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = where or "."
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, (list, tuple)):
            items = [encode(v, f"{where}.{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"__tuple__": items}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
            if not all(k is None or isinstance(k, (str, int, float, bool)) for k in value):
                raise TypeError(f"state at {where or '<root>'!r} has a key of type {type(next(iter(value))).__name__}")
            return {"__items__": [[k, encode(v, f"{where}.{k}")] for k, v in value.items()]}
        raise TypeError(
            f"state at {where or '<root>'!r} is a {type(value).__name__}, which cannot be saved without pickle"
        )

    return encode(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            key = tree["__tensor__"]
            if key not in tensors:
                raise ValueError(f"state names tensor {key!r}, which the tensor file lacks")
            return tensors[key]
        if "__float__" in tree:
            return float(tree["__float__"])
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    return tree
