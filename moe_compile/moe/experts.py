"""Expert builders: E experts made from one dense FFN, stacked as [E, out, in] tensors.

upcycle  expert e = the dense FFN (plus optional Gaussian noise of std `noise * std(W)`), as in sparse
         upcycling (Komatsuzaki et al. 2022). Each expert keeps its own copy of b_down.
split    the d_ff neurons are partitioned into E equal groups S_e (MoEfication, Zhang et al. 2022): expert e
         holds rows S_e of W_up / W_gate / b_up and columns S_e of W_down, so
             sum_e W_down[:, S_e] act(W_up[S_e] x + b_up[S_e]) + b_down = dense FFN(x),
         and b_down is added once, after the experts (ExpertWeights.output_bias).
Partitions: contiguous (S_e = e*m .. (e+1)*m), random (a seeded permutation), kmeans (balanced k-means of
the neurons' input weight rows, so that neurons that fire together share an expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import MoEConfig
from .ffn import DenseFFN


@dataclass
class ExpertWeights:
    up_weight: torch.Tensor  # [E, m, d]
    up_bias: Optional[torch.Tensor]  # [E, m]
    down_weight: torch.Tensor  # [E, d, m]
    down_bias: Optional[torch.Tensor]  # [E, d], per expert (upcycle)
    gate_weight: Optional[torch.Tensor] = None  # [E, m, d]
    gate_bias: Optional[torch.Tensor] = None
    output_bias: Optional[torch.Tensor] = None  # [d], added once (split)
    neuron_groups: Optional[torch.Tensor] = None  # [E, m] dense neuron indices of each expert (split)


def _stack(t: Optional[torch.Tensor], num_experts: int) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().unsqueeze(0).repeat(num_experts, *([1] * t.dim())).clone()


def upcycle(ffn: DenseFFN, num_experts: int, noise: float, generator: torch.Generator) -> ExpertWeights:
    def copies(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        stacked = _stack(t, num_experts)
        if stacked is not None and noise > 0 and t.dim() == 2:
            scale = noise * float(t.detach().float().std())
            stacked += (torch.randn(stacked.shape, generator=generator) * scale).to(stacked.device, stacked.dtype)
        return stacked

    return ExpertWeights(
        up_weight=copies(ffn.up_weight), up_bias=copies(ffn.up_bias),
        down_weight=copies(ffn.down_weight), down_bias=copies(ffn.down_bias),
        gate_weight=copies(ffn.gate_weight), gate_bias=copies(ffn.gate_bias),
    )


def split(ffn: DenseFFN, num_experts: int, strategy: str, generator: torch.Generator) -> ExpertWeights:
    groups = partition_neurons(ffn, num_experts, strategy, generator).to(ffn.up_weight.device)  # [E, m]

    def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach()[groups].clone()

    return ExpertWeights(
        up_weight=rows(ffn.up_weight), up_bias=rows(ffn.up_bias),
        down_weight=ffn.down_weight.detach()[:, groups].permute(1, 0, 2).contiguous(),
        down_bias=None,
        gate_weight=rows(ffn.gate_weight), gate_bias=rows(ffn.gate_bias),
        output_bias=None if ffn.down_bias is None else ffn.down_bias.detach().clone(),
        neuron_groups=groups,
    )


def neuron_features(ffn: DenseFFN) -> torch.Tensor:
    """One row per neuron: its input weights (gate and up rows side by side for gated FFNs), in fp32."""
    parts = [ffn.gate_weight, ffn.up_weight] if ffn.gated else [ffn.up_weight]
    return torch.cat([p.detach().float().cpu() for p in parts], dim=1)


def partition_neurons(ffn: DenseFFN, num_experts: int, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Partition range(d_ff) into num_experts equal groups; returns [E, d_ff / E] sorted indices."""
    d_ff = ffn.d_ff
    size = d_ff // num_experts
    if strategy == "contiguous":
        order = torch.arange(d_ff)
    elif strategy == "random":
        order = torch.randperm(d_ff, generator=generator)
    elif strategy == "kmeans":
        labels = balanced_kmeans(neuron_features(ffn), num_experts, generator)
        order = torch.argsort(labels, stable=True)
    else:
        raise ValueError(f"unknown split strategy {strategy!r}")
    return order.view(num_experts, size).sort(dim=1).values


def balanced_kmeans(features: torch.Tensor, k: int, generator: torch.Generator, iters: int = 12) -> torch.Tensor:
    """Spherical k-means with clusters of exactly n/k points each; returns a label per row.

    Each step assigns points greedily, most confident (point, centroid) pairs first, into clusters that still
    have room, then moves each centroid to the mean of its points.
    """
    x = torch.nn.functional.normalize(features, dim=1)
    n = x.shape[0]
    size = n // k
    centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        scores = (x @ centroids.T).numpy()
        new_labels = _greedy_balanced_assign(scores, size)
        if np.array_equal(new_labels, labels.numpy()):
            break
        labels = torch.from_numpy(new_labels)
        for c in range(k):
            centroids[c] = torch.nn.functional.normalize(x[labels == c].mean(0), dim=0)
    return labels


def _greedy_balanced_assign(scores: np.ndarray, size: int) -> np.ndarray:
    n, k = scores.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, size)
    unassigned = n
    for flat in np.argsort(-scores, axis=None, kind="stable"):
        point, cluster = divmod(int(flat), k)
        if labels[point] < 0 and room[cluster] > 0:
            labels[point] = cluster
            room[cluster] -= 1
            unassigned -= 1
            if not unassigned:
                break
    return labels


def build_experts(ffn: DenseFFN, config: MoEConfig, generator: torch.Generator) -> ExpertWeights:
    if config.experts == "upcycle":
        return upcycle(ffn, config.num_experts, config.upcycle_noise, generator)
    return split(ffn, config.num_experts, config.split_strategy, generator)


def init_router_weight(ffn: DenseFFN, experts: ExpertWeights, config: MoEConfig,
                       generator: torch.Generator) -> torch.Tensor:
    """Router weight [E, d_model].

    random    N(0, 0.02^2), seeded.
    centroid  row e = mean of the unit-normalised input weight rows (gate rows for gated FFNs) of the neurons
              in expert e, scaled to unit norm: tokens that excite an expert's neurons score high for it.
    """
    d = ffn.d_model
    if config.router_init == "random":
        weight = torch.randn(config.num_experts, d, generator=generator) * 0.02
    else:
        rows = torch.nn.functional.normalize((ffn.gate_weight if ffn.gated else ffn.up_weight).detach().float(), dim=1)
        weight = torch.nn.functional.normalize(rows.cpu()[experts.neuron_groups.cpu()].mean(1), dim=1)
    return weight.to(device=ffn.up_weight.device, dtype=ffn.up_weight.dtype)
