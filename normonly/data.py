"""CIFAR-10 for the recipes: load once through `datasets`, keep it as uint8 tensors, augment whole batches.

A hub name (``uoft-cs/cifar10``) or a local folder in that layout (``img``/``label`` columns, ``train``/``test``
splits) is decoded once to uint8 arrays and cached as safetensors, so later runs start in about a second.
Augmentation (pad-4 random crop, horizontal flip) and normalization run on whole batches on the training
device, which keeps a couple of CPU cores free for the model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .safe_io import write_files

__all__ = [
    "CIFAR10_HUB_NAME",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "augment",
    "load_cifar10",
    "normalize",
    "resolve_cifar10",
]

CIFAR10_HUB_NAME = "uoft-cs/cifar10"
# Frankle et al. (OpenLTH) normalize with these values (the std is the widely copied per-image one).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
ENV_VAR = "NORMONLY_CIFAR10"
_SHARED_COPY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_WHERE = (
    "Pass --data PATH (a folder in the layout of the hub dataset uoft-cs/cifar10, e.g. ../shared/data/cifar10), "
    f"set {ENV_VAR}=PATH, or pass the hub name {CIFAR10_HUB_NAME}."
)


def resolve_cifar10(data: str | os.PathLike | None = None) -> str:
    """Where to read CIFAR-10 from: ``data`` if given, else ``$NORMONLY_CIFAR10``, else ``../shared/data/cifar10``
    beside the repository when it exists, else the hub name ``uoft-cs/cifar10``."""
    if data:
        return str(data)
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    if _SHARED_COPY.is_dir():
        return str(_SHARED_COPY)
    return CIFAR10_HUB_NAME


def _is_local(source: str) -> bool:
    if Path(source).expanduser().exists():
        return True
    if source.startswith((".", "/", "~")) or not _HUB_NAME.fullmatch(source):
        raise FileNotFoundError(f"CIFAR-10 folder {source!r} does not exist. {_WHERE}")
    return False


def _fingerprint(source: str, local: bool) -> str:
    """Changes when the source files change, so a stale cache is never used."""
    digest = hashlib.sha256(f"cifar10-v1|{source if not local else Path(source).expanduser().resolve()}".encode())
    if local:
        for f in sorted(p for p in Path(source).expanduser().rglob("*") if p.is_file()):
            st = f.stat()
            digest.update(f"|{f.relative_to(Path(source).expanduser())}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("NORMONLY_CACHE", Path.home() / ".cache" / "normonly"))


def _decode(source: str, local: bool, progress: bool) -> dict[str, torch.Tensor]:
    import numpy as np
    from datasets import load_dataset
    from tqdm.auto import tqdm

    try:
        splits = load_dataset(str(Path(source).expanduser()) if local else source)
    except Exception as err:  # datasets raises many types; all mean "not a usable dataset here"
        what = f"folder {source!r}" if local else f"hub dataset {source!r}"
        raise ValueError(f"could not load CIFAR-10 from the {what}: {type(err).__name__}: {err}. {_WHERE}") from None
    missing = {"train", "test"} - set(splits)
    if missing:
        raise ValueError(f"{source!r} has splits {sorted(splits)}, but CIFAR-10 needs 'train' and 'test'. {_WHERE}")
    out = {}
    for split in ("train", "test"):
        ds = splits[split]
        if not {"img", "label"} <= set(ds.column_names):
            raise ValueError(
                f"the {split!r} split of {source!r} has columns {ds.column_names}; expected 'img' (images) and "
                f"'label' (0-9), as in {CIFAR10_HUB_NAME}. {_WHERE}"
            )
        images = [
            np.asarray(im.convert("RGB"))
            for im in tqdm(ds["img"], desc=f"decoding CIFAR-10 {split}", disable=not progress, leave=False)
        ]
        if not images or any(im.shape != (32, 32, 3) for im in images):
            bad = next((im.shape for im in images if im.shape != (32, 32, 3)), "no images")
            raise ValueError(f"the {split!r} split of {source!r} is not 32x32 RGB CIFAR-10 (found {bad}). {_WHERE}")
        labels = torch.as_tensor(np.asarray(ds["label"]), dtype=torch.uint8)
        if labels.numel() != len(images) or int(labels.max()) > 9:
            raise ValueError(f"the {split!r} split of {source!r} has labels outside 0-9. {_WHERE}")
        out[f"x_{split}"] = torch.from_numpy(np.stack(images))  # (N, 32, 32, 3) uint8, NHWC
        out[f"y_{split}"] = labels
    return out


def load_cifar10(
    data: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """CIFAR-10 as uint8 tensors: ``x_train`` (N, 32, 32, 3), ``y_train`` (N,), ``x_test``, ``y_test``.

    ``data`` is a local folder in the layout of ``uoft-cs/cifar10`` or a hub name (see ``resolve_cifar10`` for
    the default). The decoded arrays are cached in ``cache_dir`` (default ``$NORMONLY_CACHE`` or
    ``~/.cache/normonly``), keyed by the source files' names, sizes and times. Raises ``FileNotFoundError``
    for a missing folder and ``ValueError`` for one that is not CIFAR-10, before anything is trained.

    >>> d = load_cifar10("../shared/data/cifar10")
    >>> d["x_train"].shape, d["y_test"].shape
    (torch.Size([50000, 32, 32, 3]), torch.Size([10000]))
    """
    from safetensors.torch import load_file

    source = resolve_cifar10(data)
    local = _is_local(source)
    if local and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"CIFAR-10 source {source!r} is a file, not a folder. {_WHERE}")
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = cache / f"cifar10-{_fingerprint(source, local)}.safetensors"
    if path.is_file():
        try:
            return load_file(path)
        except Exception:  # a corrupt cache is rebuilt, never trusted
            pass
    tensors = _decode(source, local, progress)
    try:
        write_files(cache, tensor_files={path.name: tensors}, digest=False)  # atomic: never a half-written cache
    except OSError:
        pass  # a read-only cache location only costs the next run a decode
    return tensors


def augment(images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip of a whole uint8 NHWC batch, on its device.

    Same distribution as torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` per image,
    done with one gather for the batch; ``generator`` (on ``images.device``) makes it reproducible.
    """
    n, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    kw = {"generator": generator, "device": images.device}
    top = torch.randint(0, 2 * padding + 1, (n, 1), **kw)
    left = torch.randint(0, 2 * padding + 1, (n, 1), **kw)
    flip = torch.rand(n, 1, **kw) < 0.5
    rows = top + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    cols = left + torch.where(flip, cols.flip(0), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def normalize(images: torch.Tensor, channels_last: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC batch → normalized float NCHW (channels_last strides when ``channels_last``), Frankle's stats."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device, dtype=dtype) * 255
    inv_std = 1 / (torch.tensor(CIFAR10_STD, device=images.device, dtype=dtype) * 255)
    x = (images.to(dtype) - mean) * inv_std  # broadcasts over the trailing channel axis
    x = x.permute(0, 3, 1, 2)  # a free view: NCHW logically, channels_last in memory
    return x if channels_last else x.contiguous()
