"""What every training recipe shares about a run: one configuration per run folder, a stop on SIGTERM/SIGINT
that saves first, a loss that must stay finite, and one-line errors instead of tracebacks."""

from __future__ import annotations

import hashlib
import math
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: recipes build their --help from this module without loading torch
    import torch

__all__ = [
    "add_run_flags",
    "run_recipe",
    "end_process",
    "check_training_flags",
    "RunError",
    "prepare_run_folder",
    "lock_run_folder",
    "source_fingerprint",
    "StopSignal",
    "check_finite",
    "resume_command",
    "save_run_weights",
    "relative_to_run",
    "end_run",
]

# what a recipe writes into its run folder; --overwrite removes exactly these
RUN_ENTRIES = (
    "config.json", "metrics.jsonl", "results.json", "checkpoints", "adapter", "model.safetensors",
    "adapter_model.safetensors", "adapter_config.json", "curves.png", "logs",
)


class RunError(RuntimeError):
    """A run that cannot start or go on, told in one line; recipes print it as ``error: ...`` and exit with 2."""


def add_run_flags(parser) -> None:
    """The run-folder flags the fine-tuning recipes share: --output, --save-every, --keep-checkpoints, --resume,
    --overwrite."""
    parser.add_argument("--output", required=True, help="run folder for config.json, results.json, adapter/ and "
                        "checkpoints/")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default 0: only on "
                        "SIGTERM/Ctrl-C)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints to keep (default 2)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint (default off)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --output (default off: refused)")


