"""natgrad.layers.LSTM, GRU and RNN: torch's recurrent layers rebuilt from ``nn.Linear`` cells.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run their whole recurrence inside one fused torch kernel
with flat weight tensors: no module call that a hook could capture, and the kernels have no
per-sample (vmap) rule, so natgrad can neither give them a neuron view nor materialise their
per-sample gradients. The drop-ins here compute the same function from two ``nn.Linear``
modules per layer and direction:

* ``ih`` (input to hidden, torch's ``weight_ih`` and ``bias_ih``), applied once to the whole
  sequence ``(N, T, d_in)``: its weight is shared over the ``T`` time steps like a linear layer
  over tokens;
* ``hh`` (hidden to hidden, ``weight_hh`` and ``bias_hh``), applied at every time step to the
  previous hidden state ``(N, H)``: ``T`` calls of one layer, which :mod:`natgrad.capture`
  joins into one batch of ``T`` tokens per datapoint.

Either way the gradient of datapoint ``n`` is ``sum_t e_{nt} a_{nt}^T`` (back-propagation
through time is exactly this sum), so the Woodbury methods are exact and the Kronecker methods
and FishLeg see two ordinary linear layers per cell (``Σ_A`` and ``Σ_G`` over the ``N T``
rows, the "expand" convention of :mod:`natgrad.precond.kronecker`). The cells are kept in
``cells``, a ``ModuleDict`` keyed like torch's weight suffixes (``"l0"``, ``"l0_reverse"``,
``"l1"``, ...), so torch's ``weight_ih_l1_reverse`` becomes ``cells["l1_reverse"].ih.weight``.

The gate equations, gate order and initialisation are torch's: LSTM gates ``i, f, g, o``;
GRU gates ``r, z, n`` with ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``. Inter-layer
dropout (``dropout > 0``, training mode) is applied as torch applies it, to the time-major
output of every layer but the last; it draws its mask from torch's global generator in the same
order as torch's CPU kernel, so a seeded drop-in reproduces torch's masks. Not supported (a
clear error): ``PackedSequence`` inputs and LSTM projections (``proj_size > 0``).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

Nonlinearity = Literal["tanh", "relu"]


class RecurrentCell(nn.Module):
    """One layer and direction: the input-to-hidden and hidden-to-hidden ``nn.Linear``."""

    def __init__(
        self, input_size: int, hidden_size: int, gates: int, bias: bool, **factory: object
    ) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, gates * hidden_size, bias=bias, **factory)
        self.hh = nn.Linear(hidden_size, gates * hidden_size, bias=bias, **factory)


class _Recurrent(nn.Module):
    """The stack of layers and directions shared by :class:`LSTM`, :class:`GRU` and :class:`RNN`.

    Subclasses give the number of gates and one time step (:meth:`_step`); the state is a tuple
    of ``(N, H)`` tensors (``(h,)``, or ``(h, c)`` for the LSTM).
    """

    gates: ClassVar[int]
    state_count: ClassVar[int] = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        directions = 2 if bidirectional else 1
        self.cells = nn.ModuleDict()
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else directions * hidden_size
            for suffix in ("", "_reverse")[:directions]:
                self.cells[f"l{layer}{suffix}"] = RecurrentCell(
                    layer_input, hidden_size, self.gates, bias, device=device, dtype=dtype
                )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias uniform in ``±1/sqrt(hidden_size)``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def flatten_parameters(self) -> None:
        """Does nothing: there are no flat cuDNN weights (kept so code written for torch's
        modules, which calls it, runs unchanged)."""

    @classmethod
    def from_torch(cls, module: nn.RNNBase) -> _Recurrent:
        """The drop-in with ``module``'s configuration and weights (same outputs, same mode)."""
        layer = cls(
            module.input_size,
            module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            **cls._extra_arguments(module),
        )
        reference = module.weight_ih_l0
        layer.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for key, cell in layer.cells.items():
                cell.ih.weight.copy_(getattr(module, f"weight_ih_{key}"))
                cell.hh.weight.copy_(getattr(module, f"weight_hh_{key}"))
                if module.bias:
                    cell.ih.bias.copy_(getattr(module, f"bias_ih_{key}"))
                    cell.hh.bias.copy_(getattr(module, f"bias_hh_{key}"))
        for param, original in zip(layer._torch_order(), module.parameters(), strict=True):
            param.requires_grad_(original.requires_grad)
        layer.train(module.training)
        return layer

    @staticmethod
    def _extra_arguments(module: nn.RNNBase) -> dict[str, object]:
        return {}

    def _torch_order(self) -> list[nn.Parameter]:
        """The parameters in the order of torch's ``module.parameters()``."""
        order = []
        for cell in self.cells.values():
            order += [cell.ih.weight, cell.hh.weight]
            if self.bias:
                order += [cell.ih.bias, cell.hh.bias]
        return order

    def _step(
        self, cell: RecurrentCell, gates_x: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        """The next state from the input's gate pre-activations ``(N, G H)``."""
        raise NotImplementedError

    def _run(self, input: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Output ``(T, N, D H)`` and final state ``(L D, N, H)`` each, from a time-major input
        ``(T, N, d_in)`` and initial states ``(L D, N, H)``."""
        directions = 2 if self.bidirectional else 1
        steps = input.shape[0]
        finals: list[tuple[Tensor, ...]] = []
        layer_input = input
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(("", "_reverse")[:directions]):
                cell = self.cells[f"l{layer}{suffix}"]
                index = layer * directions + direction
                current = tuple(s[index] for s in state)
                # one call on (N, T, d_in): the weight is shared over the time steps
                gates_x = cell.ih(layer_input.transpose(0, 1))
                hidden: list[Tensor | None] = [None] * steps
                order = range(steps - 1, -1, -1) if direction else range(steps)
                for t in order:
                    current = self._step(cell, gates_x[:, t], current)
                    hidden[t] = current[0]
                outputs.append(torch.stack(hidden))
                finals.append(current)
            layer_output = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_output = F.dropout(layer_output, self.dropout, training=True)
            layer_input = layer_output
        final_state = tuple(torch.stack(part) for part in zip(*finals, strict=True))
        return layer_input, final_state

    def _forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, ...] | None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"natgrad.layers.{type(self).__name__} does not take a PackedSequence: pass the "
                "padded batch as one tensor (every sequence then runs over all T steps, which "
                "changes the results of shorter sequences), or keep torch's module and train it "
                "with the plain gradient (overrides={name: 'plain_gradient'})"
            )
        if input.dim() not in (2, 3):
            raise ValueError(
                f"expected an input of 3 dimensions (or 2, unbatched), got shape "
                f"{tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"input has {input.shape[-1]} features, the layer expects {self.input_size}"
            )
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(1)
            hx = None if hx is None else tuple(s.unsqueeze(1) for s in hx)
        elif self.batch_first:
            input = input.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * directions, input.shape[1], self.hidden_size)
        if hx is None:
            hx = tuple(input.new_zeros(shape) for _ in range(self.state_count))
        for state in hx:
            if tuple(state.shape) != shape:
                raise ValueError(
                    f"initial state of shape {tuple(state.shape)}, expected {shape} "
                    "(num_layers * num_directions, batch, hidden_size)"
                )
        output, final = self._run(input, hx)
        if not batched:
            return output.squeeze(1), tuple(s.squeeze(1) for s in final)
        return (output.transpose(0, 1) if self.batch_first else output), final

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text


class LSTM(_Recurrent):
    """``nn.LSTM`` from ``nn.Linear`` cells; same arguments (``proj_size`` only 0) and results.

    ``forward(input, (h_0, c_0) = None)`` returns ``(output, (h_n, c_n))`` as torch does, for
    inputs ``(T, N, d_in)`` (``(N, T, d_in)`` if ``batch_first``) or unbatched ``(T, d_in)``.
    """

    gates = 4
    state_count = 2

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if proj_size != 0:
            raise ValueError(
                f"proj_size={proj_size} (LSTM projections) is not supported by "
                "natgrad.layers.LSTM; keep torch's nn.LSTM and train it with the plain gradient "
                "(overrides={name: 'plain_gradient'}, name as in model.named_modules())"
            )
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device, dtype,
        )  # fmt: skip

    @staticmethod
    def _extra_arguments(module: nn.RNNBase) -> dict[str, object]:
        return {"proj_size": module.proj_size}

    def _step(
        self, cell: RecurrentCell, gates_x: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        hidden, memory = state
        in_gate, forget, candidate, out_gate = (gates_x + cell.hh(hidden)).chunk(4, dim=-1)
        memory = forget.sigmoid() * memory + in_gate.sigmoid() * candidate.tanh()
        return out_gate.sigmoid() * memory.tanh(), memory

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        output, (hidden, memory) = self._forward(input, hx)
        return output, (hidden, memory)


class GRU(_Recurrent):
    """``nn.GRU`` from ``nn.Linear`` cells; same arguments and results.

    ``forward(input, h_0 = None)`` returns ``(output, h_n)``.
    """

    gates = 3

    def _step(
        self, cell: RecurrentCell, gates_x: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        (hidden,) = state
        reset_x, update_x, new_x = gates_x.chunk(3, dim=-1)
        reset_h, update_h, new_h = cell.hh(hidden).chunk(3, dim=-1)
        reset, update = (reset_x + reset_h).sigmoid(), (update_x + update_h).sigmoid()
        new = (new_x + reset * new_h).tanh()
        return ((1 - update) * new + update * hidden,)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        output, (hidden,) = self._forward(input, None if hx is None else (hx,))
        return output, hidden


class RNN(_Recurrent):
    """``nn.RNN`` (``nonlinearity`` ``"tanh"`` or ``"relu"``) from ``nn.Linear`` cells; same
    arguments and results.

    ``forward(input, h_0 = None)`` returns ``(output, h_n)``.
    """

    gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: Nonlinearity = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}: choose 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device, dtype,
        )  # fmt: skip

    @staticmethod
    def _extra_arguments(module: nn.RNNBase) -> dict[str, object]:
        return {"nonlinearity": module.nonlinearity}

    def _step(
        self, cell: RecurrentCell, gates_x: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        (hidden,) = state
        pre_activation = gates_x + cell.hh(hidden)
        return (pre_activation.tanh() if self.nonlinearity == "tanh" else pre_activation.relu(),)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        output, (hidden,) = self._forward(input, None if hx is None else (hx,))
        return output, hidden

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.nonlinearity == "tanh" else f"{text}, nonlinearity='relu'"


DROP_INS: dict[str, type[_Recurrent]] = {
    "LSTM": LSTM,
    "GRU": GRU,
    "RNN_TANH": RNN,
    "RNN_RELU": RNN,
}
"""The drop-in of each ``nn.RNNBase.mode``."""


def recurrent_from_torch(module: nn.RNNBase) -> _Recurrent:
    """The drop-in of torch's recurrent ``module`` (by its ``mode``), weights copied."""
    return DROP_INS[module.mode].from_torch(module)


__all__ = ["GRU", "LSTM", "RNN", "RecurrentCell", "recurrent_from_torch"]
