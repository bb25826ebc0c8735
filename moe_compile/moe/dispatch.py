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

import functools
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
    choices: Optional[torch.Tensor] = None  # the selection as `top_k` made it, before any capacity: token choice
    #                                         [T, k] expert ids, expert choice [G, E, C] token ids in their group

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
                    choice_rows=choice_rows, choices=expert_ids)


def run_experts(flat: torch.Tensor, dispatch: Dispatch, expert: Callable[[int, torch.Tensor], torch.Tensor],
                weighted: bool = True, probs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum over the computed rows r of token t of w_r expert(e_r, x_t) (w_r = 1 when not weighted), with
    `expert(e, rows)` run once per expert on its contiguous rows; returns (y [T, d], computed rows per token [T]).

    probs [T, E], given when not weighted: the straight-through w_r = (p - sg(p)) + 1, p = probs[t_r, e_r], equal to
    1 in value, so that the router still learns from the loss, dL/dp_{t,e} = <dL/dy_t, expert(e, x_t)>.

    The computed rows' tokens and gates are split by the counts (one Split each, no per-expert slice arithmetic,
    which keeps the exported graph small where it runs on few tokens: a decode step). One host sync reads the
    counts; under torch.export they are data-dependent sizes, so the exported graph keeps the same per-expert
    split. Results are added back in place per expert in eager PyTorch; an ONNX graph has no in-place ops (each
    ScatterND copies its whole input), so there they are concatenated and gathered back per choice
    (`combine_in_graph`), which measures faster in ONNX Runtime.
    """
    counts = dispatch.counts.tolist()
    token, weight = computed_rows(dispatch)
    for count in counts:
        torch._check(count >= 0)
    torch._check(token.shape[0] == sum(counts))
    # summed in at least fp32: a no-op for fp32 and fp64, more accurate for fp16/bf16
    acc = torch.promote_types(flat.dtype, torch.float32)

    def computed(e: int, rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = expert(e, flat.index_select(0, rows))
        if not weighted and probs is not None:
            p = probs[rows, e]
            gate = (p - p.detach()) + 1  # exactly 1: 1 + p - p would round
        return (out * gate.to(out.dtype).unsqueeze(1) if weighted or probs is not None else out).to(acc)

    segments = list(zip(token.split(counts), weight.split(counts)))
    if torch.compiler.is_exporting():
        y = combine_in_graph(torch.cat([computed(e, *segment) for e, segment in enumerate(segments)]), dispatch,
                             flat.shape[0])
    else:
        y = flat.new_zeros(flat.shape, dtype=acc)
        for e, (rows, gate) in enumerate(segments):
            y.index_add_(0, rows, computed(e, rows, gate))
    if dispatch.choice_rows is not None:
        rows_per_token = (dispatch.choice_rows < token.shape[0]).sum(0)
    else:  # expert choice: every row is computed (packed), a token may have any number of them
        rows_per_token = token.new_zeros(flat.shape[0]).index_add(0, token, torch.ones_like(token))
    return y.to(flat.dtype), rows_per_token


def computed_rows(dispatch: Dispatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, weight) of the rows that are computed, in expert order: all of them when packed, else each
    segment's first counts[e] rows (row r is kept iff starts[e] <= r < starts[e] + counts[e] for some e)."""
    if dispatch.packed:
        return dispatch.token, dispatch.weight
    n = dispatch.token.shape[0]
    ones = torch.ones_like(dispatch.starts)
    edges = torch.zeros(n + 1, dtype=torch.long, device=ones.device).index_add(0, dispatch.starts, ones)
    kept = edges.index_add(0, dispatch.starts + dispatch.counts, -ones).cumsum(0)[:n] > 0
    return dispatch.token[kept], dispatch.weight[kept]


def combine_in_graph(out: torch.Tensor, dispatch: Dispatch, tokens: int) -> torch.Tensor:
    """The computed rows `out` [sum(counts), d], in expert order, summed per token with gathers only.

    Token choice: one gather per choice rank through `choice_rows` (a dropped choice reads an appended zero row)
    and k - 1 adds; expert choice: a scatter-add over the rows' tokens (a token may have any number of rows)."""
    if dispatch.choice_rows is None:
        return out.new_zeros(tokens, out.shape[1]).index_add(0, dispatch.token, out)
    if not dispatch.packed:
        out = torch.cat([out, out.new_zeros(1, out.shape[1])])
    return functools.reduce(torch.add, [out.index_select(0, rows) for rows in dispatch.choice_rows.unbind(0)])
