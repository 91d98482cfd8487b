"""NormOnlyConfig: what a norm-only adapter trains and saves, round-tripping through adapter_config.json."""

from __future__ import annotations

import os
import re
import reprlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .init import INITIALIZERS
from .safe_io import read_json, write_files

__all__ = ["NormOnlyConfig", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "normonly"
BN_STATS = ("update", "freeze")
OPTIONAL_FIELDS = {"base_model_spec"}  # added after 0.1: adapters written before it lack the field
MAX_PATTERN_CHARS = 100_000  # an anchored regex of 2,000 qualified names; a pattern from a file may not be longer
MAX_NAMES = 20_000  # more names than any model has normalization layers and heads


@dataclass
class NormOnlyConfig:
    """Configuration of a norm-only adapter, in the style of peft's ``LNTuningConfig``.

    >>> cfg = NormOnlyConfig(modules_to_save=["fc"], init="frankle")
    >>> cfg.save_pretrained("out/"); NormOnlyConfig.from_pretrained("out/") == cfg
    True
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Normalization layers to train. None: every layer normonly detects by type (BatchNorm, LayerNorm, "
            "GroupNorm, RMSNorm, ...). A list of qualified names or dotted suffixes ('bn1' matches 'layer1.0.bn1'), "
            "or one regex that must match a whole module name."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Normalization layers or parameters to leave frozen; same name rules as target_modules."},
    )
    modules_to_save: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Other modules trained in full and saved with the adapter, e.g. a new classification head "
            "(['fc'], ['classifier']). Same name rules as target_modules."
        },
    )
    train_weight: bool = field(default=True, metadata={"help": "Train the scales γ (the norms' `weight`)."})
    train_bias: bool = field(default=True, metadata={"help": "Train the shifts β (the norms' `bias`)."})
    bn_stats: str = field(
        default="update",
        metadata={
            "help": "BatchNorm running statistics. 'update': they follow the fine-tuning data in train mode and are "
            "saved with the adapter. 'freeze': BatchNorm always normalizes with the base model's running statistics, "
            "in train mode too, and they are not saved."
        },
    )
    init: str = field(
        default="keep",
        metadata={
            "help": "Initial γ/β of a new adapter: 'keep' (pretrained values), 'frankle' (γ ~ U[0, 1], β = 0), "
            "'ones' (identity scale, β = 0), 'theory' (from a target network passed as init_kwargs={'target': net}), "
            "or any name added with normonly.init.register_initializer. Not applied when an adapter is loaded."
        },
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Name or path of the base model the adapter was trained on (informative)."}
    )
    base_model_spec: dict | None = field(
        default=None,
        metadata={
            "help": "How to rebuild the base model: {'builder': NAME, 'kwargs': {...}} with NAME a builder registered "
            "in normonly.models.BUILDERS (the recipes record it); normonly.build_base(adapter_dir) uses it."
        },
    )

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            setattr(self, name, _check_names(name, getattr(self, name)))
        for name in ("train_weight", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {_short(getattr(self, name))}")
        if not (self.train_weight or self.train_bias):
            raise ValueError("train_weight and train_bias are both False: the adapter would train nothing")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats={_short(self.bn_stats)} is not one of {list(BN_STATS)}")
        if self.init not in INITIALIZERS:
            raise ValueError(f"init={_short(self.init)} is not a known initializer; choose one of {sorted(INITIALIZERS)}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string or None, got {_short(self.base_model_name_or_path)}")
        if self.base_model_spec is not None and not (
            isinstance(self.base_model_spec, dict) and set(self.base_model_spec) == {"builder", "kwargs"}
            and isinstance(self.base_model_spec["builder"], str) and isinstance(self.base_model_spec["kwargs"], dict)
        ):
            raise ValueError(f"base_model_spec must be {{'builder': NAME, 'kwargs': {{...}}}} or None, got "
                             f"{_short(self.base_model_spec)}")

    def to_dict(self) -> dict:
        """The JSON-ready dict written to adapter_config.json."""
        return {"adapter_type": ADAPTER_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> NormOnlyConfig:
        """Build a config from ``to_dict()`` output; every field must be present and none unknown."""
        data = dict(data)
        if "peft_type" in data:
            raise ValueError(
                f"{source} is a peft adapter config (peft_type={_short(data['peft_type'])}), not a normonly one. Convert an "
                "LN-tuning adapter with normonly.from_peft_adapter(peft_dir, out_dir, base_model)."
            )
        kind = data.pop("adapter_type", None)
        if kind != ADAPTER_TYPE:
            raise ValueError(f"{source} has adapter_type={_short(kind)}, expected {ADAPTER_TYPE!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source} has unknown field(s) {_short(unknown)}; NormOnlyConfig fields are {known}")
        missing = [k for k in known if k not in data and k not in OPTIONAL_FIELDS]
        if missing:
            raise ValueError(
                f"{source} lacks field(s) {missing}; it was not written by NormOnlyConfig.save_pretrained "
                "or was edited: add them or save the adapter again"
            )
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``save_directory/adapter_config.json`` atomically."""
        write_files(save_directory, json_files={CONFIG_NAME: self.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> NormOnlyConfig:
        """Read ``directory/adapter_config.json``; errors name the file and the offending fields."""
        path = Path(directory) / CONFIG_NAME
        return cls.from_dict(read_json(path), source=str(path))


def _check_names(name: str, value):
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_PATTERN_CHARS:
            raise ValueError(f"{name} is a regex of {len(value):,} characters, more than {MAX_PATTERN_CHARS:,}: refused; "
                             "use a list of module names")
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name}={_short(value)} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name}=[] selects nothing: leave it None for the default, or name modules")
        if len(value) > MAX_NAMES:
            raise ValueError(f"{name} lists {len(value):,} names, more than {MAX_NAMES:,}: refused")
        if all(isinstance(v, str) and v for v in value):
            if sum(map(len, value)) > MAX_PATTERN_CHARS:
                raise ValueError(f"{name} holds more than {MAX_PATTERN_CHARS:,} characters of names: refused")
            return list(value)
    raise ValueError(f"{name} must be None, a regex string or a list of module names, got {_short(value)}")


def _short(value, limit: int = 80) -> str:
    """repr of ``value`` cut to ``limit`` characters, for error messages about inputs that may be huge."""
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = limit, limit, 4, 4, 2
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
