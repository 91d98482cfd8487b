"""Train only the BatchNorm γ/β (+ a new head) of a torchvision ResNet-18 for a few steps."""

import torch
import torchvision

import normonly

model = torchvision.models.resnet18(num_classes=10)
normonly.freeze_all_but_norm(model, extra_trainable=["fc"])
normonly.print_trainable_parameters(model)  # trainable params: 14,730 || all params: 11,181,642 || ...
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
for step in range(5):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.3f}")
