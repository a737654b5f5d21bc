"""Tiny HuggingFace models (random weights, built from configs) and their dense per-sequence
oracle: explicit per-sequence gradients, output Jacobians and output Hessians, one autograd call
each, in the layout of :class:`oracle.DenseBatch` (a sequence's ``T x V`` logits flattened into
its output vector), so that :func:`oracle.expected_update` gives every Fisher type's update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oracle import DenseBatch

VOCAB, CLASSES, TOKENS, BATCH = 10, 3, 5, 3
KINDS = ("gpt2", "bert", "llama")
TASKS = ("classification", "causal")


def make_model(kind: str, task: str, tie: bool = False) -> nn.Module:
    """A two-layer float64 model in eval mode, hidden size 8, no dropout; ``tie``: the LM head
    shares the token embedding's weight (HF's default for GPT-2 and BERT)."""
    import transformers as hf

    common = dict(vocab_size=VOCAB, tie_word_embeddings=tie, pad_token_id=0, num_labels=CLASSES)
    if kind == "gpt2":
        config = hf.GPT2Config(
            n_positions=8,
            n_embd=8,
            n_layer=2,
            n_head=2,
            n_inner=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=1,
            **common,
        )
        classes = (hf.GPT2ForSequenceClassification, hf.GPT2LMHeadModel)
    elif kind == "bert":
        config = hf.BertConfig(
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            is_decoder=task == "causal",
            **common,
        )
        classes = (hf.BertForSequenceClassification, hf.BertLMHeadModel)
    else:
        config = hf.LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=8,
            bos_token_id=1,
            eos_token_id=1,
            **common,
        )
        classes = (hf.LlamaForSequenceClassification, hf.LlamaForCausalLM)
    config._attn_implementation = "eager"
    model_class = classes[0] if task == "classification" else classes[1]
    return model_class(config).double().eval()


def make_batch(task: str, ignored: bool = True, seed: int = 0) -> tuple[dict, Tensor]:
    """Inputs ``{"input_ids", "attention_mask"}`` (no padding token) and labels: per sequence
    for classification, per token (HF's unshifted labels) for causal LM; ``ignored`` marks
    some labels ``-100``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        if ignored:
            labels[1] = -100
    else:
        labels = ids.clone()
        if ignored:
            labels[0, :3] = -100
            labels[2, 2] = -100
    return inputs, labels


def sequence_losses(task: str, logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence losses ``l_n`` (sum of the counted tokens' cross-entropies): HF's loss
    before its mean, with the causal shift (logits at ``t`` predict the label at ``t + 1``)."""
    if task == "classification":
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    per_token = F.cross_entropy(
        logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="none"
    )
    return per_token.reshape(labels.shape).sum(dim=1)


def hf_loss(task: str, logits: Tensor, labels: Tensor) -> Tensor:
    """HF's mean over the counted labels, in the logits' dtype (HF's own causal-LM loss
    computes in float32)."""
    return sequence_losses(task, logits, labels).sum() / counted_mask(task, labels).sum()


def counted_mask(task: str, labels: Tensor) -> Tensor:
    """Which positions of the logits count in the loss, from the labels alone."""
    if task == "classification":
        return labels != -100
    return F.pad(labels, (0, 1), value=-100)[:, 1:] != -100


def _flat_grad(output: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``d output / d params`` as one vector, zero for parameters the output does not use."""
    grads = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return torch.cat([g.reshape(-1) for g in grads])


def dense_sequence_batch(model: nn.Module, task: str, inputs: dict, labels: Tensor) -> DenseBatch:
    """Per-sequence gradients of ``l_n``, Jacobians ``d z_n / d θ`` and Hessians
    ``d^2 l_n / d z_n^2``, each sequence run alone through the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_grads, jacobians, output_grads, hessians = [], [], [], []
    for n in range(labels.shape[0]):
        one = {key: value[n : n + 1] for key, value in inputs.items()}
        label = labels[n : n + 1]
        logits = model(**one).logits
        shape = logits.shape

        def loss_of(flat: Tensor, label: Tensor = label, shape: torch.Size = shape) -> Tensor:
            return sequence_losses(task, flat.reshape(shape), label).sum()

        flat = logits.reshape(-1)
        loss_grads.append(_flat_grad(loss_of(flat), params))
        rows = [_flat_grad(flat[index], params) for index in range(flat.shape[0])]
        jacobians.append(torch.stack(rows))
        detached = flat.detach().requires_grad_(True)
        output_grads.append(torch.autograd.grad(loss_of(detached), detached)[0])
        hessians.append(torch.autograd.functional.hessian(loss_of, flat.detach()))
    return DenseBatch(
        params=params,
        factor=1.0 / int(counted_mask(task, labels).sum()),
        loss_grads=torch.stack(loss_grads),
        output_jacobians=torch.stack(jacobians),
        output_grads=torch.stack(output_grads),
        output_hessians=torch.stack(hessians),
    )


def dense_token_batch(model: nn.Module, inputs: dict, labels: Tensor) -> DenseBatch:
    """Per-token datapoints of a causal LM: for every token in the loss, the gradient of its
    own cross-entropy ``l_{nt}``, the Jacobian ``d z_{nt} / d θ`` and the Hessian
    ``d^2 l_{nt} / d z_{nt}^2``, each sequence run alone through the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    counted = counted_mask("causal", labels)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    loss_grads, jacobians, output_grads, hessians = [], [], [], []
    for n in range(labels.shape[0]):
        logits = model(**{key: value[n : n + 1] for key, value in inputs.items()}).logits[0]
        for t in range(logits.shape[0]):
            if not counted[n, t]:
                continue
            label = shifted[n, t]

            def loss_of(z: Tensor, label: Tensor = label) -> Tensor:
                return F.cross_entropy(z, label)

            loss_grads.append(_flat_grad(loss_of(logits[t]), params))
            jacobians.append(torch.stack([_flat_grad(z, params) for z in logits[t]]))
            detached = logits[t].detach().requires_grad_(True)
            output_grads.append(torch.autograd.grad(loss_of(detached), detached)[0])
            hessians.append(torch.autograd.functional.hessian(loss_of, logits[t].detach()))
    return DenseBatch(
        params=params,
        factor=1.0 / int(counted.sum()),
        loss_grads=torch.stack(loss_grads),
        output_jacobians=torch.stack(jacobians),
        output_grads=torch.stack(output_grads),
        output_hessians=torch.stack(hessians),
    )
