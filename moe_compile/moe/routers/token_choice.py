"""Token-choice top-k routing (GShard, Mixtral).

Each token t takes its k most probable experts, gates g_{t,i} = p_{t,e_i} (divided by sum_i p_{t,e_i} when
normalize). Without a capacity it is dropless. With one, each expert keeps its first C = ceil(cf * T * k / E)
choices in priority order (every token's first choice, in token order, before any second choice) and the
rest are dropped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Dispatch, Router, capacity


def assign_slots(expert_ids: torch.Tensor, gates: torch.Tensor, num_experts: int, slots: int) -> Dispatch:
    """Place the [T, k] choices into an [E, slots] table; a choice past an expert's last slot is dropped."""
    tokens, k = expert_ids.shape
    choice_ids = expert_ids.t().reshape(-1)  # [k*T], first choices first
    one_hot = F.one_hot(choice_ids, num_experts)
    position = (one_hot.cumsum(0) - 1).gather(1, choice_ids[:, None]).squeeze(1)
    overflow = num_experts * slots
    slot = torch.where(position < slots, choice_ids * slots + position, overflow)
    token = torch.arange(tokens, device=expert_ids.device).repeat(k)
    slot_token = torch.full((overflow + 1,), tokens, dtype=torch.long, device=expert_ids.device)
    slot_token = slot_token.scatter(0, slot, token)[:overflow]
    slot_weight = gates.new_zeros(overflow + 1).scatter(0, slot, gates.t().reshape(-1))[:overflow]
    expert_fraction = one_hot.float().mean(0)
    return Dispatch(slot_token.view(num_experts, slots), slot_weight.view(num_experts, slots), expert_fraction)


class TokenChoiceRouter(Router):
    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: Optional[float],
                 normalize: bool, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, capacity_factor, jitter)
        self.normalize = normalize

    @property
    def routing(self) -> str:
        return "token_choice"

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates [T, k], expert_ids [T, k])."""
        gates, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return gates, expert_ids

    def slots_per_expert(self, expert_ids: torch.Tensor) -> int:
        tokens = expert_ids.shape[0]
        if self.capacity_factor is not None:
            return capacity(tokens, self.capacity_factor, self.top_k, self.num_experts)
        if torch.compiler.is_exporting():
            return tokens  # dropless with a static shape: one expert may receive every token
        return int(torch.bincount(expert_ids.flatten(), minlength=self.num_experts).max())

    def route(self, probs: torch.Tensor, token_shape: torch.Size) -> Dispatch:
        gates, expert_ids = self.select(probs)
        return assign_slots(expert_ids, gates, self.num_experts, self.slots_per_expert(expert_ids))
