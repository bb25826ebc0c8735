"""MoELayer: the sparse replacement of one dense FFN.

    y(x) = sum_{(e, c): slot_token[e, c] = x} w_{e,c} FFN_e(x) + b_out

with the slot table of the router's Dispatch, w = the slot's gate ("weighted") or 1 ("unweighted", split
experts), FFN_e the e-th expert (plain or gated, as the dense FFN was) and b_out the dense down-projection bias
when split experts share it. Computation is capacity-padded: the slot table gathers tokens into an
[E, C, d] buffer, two batched matmuls run every expert at once, and an index-add scatters the weighted results
back. Tokens in no slot get zero. A shared expert (split experts with shared neurons), when present, is added
for every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .activations import ACTIVATIONS
from .experts import ExpertWeights
from .routers import Router

_EXPERT_PARAMS = ("up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias", "output_bias")


@dataclass
class RoutingStats:
    """Routing of the last forward pass, kept as tensors on the layer's device (reading them is the only sync)."""

    tokens_per_expert: torch.Tensor  # [E] tokens each expert processed
    processed_fraction: torch.Tensor  # 0-d, share of tokens that at least one expert processed

    @property
    def dropped_fraction(self) -> float:
        """Share of tokens that no expert processed (their FFN output is zero)."""
        return 1.0 - float(self.processed_fraction)


class MoELayer(nn.Module):
    def __init__(self, experts: ExpertWeights, router: Router, activation: str, combine: str = "weighted",
                 dropout: float = 0.0, shared: Optional[nn.Module] = None):
        super().__init__()
        self.shared = shared  # always-on expert (split with shared neurons), or None
        for name in _EXPERT_PARAMS:
            value = getattr(experts, name)
            self.register_parameter(name, None if value is None else nn.Parameter(value))
        self.router = router
        self.activation = activation
        self.combine = combine
        self.dropout = nn.Dropout(dropout)
        self.routing_stats: Optional[RoutingStats] = None
        self.aux_losses: dict[str, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return self.up_weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.up_weight.shape[2]

    @property
    def expert_width(self) -> int:
        return self.up_weight.shape[1]

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None

    def experts_forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows: xs [E, C, d] -> [E, C, d]."""
        act = ACTIVATIONS[self.activation]
        h = _batched_linear(xs, self.up_weight, self.up_bias)
        h = act(_batched_linear(xs, self.gate_weight, self.gate_bias)) * h if self.gated else act(h)
        return _batched_linear(h, self.down_weight, self.down_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.router(x)
        dispatch = routed.dispatch
        flat = x.reshape(-1, x.shape[-1])
        tokens = flat.shape[0]
        slot_token = dispatch.slot_token.reshape(-1)
        slot_used = (slot_token < tokens).to(x.dtype).unsqueeze(1)
        gates = dispatch.slot_weight.reshape(-1, 1).to(x.dtype) if self.combine == "weighted" else slot_used

        padded = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        expert_in = padded[slot_token].view(self.num_experts, -1, flat.shape[1])
        expert_out = self.experts_forward(expert_in).reshape(-1, flat.shape[1]) * gates
        # summed in at least fp32: a no-op for fp32 and fp64, more accurate for fp16/bf16, and ONNX Runtime's CPU
        # ScatterND-add has no fp16
        acc = torch.promote_types(x.dtype, torch.float32)
        y = padded.new_zeros(padded.shape, dtype=acc).index_add(0, slot_token, expert_out.to(acc))
        y = y[:tokens].to(x.dtype)
        if self.output_bias is not None:  # once per token some expert processed: a dropped token's output stays 0
            reached = (_experts_per_token(slot_token, tokens) > 0).to(x.dtype).unsqueeze(1)
            y = y + reached * self.output_bias
        if self.shared is not None:
            y = y + self.shared(flat)

        if not torch.compiler.is_exporting():
            self.aux_losses = routed.aux_losses()
            with torch.no_grad():
                processed = (_experts_per_token(slot_token, tokens) > 0).float()
                self.routing_stats = RoutingStats(
                    tokens_per_expert=(slot_token < tokens).view(self.num_experts, -1).sum(1),
                    processed_fraction=processed.mean() if tokens else processed.new_ones(()),
                )
        return self.dropout(y).view(x.shape)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's aux losses (they hold an autograd graph, which deepcopy
        refuses) and routing statistics; both are refilled by the next forward pass."""
        state = super().__getstate__()
        return {**state, "aux_losses": {}, "routing_stats": None}

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, d_model={self.d_model}, expert_width={self.expert_width}, "
                f"activation={self.activation}{', gated' if self.gated else ''}, combine={self.combine}")


def _experts_per_token(slot_token: torch.Tensor, tokens: int) -> torch.Tensor:
    """[T]: how many expert slots hold each token (slot value T, the empty marker, is counted and cut off)."""
    ones = torch.ones_like(slot_token, dtype=torch.float32)
    return torch.zeros(tokens + 1, device=slot_token.device).index_add(0, slot_token, ones)[:tokens]


def _batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [E, C, in] @ weight[E, out, in]^T + bias[E, 1, out]."""
    y = torch.bmm(x, weight.transpose(1, 2))
    return y if bias is None else y + bias.unsqueeze(1)


def iter_moe_layers(model: nn.Module):
    """(qualified name, MoELayer) for every MoE layer of a model."""
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module


def aux_loss(model: nn.Module, load_balance_coef: Optional[float] = None, z_loss_coef: Optional[float] = None):
    """The auxiliary losses of the last forward pass, summed over every MoE layer, in one call.

    Returns (total, parts) with total = lb_coef * sum L_lb + z_coef * sum L_z; the coefficients default to
    the ones of the conversion's MoEConfig.
    """
    report = getattr(model, "moe_report", None)
    config = report.config if report is not None else None
    lb = load_balance_coef if load_balance_coef is not None else (config.load_balance_coef if config else 1e-2)
    zc = z_loss_coef if z_loss_coef is not None else (config.z_loss_coef if config else 1e-3)
    layers = [layer for _, layer in iter_moe_layers(model)]
    if not layers or not all(layer.aux_losses for layer in layers):
        raise RuntimeError("aux_loss: no MoE layer has run a forward pass yet. Call the model first, then aux_loss.")
    parts = {key: sum(layer.aux_losses[key] for layer in layers) for key in ("load_balancing", "z_loss")}
    return lb * parts["load_balancing"] + zc * parts["z_loss"], parts


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Routing statistics of every MoE layer after the last forward pass, by qualified name."""
    return {name: layer.routing_stats for name, layer in iter_moe_layers(model) if layer.routing_stats is not None}


