"""SharedExpert: the always-on slice of a split FFN, the neurons S_0 that fire for most tokens.

    shared(x) = W_down[:, S_0] h_{S_0}(x),   h(x) = act(W_up x + b_up)   or   act(W_gate x + b_gate) * (W_up x + b_up)

No output bias: the dense b_down stays in the MoE layer's output_bias. Every token runs it, whatever the router
picks, so k - s routed groups plus s shared groups make the k groups of width m each token pays for.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .activations import Activation, activation_name
from .ffn import DenseFFN


class SharedExpert(nn.Module):
    def __init__(self, up_weight: torch.Tensor, up_bias: Optional[torch.Tensor], down_weight: torch.Tensor,
                 activation: Activation, gate_weight: Optional[torch.Tensor] = None,
                 gate_bias: Optional[torch.Tensor] = None, hidden_norm: Optional[nn.Module] = None):
        super().__init__()
        self.up_weight = nn.Parameter(up_weight)  # [m_s, d]
        self.up_bias = None if up_bias is None else nn.Parameter(up_bias)
        self.gate_weight = None if gate_weight is None else nn.Parameter(gate_weight)
        self.gate_bias = None if gate_bias is None else nn.Parameter(gate_bias)
        self.down_weight = nn.Parameter(down_weight)  # [d, m_s]
        self.activation = activation
        self.hidden_norm = hidden_norm  # an elementwise one (split refuses any other)

    @property
    def width(self) -> int:
        return self.up_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DenseFFN(self.up_weight, self.up_bias, self.down_weight, None, self.activation, self.gate_weight,
                        self.gate_bias, hidden_norm=self.hidden_norm)(x)

    def extra_repr(self) -> str:
        gated = ", gated" if self.gate_weight is not None else ""
        return f"width={self.width}, activation={activation_name(self.activation)}{gated}"
