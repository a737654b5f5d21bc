"""Fine-tune tiny HuggingFace models (random weights, no download) with natgrad and AdamW.

Runs the example of docs/huggingface.md: sequence classification with GPT-2, causal language
modelling with Llama (labels -100 on a prompt prefix) and LoRA adapters (peft) on GPT-2, each
with iEF and with AdamW, and prints the losses and the mean step time of each.

    python benchmarks/hf_finetune.py [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import transformers as hf

import natgrad

VOCAB, TOKENS, BATCH = 64, 16, 16


def make_model(task: str, lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "classification":
        config = hf.GPT2Config(
            vocab_size=VOCAB, n_positions=TOKENS, n_embd=32, n_layer=2, n_head=2,
            num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = hf.GPT2ForSequenceClassification(config)
    else:
        config = hf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=TOKENS, pad_token_id=0,
            bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
        model = hf.LlamaForCausalLM(config)
    if lora:
        import peft

        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
            modules_to_save=["score"],  # the classification head trains too
        )  # fmt: skip
        model = peft.get_peft_model(model, config)
    return model.eval()  # no dropout: natgrad's rows are those of the model as it runs


def batches(task: str, steps: int):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=generator)
        if task == "classification":  # label: is the last token in the lower half?
            labels = (ids[:, -1] < VOCAB // 2).long()
        else:  # a learnable sequence: each token repeats the one before it, after a prompt
            ids[:, 1:] = ids[:, :1]
            labels = ids.clone()
            labels[:, :4] = -100  # prompt tokens do not count in the loss
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def train(task: str, method: str, steps: int, lora: bool = False) -> tuple[list[float], float]:
    model = make_model(task, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adamw":
        opt, pre = torch.optim.AdamW(params, lr=1e-3), None
    else:
        opt = torch.optim.SGD(params, lr=0.5)
        pre = natgrad.IEF(model, damping=1e-3)
    losses, times = [], []
    for inputs, labels in batches(task, steps):
        start = time.perf_counter()
        opt.zero_grad()
        out = model(**inputs, labels=labels)  # HF's own loss: mean over the counted labels
        if pre is None:
            out.loss.backward()
        else:
            pre.backward(out.loss)  # or out.loss.backward()
            pre.step(out.logits)
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
    return losses, sum(times[2:]) / len(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, batch {BATCH} x {TOKENS} tokens, {args.threads} threads")
    warnings.filterwarnings("ignore", module="peft|transformers")
    for task, lora in [("classification", False), ("causal", False), ("classification", True)]:
        for method in ("ief", "adamw"):
            losses, step = train(task, method, args.steps, lora)
            name = f"{task}{' + LoRA' if lora else ''}"
            print(
                f"{name:22s} {method:6s} loss {losses[0]:.3f} -> {losses[-1]:.3f}   "
                f"{1000 * step:6.1f} ms/step"
            )


if __name__ == "__main__":
    main()