def check_training_flags(parser, args, positive=(), default_lr: dict | None = None) -> None:
    """The checks the fine-tuning recipes share, reported with ``parser.error`` (exit status 2): the flags named in
    ``positive`` are >= 1; --max-steps >= 1; --epochs > 0; --warmup in [0, 1); --lr (its default per --method from
    ``default_lr``) finite and > 0; --weight-decay finite and >= 0."""
    for flag in (*positive, "keep_checkpoints"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.epochs > 0 or not math.isfinite(args.epochs):
        parser.error(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    if args.lr is None and default_lr is not None:
        args.lr = default_lr[args.method]
    if not (math.isfinite(args.lr) and args.lr > 0) or not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--lr must be a finite number > 0 and --weight-decay finite and >= 0, got {args.lr} and "
                     f"{args.weight_decay}")


def run_recipe(training_function, args) -> dict:
    """``training_function(args)[0]``, with a run's foreseeable failures printed as one ``error: ...`` line (exit 2)."""
    from .checkpoint import CheckpointError

    try:
        return training_function(args)[0]
    except (RunError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


def _process_group_backend() -> str | None:
    """The default process group's backend ("gloo", "nccl", ...), or None where no group is initialized."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_backend()
    return None


def end_run(accelerator) -> None:
    """``accelerator.end_training()``, except that a gloo (CPU) process group is left to the process exit.

    With torch 2.14, ``destroy_process_group`` on gloo sometimes aborts a rank ("terminate called without an
    active exception") after all the work is done, and the launcher then reports the finished run as failed
    (2 runs in 20 of a 2-process DDP script here). NCCL groups are destroyed as torch asks. A launched script
    then ends with :func:`end_process`, since the interpreter's own shutdown can abort a gloo rank as well.
    """
    import torch

    for tracker in accelerator.trackers:
        tracker.finish()
    if _process_group_backend() not in (None, "gloo"):
        torch.distributed.destroy_process_group()


def end_process() -> None:
    """End a launched script's process now if it is in a gloo (CPU) process group; return at once if it is not.

    With torch 2.14, gloo's worker threads can still be releasing a finished collective's tensors while the
    interpreter shuts down. Releasing them then needs the GIL, and the rank aborts ("terminate called without an
    active exception", pytorch/pytorch#190489), so the launcher reports a finished run as failed: 12 launches in 20
    of a 2-process all-reduce script here. Flushing output and leaving with ``os._exit(0)`` skips that shutdown.
    Call it as the last line of a script run by ``accelerate launch`` or ``torchrun``, after every file is written.
    """
    import logging

    if _process_group_backend() != "gloo":
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_HELD_LOCKS: dict[Path, int] = {}  # run folders this process holds, by resolved path: held until the process ends


def lock_run_folder(output: str | os.PathLike) -> None:
    """Hold an exclusive lock on ``output`` (its ``.lock`` file) for the rest of this process: a second process
    started on the same run folder is refused instead of writing over the first one's checkpoints."""
    import fcntl

    output = Path(output)
    key = output.resolve()
    if key in _HELD_LOCKS:
        return
    output.mkdir(parents=True, exist_ok=True)
    fd = os.open(output / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"{output} is in use by another running process (it holds {output / '.lock'}): wait for it to "
                       "finish or stop it, or pick another --output") from None
    _HELD_LOCKS[key] = fd


def prepare_run_folder(
    output: str | os.PathLike, config: dict, *, resume: bool, overwrite: bool, may_differ=(), lock: bool = True
) -> str:
    """Claim ``output`` for the run described by ``config`` (every flag's value) before anything is trained.

    Returns ``"new"`` (start from step 0), ``"resume"`` (an unfinished run of this configuration) or
    ``"finished"``. A folder holding a run of another configuration is refused with the differing flags named
    (flags in ``may_differ`` may change, e.g. logging); one holding this run needs ``--resume``. With
    ``overwrite`` the earlier run's files are removed and a new run starts. With ``lock`` (the main process of a
    run) the folder is first locked for this process (:func:`lock_run_folder`).
    """
    output = Path(output)
    if lock:
        lock_run_folder(output)
    saved_path = output / "config.json"
    has_run = saved_path.exists() or any((output / name).exists() for name in ("results.json", "checkpoints"))
    if not has_run:
        return "new"
    if overwrite:
        for name in RUN_ENTRIES:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return "new"
    if not saved_path.exists():
        raise RunError(f"{output} holds checkpoints or results but no config.json, so its flags are unknown: "
                       "pass --overwrite to start over there, or pick another --output")
    from .safe_io import read_json

    try:
        saved = read_json(saved_path)
    except ValueError as err:
        raise RunError(f"{err}; pass --overwrite to start the run over, or pick another --output") from None
    differing = [k for k in sorted(set(config) | set(saved)) if k not in may_differ and saved.get(k) != config.get(k)]
    if differing:
        shown = ", ".join(_difference(k, saved.get(k), config.get(k)) for k in differing[:6])
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        raise RunError(f"{output} holds a run with other flags: {shown}{more}; pick another --output, or pass "
                       "--overwrite to replace that run")
    finished = (output / "results.json").exists()
    if not resume:
        state = "a finished run" if finished else "an unfinished run"
        raise RunError(f"{output} already holds {state} of these flags: pass --resume to continue it, --overwrite "
                       "to start over, or pick another --output")
    return "finished" if finished else "resume"


def relative_to_run(source: str, output: str | os.PathLike) -> str:
    """A local path as seen from the run folder (so results.json holds no machine's absolute path); hub ids as
    they are."""
    path = Path(source).expanduser()
    return os.path.relpath(path.resolve(), Path(output).resolve()) if path.exists() else source


def source_fingerprint(source: str) -> str:
    """sha256 (16 hex digits) of a local folder's or file's contents (names + bytes), or of a hub id's name.

    Identifies the data a run was trained on wherever the folder lies, so a run folder can be resumed from
    another working directory but not with other data.
    """
    path = Path(source).expanduser()
    digest = hashlib.sha256()
    if not path.exists():
        digest.update(f"hub:{source}".encode())
        return digest.hexdigest()[:16]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # caches and lock files of tools, not data
        digest.update(f"{rel}|{f.stat().st_size}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class StopSignal:
    """While active, SIGTERM and SIGINT ask the run to stop at the next step instead of killing it.

    The loop checks :meth:`requested` after each optimizer step, saves a checkpoint and exits; a second
    signal stops at once (the last checkpoint stays valid). Across processes the flag is combined, so every
    rank stops at the same step.

    >>> with StopSignal() as stop:
    ...     for step in ...:
    ...         if stop.requested(accelerator):
    ...             save_checkpoint(...); raise SystemExit(143)
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator=None) -> bool:
        """True when a signal arrived here (or, across processes, on any rank)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum is not None
        import torch

        flag = torch.tensor([0 if self.signum is None else self.signum], device=accelerator.device)
        signum = int(accelerator.reduce(flag, reduction="sum").item())
        if signum and self.signum is None:
            self.signum = signal.SIGTERM
        return signum != 0

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise :class:`RunError` if ``loss`` is nan or inf (checked before the step's update is applied)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RunError(
            f"the loss is {value} at step {step}: training diverged, so the run stops here (no update of this step "
            "was applied or saved); lower --lr, check the data, or use fp32"
        )


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the same script and flags, with ``--resume`` and without
    ``--overwrite``."""
    argv = list(sys.argv if argv is None else argv)
    args = [a for a in argv[1:] if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    launched = "LOCAL_RANK" in os.environ or any(k.startswith("ACCELERATE_") for k in os.environ)
    launcher = "accelerate launch [the same launch flags]" if launched else "python"
    return f"{launcher} {shlex.join([argv[0], *args])}"


def save_run_weights(
    model: torch.nn.Module, output: str | os.PathLike, *, method: str, base_spec: dict,
    modules_to_save: list[str] | None = None, is_main: bool = True,
) -> dict:
    """Write what a fine-tuning run leaves to load, and return ``{"adapter": path relative to output,
    "adapter_bytes": size, "load": the lines that load it}``.

    ``norm``: ``adapter/``, a normonly adapter (``NormOnlyModel.from_pretrained``); ``lora``: ``adapter/``, a stock
    peft adapter (``model`` is the ``PeftModel``); ``head`` / ``bitfit``: ``adapter/trainable.safetensors``, the
    trained tensors and BatchNorm statistics (``normonly.load_trainable``); ``full``: ``model.safetensors``.
    Each folder also gets ``base.json``, the spec ``normonly.build_base`` rebuilds the base model from.
    Call it on every process when the model is sharded (FSDP2): the tensors are gathered there, and the
    process with ``is_main`` writes.
    """
    from .checkpoint import unwrap_model, write_json
    from .config import NormOnlyConfig
    from .distributed import full_tensor
    from .model import save_adapter
    from .safe_io import write_files

    output, model = Path(output), unwrap_model(model)
    folder = output if method == "full" else output / "adapter"
    if is_main:
        shutil.rmtree(output / "adapter", ignore_errors=True)
    if method == "norm":
        config = NormOnlyConfig(modules_to_save=modules_to_save or None, base_model_spec=base_spec)
        save_adapter(model, folder, config, write=is_main)
        files = {}
        loader = f"model = normonly.NormOnlyModel.from_pretrained(base, {str(folder)!r})"
    elif method == "lora":
        from peft.utils import get_peft_model_state_dict

        state = {k: full_tensor(v).detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        files = {"adapter_model.safetensors": state}
        if is_main:
            model.peft_config["default"].save_pretrained(str(folder))
        loader = f"import peft; model = peft.PeftModel.from_pretrained(base, {str(folder)!r})"
    elif method == "full":  # clones: safetensors refuses tensors that share memory (tied embeddings)
        files = {"model.safetensors": {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}}
        loader = f"normonly.load_trainable(base, {str(folder / 'model.safetensors')!r})"
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state.update({n: b for n, b in model.named_buffers() if n.rpartition(".")[2].startswith(("running_", "num_batches"))})
        files = {"trainable.safetensors": {k: full_tensor(v).detach().clone() for k, v in state.items()}}
        loader = f"normonly.load_trainable(base, {str(folder / 'trainable.safetensors')!r})"
    if is_main:
        write_files(folder, tensor_files=files, digest=False)
        write_json(folder / "base.json", base_spec)
    weights = [folder / "model.safetensors"] if method == "full" else list(folder.glob("*.safetensors"))
    return {
        "adapter": os.path.relpath(folder, output),
        "adapter_bytes": sum(p.stat().st_size for p in weights) if is_main else None,
        "load": f"import normonly\nbase = normonly.build_base({str(folder)!r})\n{loader}",
    }


# config entries a recipe derives rather than takes as a flag, and what a difference in them means
DERIVED = {
    "data_fingerprint": "other data under that path",
    "model_fingerprint": "other model weights",
    "torch_threads": "another thread count changes float results; set OMP_NUM_THREADS as recorded",
}


def _difference(key: str, saved, now) -> str:
    if key in DERIVED:
        return f"{key} {_short(saved)} (now {_short(now)}: {DERIVED[key]})"
    return f"--{key.replace('_', '-')} {_short(saved)} (now {_short(now)})"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
