"""Routers, one file per routing, built by name from an MoEConfig."""

from ...config import MoEConfig
from ..dispatch import Dispatch
from .base import Router, RouterOutput, capacity, top_k
from .expert_choice import ExpertChoiceRouter
from .switch import SwitchRouter
from .token_choice import TokenChoiceRouter


def build_router(config: MoEConfig, d_model: int) -> Router:
    if config.routing == "switch":
        return SwitchRouter(d_model, config.num_experts, config.capacity_factor, config.router_jitter)
    if config.routing == "token_choice":
        return TokenChoiceRouter(d_model, config.num_experts, config.top_k, config.capacity_factor,
                                 config.normalize, config.router_jitter)
    return ExpertChoiceRouter(d_model, config.num_experts, config.top_k, config.capacity_factor,
                              config.expert_choice_group, config.router_jitter)


__all__ = ["Dispatch", "Router", "RouterOutput", "capacity", "top_k", "build_router",
           "TokenChoiceRouter", "SwitchRouter", "ExpertChoiceRouter"]
