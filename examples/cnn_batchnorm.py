"""A small CNN with BatchNorm, trained with the empirical Fisher and with KFAC.

Convolutions use the neuron view with weights shared over pixels; BatchNorm's weight and bias
get exact per-sample rows (in train mode, with the batch's own statistics); ``describe()``
lists what each module gets. Images: 8 x 8 noise with a class-dependent bright quadrant.
Run: ``python examples/cnn_batchnorm.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

torch.manual_seed(0)
labels = torch.randint(0, 4, (512,))
images = torch.randn(512, 1, 8, 8)
for c, (r, s) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
    images[labels == c, :, r:r + 4, s:s + 4] += 0.5


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, kernel_size=3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )


first, last = [], []
for name in ("EF", "KFAC"):
    model = make_model()
    if name == "EF":
        pre = natgrad.EF(model, likelihood="categorical", damping=1e-1)
    else:
        pre = natgrad.KFAC(model, likelihood="categorical", damping=1e-2)
    print(pre.describe())
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(2):
        for x, y in zip(images.split(64), labels.split(64), strict=True):
            opt.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            pre.step(logits)
            opt.step()
            losses.append(loss.item())
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    first.append(losses[0])
    last.append(losses[-1])
print(f"loss: first {min(first):.4f} last {max(last):.4f}")
