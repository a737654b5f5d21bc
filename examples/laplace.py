"""A full-covariance Laplace posterior from the same curvature rows, sampled exactly.

Train an MLP to its MAP, fit ``natgrad.Laplace`` with the exact Fisher over the whole training
set (the Woodbury sampler of Benzing 2022, App. C: no ``P x P`` matrix), choose the prior
precision by the log marginal likelihood and compare held-out NLLs of the MAP and of the
linearised predictive. Run: ``python examples/laplace.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

torch.manual_seed(0)
inputs = torch.randn(600, 10)
labels = (inputs[:, :3] + 0.5 * torch.randn(600, 3)).argmax(dim=1)  # noisy: calibration matters
train = list(zip(inputs[:500].split(50), labels[:500].split(50), strict=True))
test_x, test_y = inputs[500:], labels[500:]
model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
losses = []
for _ in range(30):
    for x, y in train:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())

la = natgrad.Laplace(model, likelihood="categorical", fisher="exact", structure="full")
la.fit(train)
before = la.log_marginal_likelihood().item()
la.optimize_prior_precision()
print(f"log evidence {before:.1f} at prior precision 1, {la.log_marginal_likelihood().item():.1f}"
      f" at {la.prior_precision[0].item():.3f}")  # fmt: skip
print(f"posterior samples: {tuple(la.sample(100).shape)}")
with torch.no_grad():
    map_nll = F.cross_entropy(model(test_x), test_y).item()
probs = la.predictive(test_x, method="linearised")
print(f"held-out NLL: MAP {map_nll:.3f}, linearised Laplace {F.nll_loss(probs.log(), test_y):.3f}")
print(f"loss: first {losses[0]:.4f} last {losses[-1]:.4f}")  # the MAP's training loss
