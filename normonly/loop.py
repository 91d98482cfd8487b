"""The step loop the fine-tuning recipes share: epochs of an Accelerate DataLoader, checkpoints every N steps,
a bit-exact resume (dropout included), a clean stop on SIGTERM/SIGINT and a check that the loss stays finite."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .runs import StopSignal, check_finite, resume_command

__all__ = ["train_steps"]


def train_steps(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loader,
    loss_fn: Callable[[object, int], torch.Tensor],
    *,
    max_steps: int,
    output: str | Path,
    resume: bool = False,
    save_every: int = 0,
    keep: int = 2,
    desc: str = "train",
    progress: dict | None = None,
) -> dict:
    """Run optimizer steps ``loss_fn(batch, step)`` -> loss until ``max_steps``; returns ``{"step", "train_seconds"}``.

    ``loader`` is an ``accelerator.prepare``d DataLoader whose sampler is seeded per epoch
    (``use_seedable_sampler=True``). With ``resume`` the newest checkpoint in ``output`` is restored and the
    loop continues at its step with the same batches and random numbers as an uninterrupted run. On SIGTERM
    or SIGINT the current step is saved, the resume command printed, and ``SystemExit(128 + signal)`` raised.
    ``progress`` holds more JSON-ready values to keep in the checkpoints (a resume gets back the saved ones).
    """
    output = Path(output)
    progress = {**(progress or {}), "step": 0, "train_seconds": 0.0}
    rng = None
    if resume:
        restored = load_checkpoint(output, model=model, optimizer=optimizer, scheduler=scheduler,
                                   accelerator=accelerator, restore_rng=False)
        if restored is not None:
            rng = restored.pop("rng")
            progress = restored
            accelerator.print(f"resumed {output} at step {progress['step']} of {max_steps}")
    step, steps_per_epoch = progress["step"], len(loader)
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc=desc)
    tick = time.perf_counter()

    def save() -> None:
        done = {**progress, "train_seconds": progress["train_seconds"] + time.perf_counter() - tick}
        done.pop("step")
        save_checkpoint(output, step, model=model, optimizer=optimizer, scheduler=scheduler, progress=done,
                        keep=keep, accelerator=accelerator)

    model.train()
    with StopSignal() as stop:
        while step < max_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            if rng is not None and not done_in_epoch:  # the checkpoint was taken before this epoch's iterator
                set_rng_state(rng)
                rng = None
            batches = iter(accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader)
            # the first batch starts DataLoader's iterator, which draws its base seed from the global generator
            first = next(batches, None)
            if rng is not None:  # mid-epoch: the uninterrupted run made that draw before the checkpoint
                set_rng_state(rng)
                rng = None
            if first is None:
                break
            for batch in itertools.chain([first], batches):
                loss = loss_fn(batch, step)
                check_finite(loss, step + 1)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= max_steps:
                    break
                if stop.requested(accelerator):
                    save()
                    bar.close()
                    accelerator.print(f"stopped by signal at step {step}; continue with:\n  {resume_command()}")
                    raise SystemExit(stop.exit_code)
                if save_every and step % save_every == 0:
                    save()
    bar.close()
    progress.update(step=step, train_seconds=progress["train_seconds"] + time.perf_counter() - tick)
    return progress
