"""The one dispatch layout of every routing: routing choices sorted by expert.

A routing makes N choices (token t_r, gate w_r). Sorted by expert, expert e owns the contiguous rows

    starts[e] <= r < starts[e] + counts[e]

(the layout of MegaBlocks, vLLM's fused MoE and grouped_mm's `offs`). A row of an expert's segment past
counts[e] is a choice dropped by a capacity: it is never computed. Within a segment, rows keep the routing's
priority order, so a capacity C keeps each expert's first C choices. The eager layer, the ONNX lowering and the
custom op all run each expert on its slice of this one layout:

    y_t = sum_{e, r in segment e, r kept, t_r = t} w_r FFN_e(x_t)

The stable sort is a sort of unique int64 keys `expert * N + priority` (ONNX: one TopK), and the counts are a
scatter-add of ones (ONNX: ScatterElements), so the same code runs in eager PyTorch and exports to standard ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


@dataclass
class Dispatch:
    token: torch.Tensor  # [N] int64, token of each row, rows sorted by expert
    weight: torch.Tensor  # [N] gate of each row
    starts: torch.Tensor  # [E] int64, first row of each expert
    counts: torch.Tensor  # [E] int64, rows each expert computes (a capacity may leave a segment's tail dropped)
    expert_fraction: torch.Tensor  # [E] share of routing choices per expert, f_e of the load-balancing loss

    packed: bool = True  # kept rows are the first sum(counts) rows: no capacity cut a segment short

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many of the choices `expert_ids` (any shape) picked each expert."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add(0, flat, torch.ones_like(flat))


def sort_by_expert(expert_ids: torch.Tensor, gates: torch.Tensor, num_experts: int,
                   capacity: Optional[Union[int, torch.SymInt]] = None) -> Dispatch:
    """Token-choice choices [T, k] -> the sorted layout.

    Priority order is every token's first choice in token order, then every second choice, ...: choice
    c = i T + t is token t's i-th choice. A capacity C keeps each expert's first C choices in that order.
    """
    tokens, k = expert_ids.shape
    choice_expert = expert_ids.t().reshape(-1)  # [N = k T], priority order
    n = choice_expert.shape[0]
    key = choice_expert * n + torch.arange(n, device=choice_expert.device)
    order = key.sort().indices  # unique keys: a stable sort by expert
    counts = expert_counts(choice_expert, num_experts)
    starts = counts.cumsum(0) - counts
    kept = counts if capacity is None else counts.clamp(max=capacity)
    choice_token = torch.arange(tokens, device=expert_ids.device).repeat(k)
    return Dispatch(token=choice_token[order], weight=gates.t().reshape(-1)[order], starts=starts, counts=kept,
                    expert_fraction=counts.float() / torch.sym_max(n, 1), packed=capacity is None)


def run_experts(flat: torch.Tensor, dispatch: Dispatch, expert: Callable[[int, torch.Tensor], torch.Tensor],
                weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum over the kept rows r of token t of w_r expert(e_r, x_t) (w_r = 1 when not weighted), with
    `expert(e, rows)` run once per expert on its contiguous rows; returns (y [T, d], kept rows per token [T]).

    One host sync reads the segment bounds the loop slices by; under torch.export they are data-dependent
    sizes, so the exported graph keeps the same per-expert slices."""
    rows = flat[dispatch.token]  # one gather: every row in expert order
    starts, counts = torch.stack([dispatch.starts, dispatch.counts]).tolist()
    outputs, tokens, weights = [], [], []
    for e, (start, count) in enumerate(zip(starts, counts)):
        torch._check(start >= 0)
        torch._check(count >= 0)
        torch._check(start + count <= rows.shape[0])
        outputs.append(expert(e, rows[start:start + count]))
        tokens.append(dispatch.token[start:start + count])
        weights.append(dispatch.weight[start:start + count])
    token = torch.cat(tokens)
    out = torch.cat(outputs)
    if weighted:
        out = out * torch.cat(weights).to(out.dtype).unsqueeze(1)
    # summed in at least fp32: a no-op for fp32 and fp64, more accurate for fp16/bf16, and ONNX Runtime's CPU
    # ScatterND-add has no fp16
    acc = torch.promote_types(flat.dtype, torch.float32)
    y = flat.new_zeros(flat.shape, dtype=acc).index_add(0, token, out.to(acc)).to(flat.dtype)
    ones = torch.ones_like(token, dtype=torch.float32)
    rows_per_token = torch.zeros(flat.shape[0], device=flat.device).index_add(0, token, ones)
    return y, rows_per_token
