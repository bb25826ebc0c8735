"""Expert-choice routing (Zhou et al. 2022): within each routing group of S tokens, expert e takes the
C = ceil(cf * S * k / E) tokens with the highest p_{t,e} (equal scores: the earlier token), gate = p_{t,e}.
Balanced by construction; a token may get no expert (its FFN output is zero) or several.

Not causal: whether token t is picked depends on the scores of every token of its group, later ones
included, so an autoregressive decoder sees the future through routing.
"""

from __future__ import annotations

from typing import Union

import torch

from ..dispatch import Dispatch
from .base import Router, capacity, top_k


class ExpertChoiceRouter(Router):
    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float,
                 group: Union[str, int] = "sequence", jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, capacity_factor, jitter)
        self.group = group

    @property
    def routing(self) -> str:
        return "expert_choice"

    def route(self, probs: torch.Tensor, token_shape: torch.Size) -> Dispatch:
        tokens, num_experts = probs.shape
        group = token_shape[-1] if self.group == "sequence" else self.group
        if not torch.compiler.is_exporting() and tokens % group:
            raise ValueError(f"expert_choice routes groups of {group} tokens, but this batch has {tokens} tokens, "
                             f"not a multiple of {group}. Pad the batch, or use expert_choice_group='sequence'.")
        scores = probs.view(-1, group, num_experts).transpose(1, 2)  # [G, E, S]
        slots = capacity(group, self.capacity_factor, self.top_k, num_experts)
        picked = top_k(scores, slots, ordered=False)  # [G, E, C]; the order within an expert does not matter
        gates = scores.gather(-1, picked)
        offsets = torch.arange(scores.shape[0], device=probs.device).view(-1, 1, 1) * group
        rows_per_expert = scores.shape[0] * slots  # rows ordered (expert, group, slot): exactly G C per expert
        counts = torch.full((num_experts,), rows_per_expert, dtype=torch.long, device=probs.device)
        return Dispatch(token=(picked + offsets).transpose(0, 1).reshape(-1),
                        weight=gates.transpose(0, 1).reshape(-1),
                        starts=torch.arange(num_experts, device=probs.device) * rows_per_expert, counts=counts,
                        expert_fraction=torch.full((num_experts,), 1.0 / num_experts, device=probs.device),
                        choices=picked)
