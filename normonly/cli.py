"""The ``normonly`` command: inspect a model's norm layers, read, convert and merge adapters, compare runs.

    normonly inspect resnet18 [--json]                       # also `python -m normonly ...`
    normonly info runs/r14-norm/adapter
    normonly convert runs/r14-norm/adapter out/peft --to peft
    normonly merge recorded runs/r14-norm/adapter out/merged
    normonly report runs/r14-norm runs/r14-all --out report

torch, transformers, timm and matplotlib are imported inside the commands, so ``--help`` answers at once.
A bad argument ends with one line, ``normonly COMMAND: error: argument X: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["main", "load_model", "inspect_model", "adapter_info"]

MODEL_HELP = ("a torchvision or timm model name (random weights, nothing is downloaded), a normonly builder "
              "(cifar_resnet, ...), a local transformers folder or hub id (org/name), or module:function that "
              "returns the model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class UsageError(Exception):
    """A bad command-line argument; shown as ``normonly COMMAND: error: argument NAME: message``, exit status 2."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {' '.join(str(message).split())}")


@contextmanager
def _blame(argument: str) -> Iterator[None]:
    """Turn the library's errors (which name the file and what to do) into a UsageError naming ``argument``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError, ImportError) as err:
        raise UsageError(argument, err) from None


# ---------------------------------------------------------------- models
def parse_kwargs(text: str) -> dict:
    """The ``--kwargs`` JSON object."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError("--kwargs", f"not valid JSON ({err.msg} at column {err.colno}): pass an object such "
                         "as '{\"depth\": 14}'") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs", f"expected a JSON object such as '{{\"depth\": 14}}', got a {type(kwargs).__name__}")
    return kwargs


def load_model(spec: str, kwargs: dict | None = None, argument: str = "MODEL"):
    """Build the model ``spec`` names (see ``MODEL_HELP``) with ``kwargs``; returns ``(model, source)``.

    >>> model, source = load_model("resnet18")          # torchvision, random weights: source == "torchvision"
    >>> model, source = load_model("normonly.models:cifar_resnet", {"depth": 14})
    """
    from torch import nn

    kwargs = kwargs or {}
    builder, source = _resolve(spec, argument)
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError("--kwargs" if kwargs else argument, f"cannot build {spec} with kwargs {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(argument, f"{spec} returned a {type(model).__name__}, not a torch nn.Module")
    return model, source


def _resolve(spec: str, argument: str):
    """The function that builds ``spec`` (called with the --kwargs) and where it comes from."""
    import functools
    import re

    import torchvision

    from .models import BUILDERS

    if ":" in spec and not Path(spec).exists():
        return _import_builder(spec, argument), "module:function"
    if Path(spec).is_dir():
        return functools.partial(_transformers, spec, argument, True), "transformers folder"
    if spec in torchvision.models.list_models():
        return functools.partial(torchvision.models.get_model, spec, weights=None), "torchvision"
    try:
        import timm
    except ImportError:  # timm is optional
        timm = None
    if timm is not None and timm.is_model(spec):
        return functools.partial(timm.create_model, spec, pretrained=False), "timm"
    if spec in BUILDERS:
        return BUILDERS[spec], "normonly builder"
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec):
        return functools.partial(_transformers, spec, argument, False), "Hugging Face hub"
    raise UsageError(argument, f"{spec!r} is not a torchvision or timm model name, a normonly builder, an existing "
                     "folder, a hub id (org/name) or module:function; list names with torchvision.models.list_models() "
                     "or timm.list_models()")


