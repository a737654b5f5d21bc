"""Fine-tune an unmodified HuggingFace causal language model with the improved empirical Fisher.

A tiny Llama built from a config (random weights, no download): natgrad reads the logits inside
the returned ``ModelOutput``, counts only the tokens in the loss (labels ``-100`` are ignored,
as is the last position after HF's causal shift) and preconditions every weight exactly (Wu et
al. 2024, eq. 19). Needs ``pip install -e ".[hf]"``. Run: ``python examples/huggingface.py``.
"""

import torch
import transformers as hf

import natgrad

torch.manual_seed(0)
config = hf.LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, pad_token_id=0,
)  # fmt: skip
model = hf.LlamaForCausalLM(config).eval()  # eval(): no dropout between natgrad's passes
opt = torch.optim.SGD(model.parameters(), lr=0.5)
pre = natgrad.IEF(model, likelihood="categorical", damping=1e-3)

ids = torch.randint(2, 32, (16, 12))
ids[:, 1:] = ids[:, :1]  # a pattern to learn: the first token, repeated
labels = ids.clone()
labels[:, :3] = -100  # the prompt does not count in the loss
losses = []
for _ in range(20):
    opt.zero_grad()
    out = model(input_ids=ids, labels=labels)
    pre.backward(out.loss)  # the fused path (or out.loss.backward())
    pre.step(out.logits)
    opt.step()
    losses.append(out.loss.item())
print(pre.describe())
print(f"loss: first {losses[0]:.4f} last {losses[-1]:.4f}")
