"""The MoE layer, its routers and its expert builders. Knows nothing of how FFNs are found or lowered."""

import torch

from ..config import MoEConfig
from .activations import ACTIVATIONS, identify_activation
from .experts import ExpertWeights, build_experts, init_router_weight
from .ffn import DenseFFN
from .layer import MoELayer, RoutingStats, aux_loss, iter_moe_layers, routing_stats
from .routers import build_router


def build_moe_layer(ffn: DenseFFN, config: MoEConfig, seed: int) -> MoELayer:
    """The MoE layer that replaces `ffn`, on its device and in its dtype; deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    experts = build_experts(ffn, config, generator)
    router = build_router(config, ffn.d_model).to(device=ffn.up_weight.device, dtype=ffn.up_weight.dtype)
    with torch.no_grad():
        router.weight.copy_(init_router_weight(ffn, experts, config, generator))
    return MoELayer(experts, router, ffn.activation, config.combine, ffn.dropout)


__all__ = ["ACTIVATIONS", "DenseFFN", "ExpertWeights", "MoELayer", "RoutingStats", "aux_loss", "build_moe_layer",
           "identify_activation", "iter_moe_layers", "routing_stats"]
