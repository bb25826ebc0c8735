"""MoELayer: the sparse replacement of one dense FFN.

    y_t = sum_{kept rows r of token t} w_r FFN_{e_r}(x_t) + [token t has a kept row] b_out

over the rows of the router's Dispatch (the routing's choices sorted by expert, see dispatch.py), with w = the row's
gate ("weighted") or 1 ("unweighted", split experts; while gradients flow to the router, the straight-through factor
1+p-sg(p) of the row's router probability, 1 in value, so that training moves the router too), FFN_e the e-th expert
(plain or gated, as the dense FFN was, with its hidden norm if it has one) and b_out the dense down-projection bias
when split experts share it. Each expert runs one plain matmul per projection on its own contiguous rows: no
padding, no empty slots, dropless unless the router has a capacity. The same forward is what `torch.export` captures
for the portable ONNX lowering (the slice bounds become data-dependent Slice nodes; only the final sum per token is
written with gathers there, see dispatch.run_experts). A shared expert (split experts with shared neurons), when
present, is added for every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import LoweringError
from .activations import Activation, activation_name
from .dispatch import run_experts
from .experts import ExpertWeights
from .ffn import DenseFFN
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
    def __init__(self, experts: ExpertWeights, router: Router, activation: Activation, combine: str = "weighted",
                 dropout: float = 0.0, shared: Optional[nn.Module] = None, hidden_norm: Optional[nn.Module] = None):
        super().__init__()
        self.shared = shared  # always-on expert (split with shared neurons), or None
        for name in _EXPERT_PARAMS:
            value = getattr(experts, name)
            self.register_parameter(name, None if value is None else nn.Parameter(value))
        self.router = router
        self.activation = activation  # a module (learned activation) is a submodule, shared by every expert
        self.hidden_norm = hidden_norm  # the dense FFN's own norm of h, shared by every expert (upcycle)
        self.combine = combine
        self.dropout = nn.Dropout(dropout)
        self.routing_stats: Optional[RoutingStats] = None
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.expert_weight_bits: Optional[tuple[int, int]] = None  # (bits, block size): see quantize.py

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

    def expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """FFN_e on its rows [n, d] -> [n, d]."""
        return DenseFFN(self.up_weight[e], _row(self.up_bias, e), self.down_weight[e], _row(self.down_bias, e),
                        self.activation, _row(self.gate_weight, e), _row(self.gate_bias, e),
                        hidden_norm=self.hidden_norm)(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise LoweringError(
                "an MoELayer cannot be traced by torch.jit.trace, nor by torch.onnx.export(dynamo=False) or optimum's "
                "exporter, which trace with it: the layer reads each expert's share of the tokens on the host "
                "(data-dependent sizes), which only torch.export captures. Export the model with "
                "moe_compile.export(model, example_inputs, path) (a decoder with a KV cache for generation: "
                "moe_compile.export(model, None, directory, task='text-generation')), or compile it with "
                "torch.compile / torch.export.")
        routed = self.router(x)
        dispatch = routed.dispatch
        flat = x.reshape(-1, x.shape[-1])
        weighted = self.combine == "weighted"
        learns = not weighted and torch.is_grad_enabled() and self.router.weight.requires_grad \
            and not torch.compiler.is_exporting()
        y, rows_per_token = run_experts(flat, dispatch, self.expert, weighted, routed.probs if learns else None)
        if self.output_bias is not None:  # once per token some expert processed: a dropped token's output stays 0
            reached = 1.0 if dispatch.reaches_every_token else (rows_per_token > 0).to(x.dtype).unsqueeze(1)
            y = y + reached * self.output_bias
        if self.shared is not None:
            y = y + self.shared(flat)

        if not torch.compiler.is_exporting():
            self.aux_losses = routed.aux_losses()
            with torch.no_grad():
                processed = (rows_per_token > 0).float()
                self.routing_stats = RoutingStats(
                    tokens_per_expert=dispatch.counts,
                    processed_fraction=processed.mean() if processed.numel() else processed.new_ones(()),
                )
        return self.dropout(y).view(x.shape)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's aux losses (they hold an autograd graph, which deepcopy
        refuses) and routing statistics; both are refilled by the next forward pass."""
        state = super().__getstate__()
        return {**state, "aux_losses": {}, "routing_stats": None}

    def extra_repr(self) -> str:
        weights = "" if self.expert_weight_bits is None else ", int{} weights in blocks of {}".format(
            *self.expert_weight_bits)
        return (f"experts={self.num_experts}, d_model={self.d_model}, expert_width={self.expert_width}, "
                f"activation={activation_name(self.activation)}{', gated' if self.gated else ''}"
                f"{', hidden norm' if self.hidden_norm is not None else ''}, combine={self.combine}{weights}")


def _row(stacked: Optional[torch.Tensor], e: int) -> Optional[torch.Tensor]:
    return None if stacked is None else stacked[e]


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


