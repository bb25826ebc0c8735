"""Expert builders: E experts made from one dense FFN, stacked as [E, out, in] tensors.

upcycle  expert e = the dense FFN (plus optional Gaussian noise of std `noise * std(W)`), as in sparse
         upcycling (Komatsuzaki et al. 2022). Each expert keeps its own copy of b_down.
split    the d_ff neurons are partitioned into E equal groups S_e (MoEfication, Zhang et al. 2022): expert e
         holds rows S_e of W_up / W_gate / b_up and columns S_e of W_down, so
             sum_e W_down[:, S_e] act(W_up[S_e] x + b_up[S_e]) + b_down = dense FFN(x),
         and b_down is added once, after the experts (ExpertWeights.output_bias).
Partitions: contiguous (S_e = e*m .. (e+1)*m), random (a seeded permutation), kmeans (balanced k-means of
the neurons' input weight rows, so that neurons that fire together share an expert), coactivation (balanced
k-means of the neurons' activation profiles on calibration tokens, moe/calibration.py). With s shared groups,
the s*m neurons of largest calibration mass form the shared expert (SharedExpert) and the others are
partitioned into E - s routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import MoEConfig
from ..errors import MoECompileError
from .activations import is_elementwise
from .calibration import SiteCalibration, fit_router, select_shared
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
    shared_neurons: Optional[torch.Tensor] = None  # [s*m] dense neuron indices of the shared expert (split)


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


def split_problem(ffn: DenseFFN) -> Optional[str]:
    """Why split experts cannot reproduce `ffn`, or None when they can."""
    norm = ffn.hidden_norm
    if norm is None or is_elementwise(norm):
        return None
    return (f"its hidden norm {type(norm).__name__} (between the activation and the down projection) acts on all "
            f"{ffn.d_ff} neurons at once, and split experts each hold only some of them, so they would compute a "
            "different model; use experts='upcycle' (each expert a copy of the whole FFN, norm included), or keep "
            "the site dense")


def split(ffn: DenseFFN, num_experts: int, strategy: str, generator: torch.Generator, shared_experts: int = 0,
          calibration: Optional[SiteCalibration] = None) -> ExpertWeights:
    """num_experts groups of d_ff / num_experts neurons; the first `shared_experts` groups' worth go to the
    shared expert (largest calibration mass; the first neurons when there is no calibration, for loading)."""
    problem = split_problem(ffn)
    if problem:
        raise MoECompileError(f"split experts: {problem}.")
    size = ffn.d_ff // num_experts
    shared = None
    neurons = torch.arange(ffn.d_ff)
    if shared_experts:
        shared = select_shared(calibration, shared_experts * size) if calibration is not None \
            else torch.arange(shared_experts * size)
        neurons = neurons[~torch.isin(neurons, shared)]
    routed = num_experts - shared_experts
    groups = partition_neurons(ffn, routed, strategy, generator, neurons, calibration).to(ffn.up_weight.device)

    def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach()[groups].clone()

    return ExpertWeights(
        up_weight=rows(ffn.up_weight), up_bias=rows(ffn.up_bias),
        down_weight=ffn.down_weight.detach()[:, groups].permute(1, 0, 2).contiguous(),
        down_bias=None,
        gate_weight=rows(ffn.gate_weight), gate_bias=rows(ffn.gate_bias),
        output_bias=None if ffn.down_bias is None else ffn.down_bias.detach().clone(),
        neuron_groups=groups,
        shared_neurons=shared,
    )


def neuron_features(ffn: DenseFFN) -> torch.Tensor:
    """One row per neuron: its input weights (gate and up rows side by side for gated FFNs), in fp32."""
    parts = [ffn.gate_weight, ffn.up_weight] if ffn.gated else [ffn.up_weight]
    return torch.cat([p.detach().float().cpu() for p in parts], dim=1)


def partition_neurons(ffn: DenseFFN, num_experts: int, strategy: str, generator: torch.Generator,
                      neurons: Optional[torch.Tensor] = None,
                      calibration: Optional[SiteCalibration] = None) -> torch.Tensor:
    """Partition `neurons` (default range(d_ff)) into num_experts equal groups; returns [E, n / E] sorted indices.

    coactivation without calibration (a layout to load weights into) falls back to contiguous groups."""
    neurons = torch.arange(ffn.d_ff) if neurons is None else neurons
    size = len(neurons) // num_experts
    if strategy == "random":
        order = torch.randperm(len(neurons), generator=generator)
    elif strategy == "kmeans" or (strategy == "coactivation" and calibration is not None):
        features = neuron_features(ffn)[neurons] if strategy == "kmeans" else \
            calibration.coactivation_features(neurons)
        order = torch.argsort(balanced_kmeans(features, num_experts, generator), stable=True)
    elif strategy in ("contiguous", "coactivation"):
        order = torch.arange(len(neurons))
    else:
        raise ValueError(f"unknown split strategy {strategy!r}")
    return neurons[order].view(num_experts, size).sort(dim=1).values


def balanced_kmeans(features: torch.Tensor, k: int, generator: torch.Generator, iters: int = 12) -> torch.Tensor:
    """Spherical k-means with clusters of exactly n/k points each; returns a label per row.

    Centroids start k-means++ style (each next one drawn with probability ~ its distance to the nearest chosen
    one, seeded). Each step assigns points greedily, most confident (point, centroid) pairs first, into clusters
    that still have room, then moves each centroid to the mean of its points.
    """
    x = torch.nn.functional.normalize(features, dim=1)
    n = x.shape[0]
    size = n // k
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(k - 1):
        distance = (1 - (x @ x[chosen].T).max(1).values).clamp(min=0)
        weights = distance if distance.sum() > 0 else torch.ones(n)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
    centroids = x[chosen].clone()
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


def build_experts(ffn: DenseFFN, config: MoEConfig, generator: torch.Generator,
                  calibration: Optional[SiteCalibration] = None) -> ExpertWeights:
    if config.experts == "upcycle":
        return upcycle(ffn, config.num_experts, config.upcycle_noise, generator)
    return split(ffn, config.num_experts, config.split_strategy, generator, config.shared_experts, calibration)


def init_router_weight(ffn: DenseFFN, experts: ExpertWeights, config: MoEConfig,
                       generator: torch.Generator, calibration: Optional[SiteCalibration] = None) -> torch.Tensor:
    """Router weight [E_routed, d_model].

    random      N(0, 0.02^2), seeded.
    centroid    row e = mean of the unit-normalised input weight rows (gate rows for gated FFNs) of the neurons
                in expert e, scaled to unit norm: tokens that excite an expert's neurons score high for it.
    calibrated  fitted to each calibration token's experts of largest output (moe/calibration.py); zeros when
                there is no calibration (a layout to load weights into).
    """
    d = ffn.d_model
    if config.router_init == "random":
        weight = torch.randn(config.routed_experts, d, generator=generator) * 0.02
    elif config.router_init == "calibrated":
        weight = torch.zeros(config.routed_experts, d) if calibration is None else \
            fit_router(calibration, ffn, experts.neuron_groups.cpu(), config.top_k - config.shared_experts, generator)
    else:
        rows = torch.nn.functional.normalize((ffn.gate_weight if ffn.gated else ffn.up_weight).detach().float(), dim=1)
        weight = torch.nn.functional.normalize(rows.cpu()[experts.neuron_groups.cpu()].mean(1), dim=1)
    return weight.to(device=ffn.up_weight.device, dtype=ffn.up_weight.dtype)
