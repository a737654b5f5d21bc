"""How close are EF and iEF to the exact natural gradient? γ ratios on one batch.

``γ(Δ) = (Δᵀ F Δ)^½ / |Δᵀ ∇L|`` is scale-invariant and smallest for the exact natural gradient
(Wu et al. 2024, sec. 6); ``compare_updates`` reports each method's γ over SGD's (below 1: a
better direction than the plain gradient) and its cosine with exact NGD. The script also trains
the model with iEF for a few steps and measures again.
Run: ``python examples/measure_gamma.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.analysis import compare_updates

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # the measurements compare small differences
inputs = torch.randn(256, 10)
labels = (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 1).long()
model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3))
methods = {
    "ngd": lambda m: natgrad.NGD(m, fisher="exact", damping=1e-8),
    "ef": lambda m: natgrad.EF(m, damping=1e-8),
    "ief": lambda m: natgrad.IEF(m, damping=1e-8),
    "f1": lambda m: natgrad.NGD(m, fisher="mc", mc_samples=1, damping=1e-8),
}
x, y = inputs[:32], labels[:32]


def report() -> None:
    record = compare_updates(model, x, lambda logits: F.cross_entropy(logits, y), methods)
    for name in methods:
        print(f"  {name:4s} γ/γ_SGD {record[f'gamma_ratio_{name}']:9.4f}"
              f"   cos with NGD {record[f'cos_ngd_{name}']:.4f}")
    print(f"  gradient-norm imbalance of the batch {record['imbalance']:.1f}")


print("at initialisation:")
report()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
pre = natgrad.IEF(model, damping=1e-3)
losses = []
for _ in range(3):
    for xb, yb in zip(inputs.split(32), labels.split(32), strict=True):
        opt.zero_grad()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        pre.step(logits)
        opt.step()
        losses.append(loss.item())
pre.remove()
print("after 24 iEF steps:")
report()
print(f"loss: first {losses[0]:.4f} last {losses[-1]:.4f}")
