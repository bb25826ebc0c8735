"""Router base: score tokens, then let the routing fill the expert slots.

    logits = x W_r^T                    (W_r: [E, d]; in training x is first scaled by U(1 - eps, 1 + eps) jitter)
    probs  = softmax(logits)            (fp32)
    dispatch = route(probs)             (the template method each routing implements)

A Dispatch (dispatch.py) is the routing's choices sorted by expert, with each expert's segment of rows: every
routing, dropless or not, is computed from this one layout, in eager PyTorch and in the exported graph alike.

Auxiliary losses (computed in training and eval, read by `moe_compile.aux_loss`):
    load balancing (Switch Transformer)  L_lb = E * sum_e f_e * P_e   (f_e = share of routing choices that
                                                                        picked e, P_e = mean prob of e)
    router z-loss (ST-MoE)               L_z  = mean_t logsumexp(logits_t)^2

Every selection over scores (top-k experts of a token, top-C tokens of an expert) goes through `top_k`, whose
tie rule (equal scores: the lower index wins) is written in the graph's ops, not left to a runtime's TopK.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import Dispatch


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [T, E]
    probs: torch.Tensor  # [T, E] fp32
    dispatch: Dispatch

    def aux_losses(self) -> dict[str, torch.Tensor]:
        num_experts = self.probs.shape[-1]
        balance = num_experts * (self.dispatch.expert_fraction * self.probs.mean(0)).sum()
        z_loss = torch.logsumexp(self.logits.float(), dim=-1).pow(2).mean()
        return {"load_balancing": balance, "z_loss": z_loss}


def capacity(tokens: Union[int, torch.SymInt], factor: float, k: int, num_experts: int) -> Union[int, torch.SymInt]:
    """C = min(ceil(factor * tokens * k / E), tokens), in integer arithmetic so that it stays exact on the
    symbolic token count of an exported graph."""
    num, den = Fraction(factor).limit_denominator(1 << 16).as_integer_ratio()
    return torch.sym_min((num * tokens * k + den * num_experts - 1) // (den * num_experts), tokens)


def top_k(scores: torch.Tensor, k: Union[int, torch.SymInt], ordered: bool = True) -> torch.Tensor:
    """Indices [..., k] of the k largest scores along the last axis; of equal scores, the lower index wins.

    Runtimes order tied values as they like (ONNX's TopK: lower index first; torch.topk and TensorRT: unspecified),
    so only TopK's values are used, and they carry no tie: v_1 >= ... >= v_k. Over the n scores s_i,

        rank_i = #{j : v_j > s_i}                       (ordered)
               = [s_i <= v_k] + [s_i < v_k]             (not ordered: the set, not its order)
        key_i  = rank_i * n + i                         (distinct integers, exact in fp32 while n (k + 1) < 2^24)

    and the k smallest keys are the k largest scores, ties to the lower index: by (score desc, index asc) when
    ordered, else those above v_k then those equal to it, each by index. The second TopK sorts distinct keys, so
    every runtime returns the same indices.
    """
    n = scores.shape[-1]
    values = scores.topk(k, dim=-1).values
    if ordered:
        rank = (values.unsqueeze(-2) > scores.unsqueeze(-1)).sum(-1)
    else:
        kth = values[..., -1:]
        rank = (scores <= kth).long() + (scores < kth).long()
    key = rank.float() * n + torch.arange(n, device=scores.device, dtype=torch.float32)
    return key.topk(k, dim=-1, largest=False).indices


class Router(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor, jitter: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.jitter = jitter

    @property
    def routing(self) -> str:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> RouterOutput:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and self.jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(flat, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        return RouterOutput(logits, probs, self.route(probs, x.shape[:-1]))

    def route(self, probs: torch.Tensor, token_shape: torch.Size) -> Dispatch:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"routing={self.routing}, experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}")
