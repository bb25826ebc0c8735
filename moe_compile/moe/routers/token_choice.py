"""Token-choice top-k routing (GShard, Mixtral).

Each token t takes its k most probable experts, gates g_{t,i} = p_{t,e_i} (divided by sum_i p_{t,e_i} when
normalize). Without a capacity it is dropless. With one, each expert keeps its first C = ceil(cf * T * k / E)
choices in priority order (every token's first choice, in token order, before any second choice) and the
rest are dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import Dispatch, sort_by_expert
from .base import Router, capacity, top_k


class TokenChoiceRouter(Router):
    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: Optional[float],
                 normalize: bool, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, capacity_factor, jitter)
        self.normalize = normalize

    @property
    def routing(self) -> str:
        return "token_choice"

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates [T, k], expert_ids [T, k]): the k most probable experts, most probable first, equal
        probabilities to the lower expert index."""
        expert_ids = top_k(probs, self.top_k)
        gates = probs.gather(-1, expert_ids)
        if self.normalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return gates, expert_ids

    def route(self, probs: torch.Tensor, token_shape: torch.Size) -> Dispatch:
        gates, expert_ids = self.select(probs)
        slots = None if self.capacity_factor is None else \
            capacity(expert_ids.shape[0], self.capacity_factor, self.top_k, self.num_experts)
        return sort_by_expert(expert_ids, gates, self.num_experts, slots)
