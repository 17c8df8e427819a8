"""`nn.LSTM` / `nn.GRU` spelled out as linear layers and a loop over time steps.

Quantization plugins need the recurrent weights as ordinary linear layers they can swap for
int8 ones: per layer, the input projection of all time steps is one matmul (`ih`), and each
step adds the recurrent projection of the previous hidden state (`hh`). `nn.LSTM`'s fused kernel
hides both. Same gate maths, state layout and results as the module it replaces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from lmkit.backbones.lstm import RecurrentState


class UnrolledRNN(nn.Module):
    def __init__(self, rnn: nn.LSTM | nn.GRU, to_linear: Callable[[nn.Linear], nn.Module] = lambda x: x) -> None:
        """Copy `rnn`'s weights into per-layer `ih`/`hh` linears, each passed through `to_linear`."""
        super().__init__()
        if not rnn.batch_first or rnn.bidirectional or getattr(rnn, "proj_size", 0):
            raise ValueError("UnrolledRNN supports batch_first, unidirectional RNNs without proj_size")
        self.cell = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
        self.num_layers, self.hidden_size = rnn.num_layers, rnn.hidden_size
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        for layer in range(rnn.num_layers):
            for kind, linears in (("ih", self.ih), ("hh", self.hh)):
                weight = getattr(rnn, f"weight_{kind}_l{layer}")
                bias = getattr(rnn, f"bias_{kind}_l{layer}", None)
                linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if bias is not None:
                        linear.bias.copy_(bias)
                linears.append(to_linear(linear))

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
        B, H = x.size(0), self.hidden_size
        if state is None:
            zeros = x.new_zeros(self.num_layers, B, H)
            state = (zeros, zeros.clone()) if self.cell == "lstm" else zeros
        h_all, c_all = state if self.cell == "lstm" else (state, None)
        h_out, c_out = [], []
        for layer in range(self.num_layers):
            h = h_all[layer]
            c = c_all[layer] if c_all is not None else None
            gates_x = self.ih[layer](x)  # every time step at once
            outputs = []
            for t in range(x.size(1)):
                gates_h = self.hh[layer](h)
                if self.cell == "lstm":
                    i, f, g, o = (gates_x[:, t] + gates_h).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:  # GRU: the reset gate scales the recurrent part of the candidate only
                    xr, xz, xn = gates_x[:, t].chunk(3, dim=-1)
                    hr, hz, hn = gates_h.chunk(3, dim=-1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    h = (1 - z) * torch.tanh(xn + r * hn) + z * h
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
            h_out.append(h)
            c_out.append(c)
        h_n = torch.stack(h_out)
        return x, ((h_n, torch.stack(c_out)) if self.cell == "lstm" else h_n)
