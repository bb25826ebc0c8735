"""DenseFFN: the weights of one dense feed-forward block, in nn.Linear layout ([out, in]).

plain:  y = W_down act(W_up x + b_up) + b_down
gated:  y = W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down      (SwiGLU when act = silu)

with h, the vector W_down multiplies, replaced by norm(h) when the FFN normalises it (BitNet's RMSNorm, nGPT's L2
norm: norm is the model's own module, and it couples all d_ff neurons unless it is elementwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import Activation, activation_function


@dataclass
class DenseFFN:
    up_weight: torch.Tensor  # [d_ff, d_model]
    up_bias: Optional[torch.Tensor]  # [d_ff]
    down_weight: torch.Tensor  # [d_model, d_ff]
    down_bias: Optional[torch.Tensor]  # [d_model]
    activation: Activation
    gate_weight: Optional[torch.Tensor] = None  # [d_ff, d_model], gated FFNs only
    gate_bias: Optional[torch.Tensor] = None
    dropout: float = 0.0
    hidden_norm: Optional[nn.Module] = None  # [..., d_ff] -> [..., d_ff], applied to h before W_down

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None

    @property
    def d_model(self) -> int:
        return self.up_weight.shape[1]

    @property
    def d_ff(self) -> int:
        return self.up_weight.shape[0]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h(x) [..., d_ff], the vector W_down multiplies: act(W_up x + b_up), or act(W_gate x + b_gate) * (W_up x +
        b_up), then its norm if the FFN has one."""
        act = activation_function(self.activation)
        h = F.linear(x, self.up_weight, self.up_bias)
        h = act(F.linear(x, self.gate_weight, self.gate_bias)) * h if self.gated else act(h)
        return h if self.hidden_norm is None else self.hidden_norm(h)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN itself (no dropout): the reference every expert construction is checked against."""
        return F.linear(self.hidden(x), self.down_weight, self.down_bias)
