"""KFAC with heuristic and with correct damping, and FOOF (gradient descent on neurons).

KFAC: Martens & Grosse 2015; the two dampings: Benzing 2022, eq. 2-4 and App. D; FOOF:
Benzing 2022, eq. 5-6 and Algorithm 1 (inverses refreshed every ``inv_period`` steps, factors
averaged over the ``pre_inversion_steps`` before each inversion).
Run: ``python examples/kfac_foof.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad


def train(make_preconditioner, lr: float, epochs: int = 4) -> list[float]:
    torch.manual_seed(0)
    inputs = torch.randn(512, 10)
    labels = (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 1).long()  # 3 classes
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = make_preconditioner(model)
    losses = []
    for _ in range(epochs):
        for x, y in zip(inputs.split(64), labels.split(64), strict=True):
            opt.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            pre.backward(loss)  # the fused path: each weight gradient is written once
            pre.step(logits)
            opt.step()
            losses.append(loss.item())
    return losses


# KFAC inverts every step here (inv_period=1): its learning rates were tuned so, and with the
# default inv_period=20 the first batch's inverse, reused for 20 steps, diverges at lr 0.05
methods = {
    "KFAC heuristic": (
        lambda m: natgrad.KFAC(m, damping=1e-2, damping_mode="heuristic", inv_period=1),
        0.05,
    ),
    "KFAC correct": (
        lambda m: natgrad.KFAC(m, damping=1e-2, damping_mode="correct", inv_period=1),
        0.01,
    ),
    "FOOF": (lambda m: natgrad.FOOF(m, damping=1.0, inv_period=4, pre_inversion_steps=2), 0.05),
}
first, last = [], []
for name, (make, lr) in methods.items():
    losses = train(make, lr=lr)
    print(f"{name:15s} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    first.append(losses[0])
    last.append(losses[-1])
# the worst method: every method starts from the same loss and ends below it
print(f"loss: first {min(first):.4f} last {max(last):.4f}")