def _import_builder(spec: str, argument: str):
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(argument, f"{spec!r} is not module:function, e.g. normonly.models:cifar_resnet")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current folder can be named
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as err:
        raise UsageError(argument, f"cannot import module {module_name!r} ({err})") from None
    except AttributeError:
        raise UsageError(argument, f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise UsageError(argument, f"{spec} is a {type(fn).__name__}, not a function that builds the model")
    return fn


def _transformers(spec: str, argument: str, local: bool, /, **kwargs):
    from transformers import AutoConfig, AutoModel

    if local and not (Path(spec) / "config.json").is_file():
        raise UsageError(argument, f"folder {spec} has no config.json: it is not a transformers model folder")
    try:
        if local and not any((Path(spec) / f).is_file() for f in WEIGHT_FILES):
            return AutoModel.from_config(AutoConfig.from_pretrained(spec, **kwargs))  # a config only: random weights
        return AutoModel.from_pretrained(spec, **kwargs)
    except OSError as err:
        where = "folder" if local else "Hugging Face hub id"
        raise UsageError(argument, f"cannot load {where} {spec} with transformers.AutoModel: {err}") from None


# ---------------------------------------------------------------- inspect
def inspect_model(model) -> dict:
    """Norm layers by class, parameter counts after ``freeze_all_but_norm`` (in place), the real size of the
    default adapter's file, and γ/β statistics of ``model``; JSON-ready."""
    import tempfile
    from collections import Counter

    from safetensors import safe_open

    import normonly
    from normonly.analysis import DISABLED_THRESHOLD, gamma_stats
    from normonly.config import WEIGHTS_NAME

    counts = Counter(type(m).__name__ for _, m in normonly.norm_layers(model))
    normonly.freeze_all_but_norm(model)
    trainable, total = normonly.count_parameters(model)
    wrapped = normonly.get_normonly_model(model, normonly.NormOnlyConfig())
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save_pretrained(tmp)  # measure the real file: tensors, header and all
        adapter_bytes = (Path(tmp) / WEIGHTS_NAME).stat().st_size
        with safe_open(str(Path(tmp) / WEIGHTS_NAME), framework="numpy") as f:
            tensors = len(list(f.keys()))
    wrapped.unload()
    info = {"norm_layers": dict(counts), "norm_layer_count": sum(counts.values()), "trainable_params": trainable,
            "total_params": total, "trainable_percent": 100 * trainable / max(total, 1),
            "adapter_bytes": adapter_bytes, "adapter_tensors": tensors}
    try:
        stats = gamma_stats(model)
    except ValueError:  # no norm layer with an affine γ
        return {**info, "channels": 0}
    beta = sum(layer["beta_mean"] * layer["channels"] for layer in stats["layers"]) / stats["channels"]
    return {**info, "channels": stats["channels"], "gamma_abs_mean": stats["gamma_abs_mean"],
            "disabled_threshold": DISABLED_THRESHOLD, "disabled_fraction": stats["disabled_fraction"], "beta_mean": beta}


def _inspect(args) -> None:
    model, source = load_model(args.model, parse_kwargs(args.kwargs))
    with _blame("MODEL"):
        info = {"model": args.model, "source": source, "class": type(model).__name__, **inspect_model(model)}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    layers = ", ".join(f"{name} ×{n}" for name, n in info["norm_layers"].items())
    print(f"model        {info['model']} ({info['class']}, {source})")
    print(f"norm layers  {info['norm_layer_count']}: {layers}")
    print(f"parameters   {info['trainable_params']:,} trainable of {info['total_params']:,} "
          f"({info['trainable_percent']:.4f} %) after freeze_all_but_norm")
    print(f"adapter      {info['adapter_bytes']:,} bytes ({info['adapter_tensors']} tensors: γ/β and BatchNorm "
          "statistics, NormOnlyConfig() defaults)")
    if info["channels"]:
        print(f"γ            |γ| mean {info['gamma_abs_mean']:.4f}; {100 * info['disabled_fraction']:.1f} % of "
              f"{info['channels']:,} channels have |γ| < {info['disabled_threshold']}")
        print(f"β            mean {info['beta_mean']:.4f}")


# ---------------------------------------------------------------- info
def _recorded_spec(folder: Path, config: dict | None) -> tuple[dict | None, str | None]:
    from .safe_io import read_json

    if (folder / "base.json").is_file():
        spec, source = read_json(folder / "base.json"), "base.json"
    elif config and config.get("base_model_spec") is not None:
        spec, source = config["base_model_spec"], "adapter_config.json base_model_spec"
    else:
        return None, None
    if not isinstance(spec, dict) or set(spec) != {"builder", "kwargs"} or not isinstance(spec["kwargs"], dict):
        raise ValueError(f"{folder}: {source} is not {{'builder': NAME, 'kwargs': {{...}}}}: {str(spec)[:100]}")
    return spec, source


def _kind(config: dict | None, folder: Path) -> str:
    if config is None:
        return "trainable tensors (normonly.load_trainable)" if (folder / "trainable.safetensors").is_file() else "none"
    if config.get("adapter_type") == "normonly":
        return "normonly"
    if "peft_type" in config:
        return f"peft {config['peft_type']}"
    return f"unknown ({config.get('adapter_type')!r})"


def adapter_info(folder: str | os.PathLike) -> dict:
    """What an adapter folder holds: config, kind, recorded base model, files and tensor headers (no tensor is
    loaded; safetensors headers only, never pickle). JSON-ready."""
    from safetensors import safe_open

    from .safe_io import read_json

    folder = Path(folder)
    config = read_json(folder / "adapter_config.json") if (folder / "adapter_config.json").is_file() else None
    weights = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if config is None and not weights:
        hint = f"; did you mean {folder / 'adapter'}?" if (folder / "adapter").is_dir() else ""
        raise ValueError(f"{folder} holds no adapter_config.json and no .safetensors file{hint}")
    tensors = []
    for path in weights:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    tensors.append({"file": path.name, "name": key, "dtype": part.get_dtype(), "shape": part.get_shape()})
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt") from None
    spec, spec_source = _recorded_spec(folder, config)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    values = sum(math.prod(t["shape"]) for t in tensors)
    return {"folder": str(folder), "kind": _kind(config, folder), "config": config, "base_model_spec": spec,
            "base_model_spec_source": spec_source, "base_model_name_or_path": (config or {}).get("base_model_name_or_path"),
            "files": files, "total_bytes": sum(files.values()), "tensor_count": len(tensors), "values": values,
            "tensors": tensors}


def _info(args) -> None:
    folder = _existing_folder(args.adapter_dir, "ADAPTER_DIR")
    with _blame("ADAPTER_DIR"):
        info = adapter_info(folder)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"folder   {info['folder']}")
    print(f"kind     {info['kind']}")
    for key, value in (info["config"] or {}).items():
        if key not in ("adapter_type", "base_model_spec") and value not in (None, "", [], {}):
            print(f"  {key}: {json.dumps(value)}")
    if info["base_model_spec"]:
        spec = info["base_model_spec"]
        print(f"base     {spec.get('builder')}({', '.join(f'{k}={v!r}' for k, v in spec.get('kwargs', {}).items())}) "
              f"from {info['base_model_spec_source']}: normonly.build_base({str(folder)!r})")
    else:
        print("base     not recorded (pass the base model yourself, e.g. --base MODEL)")
    if info["base_model_name_or_path"]:
        print(f"base_model_name_or_path  {info['base_model_name_or_path']}")
    print(f"files    {', '.join(f'{n} {s:,} B' for n, s in info['files'].items())}; {info['total_bytes']:,} B in all")
    print(f"tensors  {info['tensor_count']}, {info['values']:,} values")
    shown = info["tensors"] if args.limit <= 0 else info["tensors"][: args.limit]
    width = max((len(t["name"]) for t in shown), default=0)
    for t in shown:
        print(f"  {t['name']:<{width}}  {t['dtype']:<4} {t['shape']}  ({t['file']})")
    if len(shown) < len(info["tensors"]):
        print(f"  ... {len(info['tensors']) - len(shown)} more (--limit 0 lists all)")


