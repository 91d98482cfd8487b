"""NormOnlyModel: several norm-only adapters on one base model, swapped in place, saved as safetensors.

No module is replaced: the norm layers stay where they are and an adapter is a set of tensors (γ/β,
running statistics, ``modules_to_save``) copied into the base's own parameters and buffers, so
``set_adapter`` copies a few kilobytes and optimizers, hooks and ``accelerate`` see plain modules.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .config import CONFIG_NAME, WEIGHTS_NAME, NormOnlyConfig
from .distributed import full_tensor, is_sharded, shard_like
from .freeze import PatternError, count_parameters
from .freeze import print_trainable_parameters as _print_trainable
from .init import initialize
from .safe_io import read_tensors, remove_stale_temporaries, write_directories
from .selection import AdapterSelection, running_stat_names, select_adapter_tensors, slot_tensor, tensor_slots

__all__ = ["NormOnlyModel", "get_normonly_model", "save_adapter"]


@dataclass
class _Adapter:
    config: NormOnlyConfig
    selection: AdapterSelection
    values: dict[str, torch.Tensor]  # stored copy of every tensor in selection.tensors
    trainable: bool


class _FreezeRunningStats:
    """Forward hooks that make a norm layer normalize with its running statistics even in train mode.

    The layer's ``training`` flag is switched off for the duration of its own forward and restored
    afterwards (also when the forward raises), so ``model.training`` reads as the user set it.
    """

    def __init__(self):
        self.enabled = False
        self._modes: dict[int, bool] = {}

    def before(self, module: nn.Module, args) -> None:
        if self.enabled and module.training:
            self._modes[id(module)] = True
            module.training = False

    def after(self, module: nn.Module, args, output) -> None:
        if self._modes.pop(id(module), False):
            module.training = True


def get_normonly_model(
    model: nn.Module, config: NormOnlyConfig, adapter_name: str = "default", *, init_kwargs: dict | None = None
) -> NormOnlyModel:
    """Wrap ``model`` with a new trainable adapter (like ``peft.get_peft_model``); everything else is frozen.

    ``init_kwargs`` go to the ``config.init`` initializer, e.g. ``{"target": target_net}`` for ``init="theory"``.

    >>> model = normonly.get_normonly_model(torchvision.models.resnet18(), NormOnlyConfig(modules_to_save=["fc"]))
    >>> model.print_trainable_parameters()
    """
    return NormOnlyModel(model, config, adapter_name, init_kwargs=init_kwargs)


def save_adapter(
    model: nn.Module, save_directory: str | os.PathLike, config: NormOnlyConfig | None = None, *, write: bool | None = None
) -> None:
    """Write the norm-only adapter of a model trained in place (``freeze_all_but_norm``) as ``save_pretrained`` does.

    ``config`` says what the adapter holds (default ``NormOnlyConfig()``: every detected norm's γ/β and BatchNorm
    statistics; pass ``modules_to_save=["fc"]`` for a trained head). ``model`` is only read. It may be wrapped
    (DDP, ``torch.compile``) or sharded with FSDP2: then call it on every rank, which gathers just the adapter's
    tensors, never the frozen weights; ``write`` (default: on rank 0 only) says which process writes the files.

    >>> normonly.freeze_all_but_norm(model, extra_trainable=["fc"]); train(model)
    >>> normonly.save_adapter(model, "out/", NormOnlyConfig(modules_to_save=["fc"]))
    >>> NormOnlyModel.from_pretrained(fresh_base, "out/")
    """
    from .checkpoint import unwrap_model

    model = unwrap_model(model)
    config = config if config is not None else NormOnlyConfig()
    if config.base_model_name_or_path is None:
        config = replace(config, base_model_name_or_path=_name_or_path(model))
    selection = select_adapter_tensors(model, config)
    slots = tensor_slots(model)
    values = {n: full_tensor(slot_tensor(slots[n])).detach() for n in selection.tensors}
    if write is None:
        write = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if write:
        write_directories({save_directory: {"json_files": {CONFIG_NAME: config.to_dict()},
                                            "tensor_files": {WEIGHTS_NAME: values}}})


class NormOnlyModel(nn.Module):
    """A base model plus named norm-only adapters, one active at a time; forwards to the base model."""

    def __init__(
        self,
        model: nn.Module,
        config: NormOnlyConfig | None = None,
        adapter_name: str = "default",
        *,
        init_kwargs: dict | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        from .checkpoint import unwrap_model

        wrapper, model = model, unwrap_model(model)  # adapters use the plain model's names; forward uses the wrapper
        if isinstance(model, NormOnlyModel):
            raise TypeError("model is already a NormOnlyModel: use model.add_adapter(...) or model.load_adapter(...)")
        owner = getattr(model, "_normonly_owner", None)
        if owner is not None and owner() is not None:
            raise ValueError(
                "this model is already wrapped by a NormOnlyModel (get_normonly_model was called twice on it): add "
                "adapters to that wrapper with add_adapter / load_adapter, or call unload() on it first"
            )
        _refuse_peft(model)
        if config is not None and not isinstance(config, NormOnlyConfig):
            raise TypeError(f"config must be a NormOnlyConfig, got {type(config).__name__}")
        if config is not None:
            _check_name(adapter_name)
        lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if is_lazy(t)]
        if lazy:
            raise ValueError(f"{lazy[0]} is not initialized yet (a lazy module): run one forward pass first")
        selection = select_adapter_tensors(model, config) if config is not None else None  # validate first
        super().__init__()
        self.base_model = model
        self.__dict__["_forward_module"] = wrapper  # not registered: its parameters are base_model's
        self.__dict__["_ddp_trainable"] = weakref.WeakKeyDictionary()  # DDP wrapper -> trainable set at its 1st forward
        self.normonly_config: dict[str, NormOnlyConfig] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._active: str | None = None
        self._disabled = False
        self._slots = tensor_slots(model)
        stats = running_stat_names(model)
        self._base_values = {n: self._live(n).detach().clone() for n in stats}
        self._sources: dict[str | None, list[torch.Tensor]] = {}  # cached copy sources, aligned with _base_values
        if config is not None:
            self._add(adapter_name, config, selection, values=None, trainable=True, init_kwargs=init_kwargs)
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._freeze_stats = _FreezeRunningStats()
        self._hooks = []
        for layer in {self._slots[n][0] for n in stats}:
            self._hooks.append(layer.register_forward_pre_hook(self._freeze_stats.before))
            self._hooks.append(layer.register_forward_hook(self._freeze_stats.after, always_call=True))
        self._input_grad_hook = None
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5; 4 has only the old name
        if checkpointing or (checkpointing is None and getattr(model, "is_gradient_checkpointing", False)):
            self._require_input_grads()
        if config is not None:
            self.set_adapter(adapter_name)
        model.__dict__["_normonly_owner"] = weakref.ref(self)

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward (through the ``torch.compile`` / DDP wrapper it was given in, if any).

        ``adapter_names`` (inference only, peft's keyword): one adapter name per sample along the batch dimension,
        ``"__base__"`` for the base model's own values; every sample gets exactly what ``set_adapter(name)`` and a
        forward of that sample alone would give, in one batch (see :mod:`normonly.mixed`). It runs eagerly, also
        under ``torch.compile`` (a compiled model gives the same outputs; the mixed call is not compiled).

        Not thread-safe with respect to ``set_adapter``: switching adapters while another thread runs ``forward``
        mixes the two adapters' values. Use one model per thread, or a lock around both.

        >>> model.eval()
        >>> logits = model(x, adapter_names=["task_a", "task_b", "__base__", "task_a"])   # x holds 4 samples
        """
        if adapter_names is not None:
            return self._mixed_forward(args, kwargs, adapter_names)
        if self.training and torch.is_grad_enabled():
            self._check_ddp()
        return self._forward_module(*args, **kwargs)

    @torch.compiler.disable  # swaps layer forwards per call: under torch.compile this part runs eagerly
    def _mixed_forward(self, args: tuple, kwargs: dict, adapter_names: list[str]) -> Any:
        from .mixed import mixed_adapters

        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        if first is not None and not isinstance(adapter_names, str) and first.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names holds {len(adapter_names)} names for a batch of {first.shape[0]} "
                             "samples: give one adapter name per sample")
        with mixed_adapters(self, adapter_names):
            return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the base model (``model.config``, ``model.fc``, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def active_adapter(self) -> str | None:
        """Name of the adapter whose values the base model currently holds."""
        return self._active

    def print_trainable_parameters(self) -> str:
        """Print and return peft's ``trainable params: ... || all params: ... || trainable%: ...`` line."""
        return _print_trainable(self.base_model)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self.base_model)

    # ------------------------------------------------------------------ activation checkpointing
    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The base model's ``activation_checkpointing_enable`` (transformers 5), made safe for frozen weights.

        With every weight before the first checkpointed layer frozen, reentrant checkpointing
        (``use_reentrant=True``) sees inputs that do not require grad and gives the norms inside the layers no
        gradient. As peft does, a forward hook on the input embeddings makes their output require grad.
        ``transformers.Trainer(activation_checkpointing=True)`` calls this method.
        """
        self.base_model.activation_checkpointing_enable(*args, **kwargs)
        self._require_input_grads()

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The base model's ``gradient_checkpointing_enable`` (the transformers 4 name), made safe for frozen weights."""
        self.base_model.gradient_checkpointing_enable(*args, **kwargs)
        self._require_input_grads()

    def activation_checkpointing_disable(self) -> None:
        self.base_model.activation_checkpointing_disable()
        self._release_input_grads()

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing_disable()
        self._release_input_grads()

    def _require_input_grads(self) -> None:
        if self._input_grad_hook is not None:
            return
        get_embeddings = getattr(self.base_model, "get_input_embeddings", None)
        try:
            embeddings = get_embeddings() if get_embeddings is not None else None
        except NotImplementedError:
            embeddings = None
        if isinstance(embeddings, nn.Module):
            self._input_grad_hook = embeddings.register_forward_hook(_output_requires_grad)

    def _release_input_grads(self) -> None:
        if self._input_grad_hook is not None:
            self._input_grad_hook.remove()
            self._input_grad_hook = None

    # ------------------------------------------------------------------ adapters in memory
    def add_adapter(self, adapter_name: str, config: NormOnlyConfig, *, init_kwargs: dict | None = None) -> None:
        """Add a new trainable adapter from the base's values and ``config.init`` (called with ``init_kwargs``);
        it is not activated."""
        if not isinstance(config, NormOnlyConfig):
            raise TypeError(f"config must be a NormOnlyConfig, got {type(config).__name__}")
        self._check_new_name(adapter_name)
        selection = select_adapter_tensors(self.base_model, config)
        self._add(adapter_name, config, selection, values=None, trainable=True, init_kwargs=init_kwargs)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: copy its tensors into the base model, set requires_grad."""
        if adapter_name not in self._adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {list(self._adapters)}")
        if self._disabled:
            raise RuntimeError("set_adapter inside disable_adapter(): leave the `with` block first")
        adapter = self._adapters[adapter_name]
        self._check_ddp(set(adapter.selection.trainable) if adapter.trainable else set(), adapter_name)
        with torch.no_grad():
            self._sync_active()
            self._write(adapter_name)
        self._activate(adapter_name)

    def _activate(self, adapter_name: str) -> None:
        """Mark ``adapter_name`` (already written into the base) active: requires_grad flags, BatchNorm hooks."""
        self._active = adapter_name
        adapter = self._adapters[adapter_name]
        trainable = set(adapter.selection.trainable) if adapter.trainable else set()
        for name in self._base_values:
            module, key, is_param = self._slots[name]
            if is_param:
                module._parameters[key].requires_grad_(name in trainable)
        self._freeze_stats.enabled = adapter.config.bn_stats == "freeze"

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; deleting the active one activates the first remaining adapter."""
        if adapter_name not in self._adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {list(self._adapters)}")
        if len(self._adapters) == 1:
            raise ValueError(
                f"{adapter_name!r} is the only adapter; use merge_and_unload() or unload() to get the base model back"
            )
        if adapter_name == self._active:
            other = next(n for n in self._adapters if n != adapter_name)
            warnings.warn(f"deleted the active adapter {adapter_name!r}; {other!r} is now active", stacklevel=2)
            self.set_adapter(other)
        del self._adapters[adapter_name], self.normonly_config[adapter_name]
        self._sources.pop(adapter_name, None)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model with its own values (and its own BatchNorm behaviour) inside the block."""
        if self._disabled:
            yield
            return
        with torch.no_grad():
            self._sync_active()
            self._disabled = True
            self._freeze_stats.enabled = False
            self._write(None)
        try:
            yield
        finally:
            self._disabled = False
            with torch.no_grad():
                self._write(self._active)
            if self._active is not None:
                self._freeze_stats.enabled = self._adapters[self._active].config.bn_stats == "freeze"

    def merge_and_unload(self) -> nn.Module:
        """Return the base model holding the active adapter's values, as a plain module (requires_grad restored).

        The hooks of ``bn_stats="freeze"`` are removed: in train mode BatchNorm uses batch statistics again.
        """
        with torch.no_grad():
            self._sync_active()
        return self._unwrap()

    def unload(self) -> nn.Module:
        """Return the base model with its original values, as a plain module (requires_grad restored)."""
        with torch.no_grad():
            self._write(None)
        return self._unwrap()

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
    ) -> None:
        """Write each adapter's ``adapter_config.json`` and ``adapter_model.safetensors`` atomically.

        As in peft, the adapter named ``"default"`` goes to ``save_directory`` itself and any other to
        ``save_directory/<adapter_name>``. The files hold only the adapter's tensors. A model sharded with FSDP2
        gathers the active adapter's tensors (never the frozen weights), so every rank must call this; pass
        ``is_main_process=False`` on all ranks but the one that writes.
        """
        if not self._adapters:
            raise RuntimeError(
                "this NormOnlyModel holds no adapter (after unload() or merge_and_unload() it is empty): save before "
                "unloading, or save the merged base model itself"
            )
        names = list(self._adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ValueError(f"selected_adapters={unknown} are not loaded; loaded adapters: {list(self._adapters)}")
        with torch.no_grad():
            self._sync_active()
        plan = {}
        for name in names:  # all adapters are written first, then renamed into place together: all or nothing
            adapter = self._adapters[name]
            out = Path(save_directory) if name == "default" else Path(save_directory) / name
            plan[out] = {"json_files": {CONFIG_NAME: adapter.config.to_dict()},
                         "tensor_files": {WEIGHTS_NAME: adapter.values}}
        if is_main_process:
            write_directories(plan)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> NormOnlyModel:
        """Wrap ``model`` with the adapter saved in ``directory`` (like ``peft.PeftModel.from_pretrained``).

        With ``is_trainable=False`` the adapter's parameters stay frozen and the model is put in eval mode.
        An adapter that does not fit ``model`` raises an error naming the first mismatching key, and
        ``model`` is left as it was.
        """
        config, selection, values = _read_adapter(model, directory)
        wrapper = cls(model)
        wrapper._add(adapter_name, config, selection, values=values, trainable=is_trainable)
        wrapper.set_adapter(adapter_name)
        if not is_trainable:
            wrapper.eval()
        return wrapper

    def load_adapter(
        self, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False, overwrite: bool = False
    ) -> None:
        """Load another adapter from ``directory`` under ``adapter_name``; it is not activated.

        As in peft, ``is_trainable=False`` puts the model in eval mode. On any error nothing changes.
        ``overwrite=True`` replaces an adapter of that name (config and values) instead of refusing; if it is the
        active one, the base model gets the loaded values at once, in its existing parameters, so an optimizer
        built over them stays valid (this is how ``NormOnlyTrainer`` resumes and restores the best checkpoint).
        """
        replacing = overwrite and adapter_name in self._adapters
        if not replacing:
            self._check_new_name(adapter_name)
        elif self._disabled:
            raise RuntimeError("cannot replace an adapter inside disable_adapter(): leave the `with` block first")
        config, selection, values = _read_adapter(self.base_model, directory)
        self._add(adapter_name, config, selection, values=values, trainable=is_trainable)
        if replacing and adapter_name == self._active:
            with torch.no_grad():
                self._write(adapter_name)
            self._activate(adapter_name)
        if not is_trainable:
            self.eval()

    # ------------------------------------------------------------------ internals
    def _check_new_name(self, adapter_name: str) -> None:
        _check_name(adapter_name)
        if adapter_name in self._adapters:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another adapter_name or call "
                f"delete_adapter({adapter_name!r}) first"
            )
        if self._disabled:
            raise RuntimeError("cannot add an adapter inside disable_adapter(): leave the `with` block first")

    def _live(self, name: str) -> torch.Tensor:
        return slot_tensor(self._slots[name])

    def _add(self, name, config, selection, values, trainable, init_kwargs=None) -> None:
        """Register an adapter; with ``values=None`` it starts from the base's values and ``config.init``."""
        if config.base_model_name_or_path is None:
            config = replace(config, base_model_name_or_path=_name_or_path(self.base_model))
        new = [n for n in selection.tensors if n not in self._base_values]
        snapshot = {n: self._live(n).detach().clone() for n in new}  # untouched so far: the base's values
        if values is None:
            values = self._initial_values(config, selection, snapshot, init_kwargs or {})
        self._base_values.update(snapshot)
        self._sources.clear()
        self._adapters[name] = _Adapter(config, selection, values, trainable)
        self.normonly_config[name] = config

    def _initial_values(self, config, selection, snapshot, init_kwargs) -> dict[str, torch.Tensor]:
        """Base values with ``config.init`` applied to the γ/β, computed in the live model then put back."""
        layers = set(selection.norm_modules)
        gamma_beta = [n for n in selection.trainable if n.rpartition(".")[0] in layers]
        base = {**self._base_values, **snapshot}
        with torch.no_grad():
            self._sync_active()
            try:
                for n in selection.tensors:
                    self._live(n).copy_(base[n])
                initialize(self.base_model, gamma_beta, config.init, **init_kwargs)
                return {n: self._live(n).detach().clone() for n in selection.tensors}
            finally:
                for n in selection.tensors:  # the active adapter (or the base) back in place
                    self._live(n).copy_(base[n])
                self._write(None if self._disabled else self._active)

    def _sync_active(self) -> None:
        """Copy the live values (trained in place) back into the active adapter's store."""
        if self._active is None or self._disabled:
            return
        adapter = self._adapters[self._active]
        names = adapter.selection.tensors
        if names:  # a sharded (FSDP2) model's live tensors are gathered whole: every rank must call this
            torch._foreach_copy_([adapter.values[n] for n in names], [full_tensor(self._live(n)) for n in names])

    def _write(self, adapter_name: str | None) -> None:
        """Copy ``adapter_name``'s values (None: the base's) into every tensor any adapter manages."""
        sources = self._sources.get(adapter_name)
        if sources is None:
            values = self._adapters[adapter_name].values if adapter_name is not None else {}
            sources = [values.get(n, base) for n, base in self._base_values.items()]
            self._sources[adapter_name] = sources
        if sources:
            live = [self._live(n) for n in self._base_values]
            if is_sharded(self):  # FSDP2: each rank copies its own shard (foreach ops do not take DTensors)
                for t, v in zip(live, sources):
                    t.copy_(shard_like(v, t))
            else:
                torch._foreach_copy_(live, sources)

    def _check_ddp(self, trainable: set[str] | None = None, adapter_name: str | None = None) -> None:
        """Refuse to train parameters that a DistributedDataParallel wrapper does not synchronise.

        DDP registers the parameters that require grad when it is built; one that starts requiring grad later
        (``set_adapter`` to an adapter that trains another head) would train apart on every rank.
        """
        ddp = nn.parallel.DistributedDataParallel._get_active_ddp_module()
        if ddp is None and not self._ddp_trainable:
            return
        current = {n for n, p in self.base_model.named_parameters() if p.requires_grad}
        if ddp is not None and ddp not in self._ddp_trainable:
            self._ddp_trainable[ddp] = frozenset(current)
        if trainable is None:
            trainable, what = current, "the model now trains"
        else:
            what = f"adapter {adapter_name!r} trains"
        for seen in list(self._ddp_trainable.values()):
            new = sorted(trainable - seen)
            if new:
                raise RuntimeError(
                    f"{what} {new[:3]}, which did not require grad when DistributedDataParallel was built around this "
                    "model, so DDP would not synchronise them and the ranks would drift apart: call set_adapter "
                    "before wrapping the model in DDP (accelerator.prepare), and wrap it anew after switching"
                )

    def _unwrap(self) -> nn.Module:
        if self._disabled:
            raise RuntimeError("cannot unload inside disable_adapter(): leave the `with` block first")
        self.base_model.__dict__.pop("_normonly_owner", None)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._release_input_grads()
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(n, p.requires_grad))
        self._adapters.clear()
        self.normonly_config.clear()
        self._sources.clear()
        self._active = None
        return self.base_model

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()`` also move/cast the stored adapters."""
        super()._apply(fn, recurse)
        for store in [self._base_values, *(a.values for a in self._adapters.values())]:
            for k, v in store.items():
                store[k] = fn(v)
        self._sources.clear()
        return self


def _refuse_peft(model: nn.Module) -> None:
    """A model already wrapped by peft (LoRA, ...) would have its adapter frozen silently: refuse it."""
    if "peft" not in sys.modules:  # a model cannot hold peft layers unless peft was imported
        return
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already wrapped by peft (it holds peft tuner layers): normonly would freeze "
            "that adapter. Merge it first (peft_model.merge_and_unload()), or train it with peft alone"
        )


def _output_requires_grad(module: nn.Module, args, output) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _check_name(adapter_name: str) -> None:
    """Adapter names become folder names in save_pretrained: refuse what would escape the folder."""
    if not isinstance(adapter_name, str) or adapter_name in {"", ".", ".."} or any(c in adapter_name for c in "/\\"):
        raise ValueError(
            f"adapter_name must be a folder name (no path separators, not '.' or '..'), got {adapter_name!r}"
        )


def _name_or_path(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _read_adapter(model: nn.Module, directory) -> tuple[NormOnlyConfig, AdapterSelection, dict[str, torch.Tensor]]:
    """Read and check an adapter directory against ``model``; returns values cast to the model's tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    try:
        remove_stale_temporaries(directory, [CONFIG_NAME, WEIGHTS_NAME])  # left by a save that was killed
    except OSError:
        pass  # a read-only folder: the temporaries only cost disk space
    config = NormOnlyConfig.from_pretrained(directory)
    tensors = read_tensors(directory / WEIGHTS_NAME)
    model_name = type(model).__name__
    hint = f" (trained on {config.base_model_name_or_path!r})" if config.base_model_name_or_path else ""

    def mismatch(key: str, why: str) -> ValueError:
        return ValueError(
            f"adapter {directory} does not fit this {model_name}: first mismatching key {key!r}: {why}. "
            f"Load it onto the architecture it was trained on{hint}."
        )

    try:
        selection = select_adapter_tensors(model, config)
    except PatternError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: field {err}") from None
    except ValueError as err:
        raise ValueError(f"adapter {directory} does not fit this {model_name}: {err}") from None
    slots = tensor_slots(model)
    values = {}
    for key in selection.tensors:
        if key not in tensors:
            raise mismatch(key, f"the file lacks it, but its config selects it on this {model_name}")
        live, saved = slot_tensor(slots[key]), tensors[key]
        if saved.shape != live.shape:
            raise mismatch(key, f"shape {tuple(saved.shape)} in the file, {tuple(live.shape)} in the model")
        if saved.is_floating_point() != live.is_floating_point():
            raise mismatch(key, f"dtype {saved.dtype} in the file, {live.dtype} in the model")
        values[key] = saved.to(device=live.device, dtype=live.dtype)
    for key in sorted(set(tensors) - set(values)):
        why = "the config does not select it on this model" if key in slots else "the model has no such tensor"
        raise mismatch(key, f"the file has it, but {why}")
    return config, selection, values
