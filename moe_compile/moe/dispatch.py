"""The one dispatch layout of every routing: routing choices sorted by expert.

A routing makes N choices (token t_r, gate w_r). Sorted by expert, expert e owns the contiguous rows

    starts[e] <= r < starts[e] + counts[e]

(the layout of MegaBlocks, vLLM's fused MoE and grouped_mm's `offs`). A row of an expert's segment past
counts[e] is a choice dropped by a capacity: it is never computed. Within a segment, rows keep the routing's
priority order, so a capacity C keeps each expert's first C choices. The eager layer, the ONNX lowering and the
custom op all run each expert on its slice of this one layout:

    y_t = sum_{e, r in segment e, r kept, t_r = t} w_r FFN_e(x_t)

Token choice gives every token exactly k choices, so its dispatch also records where each choice's output
lands among the computed rows (`choice_rows`, [k, T]): the results come back by one Gather and a sum over k,
no scatter. Expert choice, where a token may have any number of rows, adds its rows back with a scatter-add.

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

    packed: bool = True  # every row is computed: no capacity cut a segment short
    choice_rows: Optional[torch.Tensor] = None  # [k, T] token choice: each choice's index among the computed
    #                                             rows (in expert order), sum(counts) for a dropped choice

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def reaches_every_token(self) -> bool:
        """Dropless token choice: every token has k computed rows (known from the routing, not the values)."""
        return self.packed and self.choice_rows is not None


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
    rows = torch.arange(n, device=choice_expert.device)
    if capacity is None:
        kept, row = counts, rows
    else:  # row r of expert e is computed iff its position r - starts[e] is below the capacity
        kept = counts.clamp(max=capacity)
        sorted_expert = choice_expert[order]
        position = rows - starts[sorted_expert]
        computed_start = kept.cumsum(0) - kept
        row = torch.where(position < kept[sorted_expert], computed_start[sorted_expert] + position, kept.sum())
    choice_rows = torch.empty_like(row).scatter(0, order, row).view(k, tokens)  # inverse of the sort
    choice_token = torch.arange(tokens, device=expert_ids.device).repeat(k)
    return Dispatch(token=choice_token[order], weight=gates.t().reshape(-1)[order], starts=starts, counts=kept,
                    expert_fraction=counts.float() / torch.sym_max(n, 1), packed=capacity is None,
                    choice_rows=choice_rows)


def run_experts(flat: torch.Tensor, dispatch: Dispatch, expert: Callable[[int, torch.Tensor], torch.Tensor],
                weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum over the computed rows r of token t of w_r expert(e_r, x_t) (w_r = 1 when not weighted), with
    `expert(e, rows)` run once per expert on its contiguous rows; returns (y [T, d], computed rows per token [T]).

    One host sync reads the segment bounds the loop slices by; under torch.export they are data-dependent
    sizes, so the exported graph keeps the same per-expert slices."""
    starts, counts = torch.stack([dispatch.starts, dispatch.counts]).tolist()
    outputs, weights = [], []
    for e, (start, count) in enumerate(zip(starts, counts)):
        torch._check(start >= 0)
        torch._check(count >= 0)
        torch._check(start + count <= dispatch.token.shape[0])
        # gather the expert's own rows (slicing the token ids, not the rows: ONNX Slice copies its data)
        outputs.append(expert(e, flat.index_select(0, dispatch.token[start:start + count])))
        weights.append(dispatch.weight[start:start + count])
    out = torch.cat(outputs)
    if weighted:
        weight = dispatch.weight if dispatch.packed else torch.cat(weights)
        out = out * weight.to(out.dtype).unsqueeze(1)
    # summed in at least fp32: a no-op for fp32 and fp64, more accurate for fp16/bf16, and ONNX Runtime's CPU
    # ScatterND-add has no fp16
    acc = torch.promote_types(flat.dtype, torch.float32)
    if dispatch.choice_rows is not None:  # token choice: gather each choice's row (a zero row when dropped)
        computed = out.shape[0]
        if not dispatch.packed:
            out = torch.cat([out, out.new_zeros(1, out.shape[1])])
        k, tokens = dispatch.choice_rows.shape
        y = out.index_select(0, dispatch.choice_rows.reshape(-1)).view(k, tokens, -1).to(acc).sum(0)
        return y.to(flat.dtype), (dispatch.choice_rows < computed).sum(0)
    # expert choice: every row is computed (packed), a token may have any number of them
    y = flat.new_zeros(flat.shape, dtype=acc).index_add(0, dispatch.token, out.to(acc))
    rows_per_token = dispatch.token.new_zeros(flat.shape[0]).index_add(0, dispatch.token, torch.ones_like(dispatch.token))
    return y.to(flat.dtype), rows_per_token
