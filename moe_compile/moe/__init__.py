"""The MoE layer, its routers and its expert builders. Knows nothing of how FFNs are found or lowered."""

import dataclasses
from typing import Optional

import torch

from ..config import MoEConfig
from .activations import ACTIVATIONS, activation_name, identify_activation, is_elementwise
from .calibration import SiteCalibration, compensation_means
from .experts import ExpertWeights, build_experts, init_router_weight, split_problem
from .ffn import DenseFFN
from .layer import MoELayer, RoutingStats, aux_loss, iter_moe_layers, routing_stats
from .routers import build_router
from .shared import SharedExpert


def build_moe_layer(ffn: DenseFFN, config: MoEConfig, seed: int,
                    calibration: Optional[SiteCalibration] = None) -> MoELayer:
    """The MoE layer that replaces `ffn`, on its device and in its dtype; deterministic for a given seed.

    `calibration` feeds the data-dependent choices (shared neurons, coactivation groups, calibrated router,
    compensation); without it they build only the layout that saved weights are loaded into.
    """
    generator = torch.Generator().manual_seed(seed)
    experts = build_experts(ffn, config, generator, calibration)
    routed = dataclasses.replace(config, num_experts=config.routed_experts,
                                 top_k=config.top_k - config.shared_experts, shared_experts=0)
    like = dict(device=ffn.up_weight.device, dtype=ffn.up_weight.dtype)
    router = build_router(routed, ffn.d_model).to(**like)
    with torch.no_grad():
        router.weight.copy_(init_router_weight(ffn, experts, routed, generator, calibration))
    if config.compensate:
        _fold_compensation(experts, ffn, router.weight, routed.top_k, calibration, like)
    shared = None if experts.shared_neurons is None else _shared_expert(ffn, experts.shared_neurons)
    return MoELayer(experts, router, ffn.activation, config.combine, ffn.dropout, shared=shared,
                    hidden_norm=ffn.hidden_norm)


def choose_shared_experts(config: MoEConfig, ffn: DenseFFN, calibration: SiteCalibration, seed: int
                          ) -> tuple[MoELayer, int, dict[int, float]]:
    """shared_experts='auto' at one site (its FFN, calibration and seed): the calibrated layer (no distillation)
    whose s of config.shared_choices has the least held-out error, that s, and the error of every s,

        error_s = ||MoE_s(x) - FFN(x)||^2 / ||FFN(x) - mean FFN(x)||^2   over the calibration's held-out rows x.

    Pretrained LLMs want many shared neurons (Gemma 3 270M at 4 of 8: perplexity 1.96x dense with none, 1.50x with
    3), small trained ones few, and layers of one model differ (a tiny GPT's first layer wants none where the
    others want half; one count for all of them costs it 21% perplexity instead of 16%): the data decides, per
    site."""
    inputs = calibration.inputs
    x = inputs[calibration.num_fit:] if calibration.num_fit < len(inputs) else inputs
    x = x.to(device=ffn.up_weight.device, dtype=ffn.up_weight.dtype)
    best, errors = None, {}
    with torch.no_grad():
        target = ffn(x)
        scale = float((target - target.mean(0)).pow(2).sum()) or 1.0
        for s in config.shared_choices:
            calibration.results = {}  # the fit figures of this build
            layer = build_moe_layer(ffn, dataclasses.replace(config, shared_experts=s), seed, calibration).eval()
            errors[s] = float((layer(x) - target).pow(2).sum()) / scale
            if best is None or errors[s] < errors[best[1]]:
                best = layer, s, calibration.results
    layer, chosen, calibration.results = best
    return layer, chosen, errors


def _fold_compensation(experts: ExpertWeights, ffn: DenseFFN, router_weight: torch.Tensor, top_k: int,
                       calibration: Optional[SiteCalibration], like: dict) -> None:
    """b_e = -mu_e, b_out += sum_e mu_e (zeros without calibration: a layout for loading)."""
    num_experts, d = experts.neuron_groups.shape[0], ffn.d_model
    mu = torch.zeros(num_experts, d) if calibration is None else \
        compensation_means(calibration, ffn, experts.neuron_groups.cpu(), router_weight, top_k)
    experts.down_bias = (-mu).to(**like)
    base = experts.output_bias.float().cpu() if experts.output_bias is not None else torch.zeros(d)
    experts.output_bias = (base + mu.sum(0)).to(**like)


def _shared_expert(ffn: DenseFFN, neurons: torch.Tensor) -> SharedExpert:
    neurons = neurons.to(ffn.up_weight.device)

    def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach()[neurons].clone()

    return SharedExpert(rows(ffn.up_weight), rows(ffn.up_bias), ffn.down_weight.detach()[:, neurons].clone(),
                        ffn.activation, rows(ffn.gate_weight), rows(ffn.gate_bias), ffn.hidden_norm)


__all__ = ["ACTIVATIONS", "DenseFFN", "ExpertWeights", "MoELayer", "RoutingStats", "SharedExpert", "SiteCalibration",
           "activation_name", "aux_loss", "build_moe_layer", "choose_shared_experts", "identify_activation",
           "is_elementwise", "iter_moe_layers", "routing_stats", "split_problem"]
