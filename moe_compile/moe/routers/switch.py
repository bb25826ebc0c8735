"""Switch routing (Fedus et al. 2021): token-choice with k = 1, gate = the softmax probability of the chosen
expert (not renormalised), and a capacity C = ceil(cf * T / E) past which tokens are dropped."""

from __future__ import annotations

from typing import Optional

from .token_choice import TokenChoiceRouter


class SwitchRouter(TokenChoiceRouter):
    def __init__(self, d_model: int, num_experts: int, capacity_factor: Optional[float], jitter: float = 0.0):
        super().__init__(d_model, num_experts, 1, capacity_factor, normalize=False, jitter=jitter)

    @property
    def routing(self) -> str:
        return "switch"
