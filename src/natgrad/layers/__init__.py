"""Drop-in layers whose parameters natgrad sees in the neuron view.

Some torch modules compute with their weights inside one fused function (no ``nn.Linear`` call
a hook could capture), so natgrad cannot give them ``A``/``E`` rows: ``nn.MultiheadAttention``
(routed to the torch.func fallback, exact but materialising per-sample gradients) and the
recurrent layers ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (whose fused kernels have no per-sample
rule at all: :func:`natgrad.selection.select_layers` refuses them). The drop-ins here compute
the same functions from ``nn.Linear`` modules shared over tokens or time steps:

* :class:`MultiheadAttention` (:mod:`natgrad.layers.attention`);
* :class:`LSTM`, :class:`GRU`, :class:`RNN` (:mod:`natgrad.layers.recurrent`).

:func:`replace` swaps all of them into an existing model, weights copied.
"""

from __future__ import annotations

from torch import nn

from natgrad.layers.attention import MultiheadAttention, replace_attention
from natgrad.layers.recurrent import GRU, LSTM, RNN, recurrent_from_torch


def replace(model: nn.Module) -> nn.Module:
    """Swap every torch module that has a natgrad drop-in, in place, and return ``model``.

    ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer``) becomes :class:`MultiheadAttention`; ``nn.LSTM``,
    ``nn.GRU`` and ``nn.RNN`` become :class:`LSTM`, :class:`GRU` and :class:`RNN`. Weights,
    ``requires_grad`` and the training mode are copied, so the model computes the same function.
    If ``model`` is itself such a module its drop-in is returned. Call it before building the
    preconditioner and the optimiser (they hold the parameters).
    """
    if isinstance(model, nn.MultiheadAttention):
        return MultiheadAttention.from_torch(model)
    if isinstance(model, nn.RNNBase):
        return recurrent_from_torch(model)
    for name, child in model.named_children():
        setattr(model, name, replace(child))
    return model


__all__ = ["GRU", "LSTM", "RNN", "MultiheadAttention", "replace", "replace_attention"]
