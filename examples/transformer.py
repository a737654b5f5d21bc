"""A small transformer classifier trained with the improved empirical Fisher (iEF).

``natgrad.layers.replace_attention`` swaps torch's ``nn.MultiheadAttention`` (also inside
``nn.TransformerEncoderLayer``) for an equivalent built from four ``nn.Linear`` projections,
weights copied, so that every projection gets the exact neuron-view treatment; iEF is Wu et
al. 2024, eq. 19. Task: is token 1 more frequent than token 2 in a sequence of 12 tokens?
Run: ``python examples/transformer.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.layers import replace_attention


class Classifier(nn.Module):
    def __init__(self, vocabulary: int = 6, width: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=2, dim_feedforward=32,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


torch.manual_seed(0)
tokens = torch.randint(0, 6, (512, 12))
labels = ((tokens == 1).sum(dim=1) > (tokens == 2).sum(dim=1)).long()
model = replace_attention(Classifier())
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
pre = natgrad.IEF(model, likelihood="categorical", damping=1e-3)
print(pre.describe())
losses = []
for epoch in range(4):
    for x, y in zip(tokens.split(64), labels.split(64), strict=True):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        pre.step(logits)
        opt.step()
        losses.append(loss.item())
    print(f"epoch {epoch}: loss {losses[-1]:.3f}")
print(f"loss: first {losses[0]:.4f} last {losses[-1]:.4f}")
