"""Split experts from calibration activations: shared neurons, co-activation groups, the calibrated router and
compensation, checked against independent computations on small FFNs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_compile.config import MoEConfig
from moe_compile.moe import SiteCalibration, build_moe_layer
from moe_compile.moe.calibration import hidden_activations
from tests.moe.test_experts import dense_ffn


def _topics_ffn(topics=4, per_topic=8, d=16, seed=0):
    """A ReLU FFN whose neurons of topic g fire only on tokens near direction g, and such tokens."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(topics, d, generator=g), dim=1) * 3
    labels = torch.arange(topics).repeat_interleave(per_topic)
    ffn = dense_ffn(d=d, d_ff=topics * per_topic, activation="relu", seed=seed)
    ffn.up_weight = directions[labels] + 0.1 * torch.randn(topics * per_topic, d, generator=g)
    ffn.up_bias = torch.full((topics * per_topic,), -4.0)
    token_topics = torch.randint(0, topics, (2000,), generator=g)
    x = directions[token_topics] / 3 * 2 + 0.1 * torch.randn(2000, d, generator=g)
    order = torch.randperm(topics * per_topic, generator=g)  # hide the groups from contiguous splits
    ffn.up_weight, ffn.up_bias, ffn.down_weight = ffn.up_weight[order], ffn.up_bias[order], ffn.down_weight[:, order]
    return ffn, x, labels[order], token_topics


def test_site_calibration_hidden_and_mass():
    ffn = dense_ffn(gated=True, activation="silu")
    x = torch.randn(100, 16)
    cal = SiteCalibration.from_inputs(ffn, x)
    h = F.silu(F.linear(x, ffn.gate_weight, ffn.gate_bias)) * F.linear(x, ffn.up_weight, ffn.up_bias)
    assert torch.allclose(cal.hidden, h)
    assert torch.allclose(F.linear(hidden_activations(ffn, x), ffn.down_weight, ffn.down_bias), ffn(x), atol=1e-5)
    assert cal.num_fit == 80
    expected = h[:80].abs().mean(0) * ffn.down_weight.norm(dim=0)
    assert torch.allclose(cal.neuron_mass(), expected)


def test_coactivation_recovers_neurons_that_fire_together_and_router_finds_them():
    ffn, x, labels, _ = _topics_ffn()
    cal = SiteCalibration.from_inputs(ffn, x)
    config = MoEConfig(num_experts=4, top_k=1, experts="split", split_strategy="coactivation",
                       router_init="calibrated")
    layer = build_moe_layer(ffn, config, seed=0, calibration=cal)
    groups = layer_groups(layer, ffn)
    assert sorted(tuple(sorted(set(labels[g].tolist()))) for g in groups) == [(0,), (1,), (2,), (3,)]
    assert cal.results["router_recall_held_out"] > 0.95
    assert torch.allclose(layer(x), ffn(x), atol=1e-4)  # each token's active neurons are all in its expert


def layer_groups(layer, ffn):
    """Each expert's neuron indices, found by matching its up rows against the dense ones."""
    return [torch.cdist(rows, ffn.up_weight).argmin(1) for rows in layer.up_weight]


def test_shared_expert_holds_the_neurons_of_largest_mass():
    ffn = dense_ffn(d_ff=48, activation="gelu")
    x = torch.randn(500, 16)
    cal = SiteCalibration.from_inputs(ffn, x)
    config = MoEConfig(num_experts=6, top_k=3, experts="split", shared_experts=2, split_strategy="coactivation",
                       router_init="calibrated")
    layer = build_moe_layer(ffn, config, seed=0, calibration=cal)
    top = cal.neuron_mass().topk(16).indices.sort().values
    assert torch.equal(layer.shared.up_weight, ffn.up_weight[top])
    assert layer.num_experts == 4 and layer.router.top_k == 1 and layer.expert_width == 8
    routed = torch.cat([torch.cdist(rows, ffn.up_weight).argmin(1) for rows in layer.up_weight])
    assert sorted(torch.cat([routed, top]).tolist()) == list(range(48))


def test_compensation_adds_each_skipped_experts_mean_output():
    ffn = dense_ffn(d_ff=48, activation="relu")
    x = torch.randn(400, 16)
    cal = SiteCalibration.from_inputs(ffn, x)
    config = MoEConfig(num_experts=6, top_k=2, experts="split", router_init="calibrated", compensate=True)
    layer = build_moe_layer(ffn, config, seed=0, calibration=cal)
    groups = layer_groups(layer, ffn)
    h = cal.hidden
    outputs = torch.stack([h[:, g] @ ffn.down_weight[:, g].T for g in groups])  # [E, N, d]
    chosen = torch.zeros(400, 6).scatter_(1, (x @ layer.router.weight.T).topk(2, dim=1).indices, 1.0).T
    fit = chosen[:, :320]
    mu = torch.stack([((1 - c).unsqueeze(1) * o[:320]).sum(0) / (1 - c).sum() for c, o in zip(fit, outputs)])
    expected = (chosen.unsqueeze(2) * outputs + (1 - chosen).unsqueeze(2) * mu.unsqueeze(1)).sum(0) + ffn.down_bias
    assert torch.allclose(layer(x), expected, atol=1e-4)
    assert torch.allclose(layer.down_bias, -mu, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_every_calibrated_part_keeps_k_equal_e_exact(gated):
    ffn = dense_ffn(d_ff=64, gated=gated, activation="silu" if gated else "gelu")
    x = torch.randn(300, 16)
    config = MoEConfig(num_experts=16, top_k=16, experts="split", shared_experts=3, split_strategy="coactivation",
                       router_init="calibrated", compensate=True)
    layer = build_moe_layer(ffn, config, seed=0, calibration=SiteCalibration.from_inputs(ffn, x))
    assert torch.allclose(layer(x), ffn(x), atol=1e-4)
