"""FishLeg: a learned inverse Fisher ``Q(λ)`` (Garcia et al. 2023, sec. 4 and Algorithm 1).

Every ``aux_period`` steps, Adam takes a step on FishLeg's auxiliary loss, built from an exact
Fisher-vector product of the batch; ``Q(λ)`` is Kronecker-factored per layer (App. A.5) or
diagonal. FishLeg applies its own momentum, so the optimiser is SGD without momentum.
Run: ``python examples/fishleg.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

torch.manual_seed(0)
# a regression task: a small teacher network plus noise
inputs = torch.randn(512, 8)
teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
with torch.no_grad():
    targets = teacher(inputs) + 0.01 * torch.randn(512, 2)

first, last = [], []
for q_structure in ("kron", "diag"):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = natgrad.FishLeg(model, likelihood="gaussian", damping=1e-3, aux_lr=1e-3,
                          aux_period=2, momentum=0.9, q_structure=q_structure)
    losses = []
    for _ in range(5):
        for x, y in zip(inputs.split(32), targets.split(32), strict=True):
            opt.zero_grad()
            predictions = model(x)
            loss = F.mse_loss(predictions, y)
            loss.backward()
            pre.step(predictions)
            opt.step()
            losses.append(loss.item())
    print(f"FishLeg, Q {q_structure}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    first.append(losses[0])
    last.append(losses[-1])
print(f"loss: first {min(first):.4f} last {max(last):.4f}")
