"""Shared by the recipe tests: kill a real run with SIGKILL, plant hostile pickles, compare saved tensors."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def free_port() -> str:
    """A TCP port nobody listens on now: concurrent tests must not all rendezvous on accelerate's default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class Payload:
    """Unpickling this runs code: it creates ``self.marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickles(folder: Path, marker: Path, names=("custom_checkpoint_0.pkl", "random_states_0.pkl",
                                                      "optimizer.bin", "pytorch_model.bin", "scheduler.pt")) -> None:
    """Drop pickles that create ``marker`` when loaded into ``folder`` under the names accelerate and torch use."""
    for name in names:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))


def replace_with_pickle(path: Path, marker: Path) -> None:
    """Swap a checkpoint file for a hostile pickle and fix the manifest's digest, so only the format can stop it."""
    path.write_bytes(pickle.dumps(Payload(marker)))
    manifest = path.parent / "manifest.json"
    if manifest.exists() and manifest != path:
        data = json.loads(manifest.read_text())
        if path.name in data["sha256"]:
            data["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            manifest.write_text(json.dumps(data))


def checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.glob("step_*") if (p / "manifest.json").exists())


def kill_after_checkpoint(cmd: list[str], run: Path, env: dict, timeout: float = 240) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``run`` holds a complete checkpoint; return that checkpoint's step."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not checkpoint_steps(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own: {proc.stderr.read().decode()[-2000:]}"
    assert not (run / "results.json").exists(), "the run finished before it could be killed"
    return checkpoint_steps(run)[-1]


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same names and bit-identical tensors."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]
