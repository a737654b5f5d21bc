"""Exact mini-batch natural gradient, empirical Fisher and improved empirical Fisher.

The Woodbury family solves the damped ``N x N`` system of the batch exactly, from each layer's
inputs and output gradients (Benzing 2022, App. I; Wu et al. 2024, eq. 17 and 19).
Run: ``python examples/woodbury_ngd.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad


def train(make_preconditioner, epochs: int = 4) -> list[float]:
    torch.manual_seed(0)
    inputs = torch.randn(512, 10)
    labels = (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 1).long()  # 3 classes
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = make_preconditioner(model)
    losses = []
    for _ in range(epochs):
        for x, y in zip(inputs.split(64), labels.split(64), strict=True):
            opt.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            pre.step(logits)
            opt.step()
            losses.append(loss.item())
    return losses


methods = {
    "exact NGD": lambda m: natgrad.NGD(m, likelihood="categorical", fisher="exact", damping=1e-3),
    "EF": lambda m: natgrad.EF(m, likelihood="categorical", damping=1e-3),
    "iEF": lambda m: natgrad.IEF(m, likelihood="categorical", damping=1e-3),
    "TENGraD": lambda m: natgrad.TENGraD(m, likelihood="categorical", damping=1e-3),
}
first, last = [], []
for name, make in methods.items():
    losses = train(make)
    print(f"{name:10s} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    first.append(losses[0])
    last.append(losses[-1])
# the worst method: every method starts from the same loss and ends below it
print(f"loss: first {min(first):.4f} last {max(last):.4f}")
