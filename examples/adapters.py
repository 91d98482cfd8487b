"""Norm-only adapters, PEFT-style: train two tasks on one base, save, load, switch, move to peft and back, merge.

PYTHONPATH=. python examples/adapters.py
"""

import tempfile
import warnings

import peft
import torch
import torchvision

import normonly
from normonly import NormOnlyConfig, NormOnlyModel

warnings.filterwarnings("ignore", message="Unsupported layer type")  # peft LN tuning: harmless, once per norm layer


def pretrained():
    torch.manual_seed(0)  # stands in for loading the same pretrained weights each time
    return torchvision.models.resnet18(num_classes=10)


def train(model, seed, steps=5):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"trained with seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


out = tempfile.mkdtemp()
config = NormOnlyConfig(modules_to_save=["fc"])  # BatchNorm γ/β (+ running stats) and the new head
model = normonly.get_normonly_model(pretrained(), config)  # adapter "default", active and trainable
model.print_trainable_parameters()
train(model, seed=1)
model.add_adapter("task_b", config)  # a second task on the same base
model.set_adapter("task_b")  # build the optimizer after switching
train(model, seed=2)
model.save_pretrained(out)  # out/ holds "default", out/task_b/ the other: JSON + safetensors

served = NormOnlyModel.from_pretrained(pretrained(), out)  # frozen, eval mode
served.load_adapter(f"{out}/task_b", adapter_name="task_b")
x = torch.randn(4, 3, 32, 32)
for name in ("default", "task_b"):
    served.set_adapter(name)  # copies a few hundred tensors in place: ~0.1 ms
    print(name, served(x).argmax(1).tolist())
with served.disable_adapter():  # the base model's own values
    print("base", served(x).argmax(1).tolist())

normonly.to_peft_adapter(out, f"{out}/peft", pretrained())  # a stock peft LN-tuning adapter
peft_model = peft.PeftModel.from_pretrained(pretrained(), f"{out}/peft").eval()
served.set_adapter("default")
print("peft gives the same outputs:", torch.equal(peft_model(x), served(x)))
normonly.from_peft_adapter(f"{out}/peft", f"{out}/back", pretrained())  # and back

merged = served.merge_and_unload()  # a plain ResNet holding the active adapter's values
print("merged:", type(merged).__name__, merged(x).argmax(1).tolist())
