"""natgrad.layers.MultiheadAttention: torch's attention from four ``nn.Linear`` projections.

``nn.MultiheadAttention`` applies its query/key/value projections inside
``F.multi_head_attention_forward`` with one fused ``in_proj_weight``, and its output projection
through ``F.linear`` on ``out_proj.weight``: no module call that a hook could capture, so natgrad
would route them to the torch.func fallback (exact, but it materialises per-sample gradients).
:class:`MultiheadAttention` computes the same function from four ``nn.Linear`` projections,
each shared over the sequence positions, so its weights get ``A``/``E`` rows like any linear
layer (Benzing 2022, App. I; the token dimension is the weight-sharing dimension of
:mod:`natgrad.capture`). :func:`replace_attention` swaps it into an existing model, weights
copied, e.g. inside ``nn.TransformerEncoderLayer``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Multi-head attention with the call signature and results of ``nn.MultiheadAttention``.

    Parameters
    ----------
    embed_dim, num_heads
        Model width and number of heads (``embed_dim`` divisible by ``num_heads``).
    dropout
        Dropout on the attention weights (training mode only).
    bias
        Biases of the four projections.
    kdim, vdim
        Widths of keys and values (``embed_dim`` by default).
    batch_first
        Inputs ``(N, L, E)`` if true, ``(L, N, E)`` otherwise, as in torch.
    """

    # None makes nn.TransformerEncoderLayer skip its fused inference fast path, which reads
    # torch's fused weights and would bypass the projections below
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.k_proj.in_features == self.v_proj.in_features == self.embed_dim

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """The same attention, weights copied from a ``nn.MultiheadAttention``."""
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(
                "natgrad's MultiheadAttention does not support add_bias_kv or add_zero_attn"
            )
        layer = cls(
            module.embed_dim,
            module.num_heads,
            module.dropout,
            bias=module.in_proj_bias is not None,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
        )
        layer.to(device=module.out_proj.weight.device, dtype=module.out_proj.weight.dtype)
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
        projections = (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj)
        with torch.no_grad():
            for projection, weight, bias in zip(
                projections,
                (*weights, module.out_proj.weight),
                (*biases, module.out_proj.bias),
                strict=True,
            ):
                projection.weight.copy_(weight)
                if bias is not None:
                    projection.bias.copy_(bias)
        layer.train(module.training)
        return layer

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, weights or None)``.

        Boolean masks mark positions that may *not* be attended (``True``); float masks are
        added to the attention scores.
        """
        if query.dim() != 3:
            raise ValueError(f"expected batched inputs of 3 dimensions, got {query.dim()}")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, target_len, _ = query.shape
        source_len = key.shape[1]
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads

        def split(x: Tensor, length: int) -> Tensor:
            return x.reshape(batch, length, heads, head_dim).transpose(1, 2)

        q = split(self.q_proj(query), target_len)
        k = split(self.k_proj(key), source_len)
        v = split(self.v_proj(value), source_len)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(
                target_len, source_len, dtype=torch.bool, device=scores.device
            ).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask.reshape(batch, heads, target_len, source_len)
                               if mask.dim() == 3 else mask)  # fmt: skip
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype)[:, None, None, :]
        weights = scores.softmax(dim=-1)
        attended = F.dropout(weights, self.dropout, self.training) @ v
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, target_len, -1))
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, weights.mean(dim=1) if average_attn_weights else weights


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True`` = masked) as ``-inf`` / ``0``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` in ``model`` (in place) for
    :class:`MultiheadAttention` with the same weights; returns ``model``."""
    if isinstance(model, nn.MultiheadAttention):
        return MultiheadAttention.from_torch(model)
    for name, child in model.named_children():
        setattr(model, name, replace_attention(child))
    return model


__all__ = ["MultiheadAttention", "replace_attention"]