# ---------------------------------------------------------------- convert, merge
def _existing_folder(text: str, argument: str) -> Path:
    folder = Path(text)
    if not folder.is_dir():
        raise UsageError(argument, f"{text} is not an existing folder")
    return folder


def _new_folder(text: str, source: Path, argument: str) -> Path:
    out = Path(text)
    if out.resolve() == source.resolve():
        raise UsageError(argument, f"{text} is ADAPTER_DIR itself: write to another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(argument, f"{text} exists and is not a folder")
    return out


def _base(model: str, kwargs: str, folder: Path, argument: str):
    """The base model: MODEL, or the one the adapter folder records; returns ``(model, spec or None)``."""
    from .models import build_base

    if model != "recorded":
        kwargs = parse_kwargs(kwargs)
        built, source = load_model(model, kwargs, argument)  # a builder's spec is recorded: base.json in OUT
        return built, ({"builder": model, "kwargs": kwargs} if source == "normonly builder" else None)
    with _blame("ADAPTER_DIR"):
        config = None
        if (folder / "adapter_config.json").is_file():
            from .safe_io import read_json

            config = read_json(folder / "adapter_config.json")
        spec, _ = _recorded_spec(folder, config)
    if spec is None:
        raise UsageError(argument, f"{folder} records no base model (no base.json, no base_model_spec in "
                         f"adapter_config.json): pass {'--base MODEL' if argument == '--base' else 'BASE as a MODEL'}")
    with _blame(argument):
        return build_base(spec), spec


def _convert(args) -> None:
    from .safe_io import read_json, write_files

    src = _existing_folder(args.adapter_dir, "ADAPTER_DIR")
    out = _new_folder(args.out, src, "OUT")
    with _blame("ADAPTER_DIR"):
        kind = _kind(read_json(src / "adapter_config.json"), src)
    needed = "normonly" if args.to == "peft" else "peft LN_TUNING"
    if kind != needed:
        raise UsageError("--to", f"--to {args.to} converts a {needed} adapter, but {src} holds a {kind} adapter")
    base, spec = _base(args.base, args.kwargs, src, "--base")
    from . import from_peft_adapter, to_peft_adapter

    with _blame("ADAPTER_DIR" if args.base == "recorded" else "--base"):  # an adapter that does not fit the base
        (to_peft_adapter if args.to == "peft" else from_peft_adapter)(src, out, base)
    if spec is not None:
        with _blame("OUT"):
            write_files(out, json_files={"base.json": spec})  # peft ignores it; normonly.build_base(OUT) reads it
    print(f"wrote a {args.to} adapter to {out}")


def _unshared(state: dict) -> dict:
    """Clone tensors that share storage with an earlier one (tied weights): safetensors refuses shared memory."""
    seen, out = set(), {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _merge(args) -> None:
    from .safe_io import read_json, write_files

    src = _existing_folder(args.adapter_dir, "ADAPTER_DIR")
    out = _new_folder(args.out, src, "OUT")
    base, spec = _base(args.base, args.kwargs, src, "BASE")
    with _blame("ADAPTER_DIR"):
        if (src / "adapter_config.json").is_file():
            if "peft_type" in read_json(src / "adapter_config.json"):
                raise UsageError("ADAPTER_DIR", f"{src} is a peft adapter: convert it first with `normonly convert "
                                 f"{src} OUT --to normonly`")
            from . import NormOnlyModel

            merged = NormOnlyModel.from_pretrained(base, src).merge_and_unload()
        elif (src / "trainable.safetensors").is_file():
            from . import load_trainable

            merged = load_trainable(base, src / "trainable.safetensors")
        else:
            raise UsageError("ADAPTER_DIR", f"{src} holds neither adapter_config.json nor trainable.safetensors")
    state = _unshared(merged.state_dict())
    with _blame("OUT"):
        write_files(out, json_files={"base.json": spec} if spec else {},
                    tensor_files={"model.safetensors": state}, digest=False)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out / 'model.safetensors'} ({len(state)} tensors, {size:,} bytes)")


def _report(args) -> None:
    from .report import load_run, write_report

    runs = []
    for path in args.run_dirs:
        with _blame("RUN_DIR"):
            runs.append(load_run(path))
    with _blame("--out"):
        markdown, paths = write_report(runs, args.out)
    print(markdown, end="")
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``normonly`` argument parser; every subcommand's ``--help`` shows its defaults."""
    from . import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="normonly", description=__doc__.split("\n")[0], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"normonly {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=fmt)
        p.set_defaults(run=fn, parser=p)
        return p

    kwargs_help = "JSON object of keyword arguments for the model's builder, e.g. '{\"depth\": 14}'"
    p = command("inspect", _inspect, "norm layers, trainable parameters, adapter size and γ/β statistics of a model")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--kwargs", default="{}", help=kwargs_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("info", _info, "what an adapter folder holds: config, tensors, size, the base model it expects")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder written by save_pretrained or a recipe")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--limit", type=int, default=40, help="tensors listed in the text output (0: all)")

    p = command("convert", _convert, "convert an adapter between normonly's format and peft's LN tuning")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the adapter to convert")
    p.add_argument("out", metavar="OUT", help="folder to write the converted adapter to")
    p.add_argument("--to", choices=("peft", "normonly"), required=True, default=argparse.SUPPRESS,
                   help="the format to write")
    p.add_argument("--base", metavar="MODEL", default="recorded", help="the base model: 'recorded' (the one "
                   "ADAPTER_DIR records in base.json or base_model_spec) or " + MODEL_HELP)
    p.add_argument("--kwargs", default="{}", help=kwargs_help + " (for --base)")

    p = command("merge", _merge, "write the base model with an adapter merged in as OUT/model.safetensors")
    p.add_argument("base", metavar="BASE", help="'recorded' (the base model ADAPTER_DIR records) or " + MODEL_HELP)
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a normonly adapter, or a folder with "
                   "trainable.safetensors (head/bitfit runs)")
    p.add_argument("out", metavar="OUT", help="folder to write model.safetensors (and base.json) to")
    p.add_argument("--kwargs", default="{}", help=kwargs_help + " (for BASE)")

    p = command("report", _report, "one table (markdown + CSV) and one PNG comparing recipe runs")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders holding results.json (or results "
                   "JSON files)")
    p.add_argument("--out", default="report", help="write PREFIX.md, PREFIX.csv and PREFIX.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``normonly`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UsageError as err:
        args.parser.error(str(err))  # usage, then `normonly COMMAND: error: ...`; exit status 2
    return 0
