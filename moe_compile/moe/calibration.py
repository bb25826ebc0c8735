"""What split experts learn from calibration activations of one FFN site (inputs x_t, t = 1..N, sampled).

    h(x)            the FFN's hidden activations [f]: act(W_up x + b_up), or act(W_gate x + b_gate) * (W_up x + b_up)
    c_i(x)          neuron i's contribution size |h_i(x)| * ||W_down[:, i]||
    mass_i          mean_t c_i(x_t): how much neuron i adds, on average; the top ones become the shared expert
    coactivation    neuron i's profile (c_i(x_t))_t, unit-normalised: neurons that fire on the same tokens have
                    close profiles and are clustered into one expert (balanced spherical k-means)
    expert mass     M_e(x) = ||W_down[:, S_e] h_{S_e}(x)||, the size of expert e's output for token x
    router          W_r [E, d] fitted by a few seeded Adam steps of cross-entropy between softmax(W_r x) and the
                    uniform distribution over the k' experts of largest M_e(x) (k' = routed experts per token);
                    recall = share of those true top-k' that the router's top-k' picks, on held-out tokens
    compensation    mu_e = mean of W_down[:, S_e] h_{S_e}(x) over the tokens whose router skips e; folded as
                    b_e = -mu_e (expert e's own down bias) and b_out += sum_e mu_e, so a chosen expert adds its
                    exact output and a skipped one adds mu_e, at no run-time cost (k = E stays exact)

The last `held_out` share of the sampled tokens is never fitted on; fits report their figures on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .ffn import DenseFFN

ROUTER_FIT_STEPS = 100
ROUTER_FIT_LR = 0.05


@dataclass
class SiteCalibration:
    """Sampled inputs of one FFN site and their hidden activations (fp32, CPU); `results` collects fit figures."""

    inputs: torch.Tensor  # [N, d]
    hidden: torch.Tensor  # [N, f]
    contribution_scale: torch.Tensor  # [f] ||W_down[:, i]||
    held_out: float = 0.2
    results: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_inputs(cls, ffn: DenseFFN, inputs: torch.Tensor, held_out: float = 0.2) -> "SiteCalibration":
        weights = _fp32_cpu(ffn)
        x = inputs.detach().float().cpu()
        return cls(x, hidden_activations(weights, x), weights.down_weight.norm(dim=0), held_out)

    @property
    def num_fit(self) -> int:
        return max(int(len(self.inputs) * (1 - self.held_out)), 1)

    def neuron_mass(self) -> torch.Tensor:
        """[f] mean contribution size of each neuron over the fit tokens."""
        return self.hidden[: self.num_fit].abs().mean(0) * self.contribution_scale

    def coactivation_features(self, neurons: torch.Tensor, max_tokens: int = 4096) -> torch.Tensor:
        """[len(neurons), T] each neuron's contribution sizes over (at most max_tokens) fit tokens."""
        tokens = min(self.num_fit, max_tokens)
        return (self.hidden[:tokens, neurons].abs() * self.contribution_scale[neurons]).T.contiguous()

    def expert_outputs(self, ffn: DenseFFN, groups: torch.Tensor, rows: slice) -> Iterator[torch.Tensor]:
        """Each expert's output W_down[:, S_e] h_{S_e}(x) [n, d] on the tokens `rows`, one expert at a time."""
        down = ffn.down_weight.detach().float().cpu()
        h = self.hidden[rows]
        return (h[:, g] @ down[:, g].T for g in groups)


def hidden_activations(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    """h(x) [N, f] of the dense FFN (no down projection)."""
    return ffn.hidden(x)


def select_shared(calibration: SiteCalibration, count: int) -> torch.Tensor:
    """The `count` neurons of largest mass, sorted."""
    return calibration.neuron_mass().topk(count).indices.sort().values


def fit_router(calibration: SiteCalibration, ffn: DenseFFN, groups: torch.Tensor, top_k: int,
               generator: torch.Generator) -> torch.Tensor:
    """Router weight [E, d] fitted to pick each token's top_k experts by expert mass; records held-out recall."""
    mass = torch.stack([out.norm(dim=1) for out in calibration.expert_outputs(ffn, groups, slice(None))], 1)
    target = torch.zeros_like(mass).scatter_(1, mass.topk(top_k, dim=1).indices, 1.0 / top_k)
    x, n = calibration.inputs, calibration.num_fit
    weight = (torch.randn(len(groups), x.shape[1], generator=generator) * 0.01).requires_grad_()
    optimizer = torch.optim.Adam([weight], lr=ROUTER_FIT_LR)
    with torch.enable_grad():
        for _ in range(ROUTER_FIT_STEPS):
            loss = -(target[:n] * torch.log_softmax(x[:n] @ weight.T, dim=1)).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    weight = weight.detach()
    calibration.results["router_recall_fit"] = _recall(x[:n] @ weight.T, mass[:n], top_k)
    if n < len(x):
        calibration.results["router_recall_held_out"] = _recall(x[n:] @ weight.T, mass[n:], top_k)
    return weight


def compensation_means(calibration: SiteCalibration, ffn: DenseFFN, groups: torch.Tensor, router_weight: torch.Tensor,
                       top_k: int) -> torch.Tensor:
    """mu [E, d]: each expert's mean output over the fit tokens on which the router does not choose it."""
    rows = slice(0, calibration.num_fit)
    logits = calibration.inputs[rows] @ router_weight.float().cpu().T
    skipped = torch.ones_like(logits).scatter_(1, logits.topk(top_k, dim=1).indices, 0.0).T  # [E, n]
    means = [skip @ out / skip.sum() if skip.sum() > 0 else out.mean(0)
             for skip, out in zip(skipped, calibration.expert_outputs(ffn, groups, rows))]
    return torch.stack(means)


def _recall(logits: torch.Tensor, mass: torch.Tensor, top_k: int) -> float:
    picked = torch.zeros_like(mass).scatter_(1, logits.topk(top_k, dim=1).indices, 1.0)
    best = torch.zeros_like(mass).scatter_(1, mass.topk(top_k, dim=1).indices, 1.0)
    return float((picked * best).sum() / best.sum())


def _fp32_cpu(ffn: DenseFFN) -> DenseFFN:
    def conv(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().float().cpu()

    return DenseFFN(conv(ffn.up_weight), conv(ffn.up_bias), conv(ffn.down_weight), conv(ffn.down_bias),
                    ffn.activation, conv(ffn.gate_weight), conv(ffn.gate_bias), hidden_norm=ffn.hidden_norm)
