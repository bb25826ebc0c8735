"""The implementations our MoE layer is measured against, each reading the weights of one of our MoELayers.

    hf_loop      the Hugging Face (Mixtral) eager loop: for each expert, torch.where over the one-hot routing
                 mask, the expert on its tokens, index_add back
    grouped_mm   tokens sorted by expert, torch.nn.functional.grouped_mm with per-expert offsets for both
                 projections (eager only: its ONNX export is not supported)
    every_expert the naive graph: every expert on every token, outputs weighted by a [T, E] routing mask that is
                 zero for experts a token did not choose (exportable: standard ops, E full-width products)

All take token-choice top-k routing from the layer's own router and use its gates (the combine rule does not
change the cost).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_compile import MoELayer
from moe_compile.moe import ACTIVATIONS


def _route(layer: MoELayer, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates [T, k], expert ids [T, k]) from the layer's router."""
    probs = torch.softmax(F.linear(flat, layer.router.weight).float(), dim=-1)
    return layer.router.select(probs)


class _Peer(nn.Module):
    """A peer implementation reading the weights and router of `layer`."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer


class HFLoop(_Peer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, ids = _route(self.layer, flat)
        y = torch.zeros_like(flat)
        mask = F.one_hot(ids, self.layer.num_experts).permute(2, 1, 0)  # [E, k, T]
        for e in range(self.layer.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel():
                y.index_add_(0, token, self.layer.expert(e, flat[token]) * gates[token, slot, None].to(flat.dtype))
        return y.view(x.shape)


class GroupedMM(_Peer):
    def __init__(self, layer: MoELayer):
        super().__init__(layer)
        self.up = layer.up_weight.detach().transpose(1, 2).contiguous()  # [E, d, m]
        self.gate = None if layer.gate_weight is None else layer.gate_weight.detach().transpose(1, 2).contiguous()
        self.down = layer.down_weight.detach().transpose(1, 2).contiguous()  # [E, m, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        flat = x.reshape(-1, x.shape[-1])
        gates, ids = _route(layer, flat)
        k = ids.shape[1]
        order = ids.reshape(-1).argsort(stable=True)
        offs = torch.bincount(ids.reshape(-1), minlength=layer.num_experts).cumsum(0).to(torch.int32)
        rows = flat[order // k]
        expert_of_row = ids.reshape(-1)[order]
        act = ACTIVATIONS[layer.activation]
        h = F.grouped_mm(rows, self.up, offs=offs)
        if layer.up_bias is not None:
            h = h + layer.up_bias[expert_of_row]
        if self.gate is not None:
            g = F.grouped_mm(rows, self.gate, offs=offs)
            h = act(g if layer.gate_bias is None else g + layer.gate_bias[expert_of_row]) * h
        else:
            h = act(h)
        out = F.grouped_mm(h, self.down, offs=offs)
        if layer.down_bias is not None:
            out = out + layer.down_bias[expert_of_row]
        out = out * gates.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(flat).index_add(0, order // k, out).view(x.shape)


class EveryExpert(_Peer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, ids = _route(self.layer, flat)
        mask = torch.zeros(flat.shape[0], self.layer.num_experts, dtype=flat.dtype, device=flat.device)
        mask = mask.scatter(1, ids, gates.to(flat.dtype))  # [T, E], zero for experts a token did not choose
        y = sum(self.layer.expert(e, flat) * mask[:, e:e + 1] for e in range(self.layer.num_experts))
        return y.view(x.shape)
