"""Atomic, pickle-free reading and writing of adapter files (JSON + safetensors) with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["write_files", "read_json", "read_tensors", "tensors_digest"]

DIGEST_KEY = "normonly_sha256"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors``, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, Path]] = []
    try:
        for name, obj in dict(json_files).items():
            tmp = _temp_beside(directory / name)
            pending.append((tmp, directory / name))
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
                f.write("\n")
            _finish(tmp)
        for name, tensors in dict(tensor_files).items():
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


def _temp_beside(target: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _finish(path: str) -> None:
    """fsync, and give the permissions of an ordinary new file (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object; a missing, unreadable or non-object file raises an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a directory written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated: save it again") from None
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
