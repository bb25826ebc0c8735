"""Expert builders (upcycle, split with each partition strategy) and router initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_compile.config import MoEConfig
from moe_compile.moe import DenseFFN, build_moe_layer
from moe_compile.moe.experts import (
    build_experts,
    init_router_weight,
    partition_neurons,
    split,
    upcycle,
)

STRATEGIES = ("kmeans", "random", "contiguous")


def dense_ffn(d=16, d_ff=48, gated=False, bias=True, activation="gelu", seed=0, dtype=torch.float32) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return DenseFFN(up_weight=r(d_ff, d), up_bias=r(d_ff) if bias else None,
                    down_weight=r(d, d_ff), down_bias=r(d) if bias else None, activation=activation,
                    gate_weight=r(d_ff, d) if gated else None,
                    gate_bias=r(d_ff) if gated and bias else None)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gated", [False, True])
def test_split_groups_are_an_equal_partition(strategy, gated):
    ffn = dense_ffn(d_ff=48, gated=gated)
    groups = partition_neurons(ffn, 6, strategy, _gen())
    assert groups.shape == (6, 8)
    assert torch.equal(groups.flatten().sort().values, torch.arange(48))
    assert torch.all(groups[:, 1:] > groups[:, :-1])  # sorted within a group, no repeats


def test_contiguous_and_random_partitions():
    ffn = dense_ffn(d_ff=48)
    assert torch.equal(partition_neurons(ffn, 4, "contiguous", _gen()), torch.arange(48).view(4, 12))
    a = partition_neurons(ffn, 4, "random", _gen(0))
    b = partition_neurons(ffn, 4, "random", _gen(0))
    c = partition_neurons(ffn, 4, "random", _gen(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, torch.arange(48).view(4, 12))


def _within_group_cosine(features: torch.Tensor, groups: torch.Tensor) -> float:
    x = F.normalize(features, dim=1)
    sims = [(x[g] @ x[g].t()).mean() for g in groups]
    return float(torch.stack(sims).mean())


def test_kmeans_groups_similar_neurons():
    # Neurons drawn around 4 planted directions, shuffled: kmeans must recover the clusters; random must not.
    d, per, clusters = 16, 12, 4
    g = _gen(7)
    centers = F.normalize(torch.randn(clusters, d, generator=g), dim=1)
    labels = torch.arange(clusters).repeat_interleave(per)
    rows = centers[labels] + 0.15 * torch.randn(clusters * per, d, generator=g)
    perm = torch.randperm(clusters * per, generator=g)
    rows, labels = rows[perm], labels[perm]
    ffn = DenseFFN(up_weight=rows, up_bias=None, down_weight=torch.randn(d, clusters * per, generator=g),
                   down_bias=None, activation="relu")

    kmeans = partition_neurons(ffn, clusters, "kmeans", _gen())
    for group in kmeans:  # each expert holds exactly one planted cluster
        assert len(set(labels[group].tolist())) == 1
    random = partition_neurons(ffn, clusters, "random", _gen())
    contiguous = partition_neurons(ffn, clusters, "contiguous", _gen())
    k, r, c = (_within_group_cosine(rows, p) for p in (kmeans, random, contiguous))
    assert k > r + 0.3 and k > c + 0.3


def test_kmeans_beats_random_on_unstructured_weights():
    ffn = dense_ffn(d=16, d_ff=64, seed=3)
    kmeans = partition_neurons(ffn, 4, "kmeans", _gen())
    random = partition_neurons(ffn, 4, "random", _gen())
    assert _within_group_cosine(ffn.up_weight, kmeans) > _within_group_cosine(ffn.up_weight, random) + 0.05


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gated_split_keeps_gate_and_up_rows_together(strategy):
    ffn = dense_ffn(gated=True)
    experts = split(ffn, 4, strategy, _gen())
    for e, group in enumerate(experts.neuron_groups):
        assert torch.equal(experts.gate_weight[e], ffn.gate_weight[group])
        assert torch.equal(experts.up_weight[e], ffn.up_weight[group])
        assert torch.equal(experts.gate_bias[e], ffn.gate_bias[group])
        assert torch.equal(experts.up_bias[e], ffn.up_bias[group])
        assert torch.equal(experts.down_weight[e], ffn.down_weight[:, group])


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_experts_sum_to_dense_with_bias_once(gated, strategy):
    ffn = dense_ffn(gated=gated)
    experts = split(ffn, 4, strategy, _gen())
    assert experts.down_bias is None
    assert torch.equal(experts.output_bias, ffn.down_bias)
    x = torch.randn(10, 16, generator=_gen(9))
    act = F.gelu
    total = experts.output_bias.clone()
    for e in range(4):
        h = F.linear(x, experts.up_weight[e], experts.up_bias[e])
        if gated:
            h = act(F.linear(x, experts.gate_weight[e], experts.gate_bias[e])) * h
        else:
            h = act(h)
        total = total + F.linear(h, experts.down_weight[e])
    assert torch.allclose(total, ffn(x), atol=1e-5)
    # adding the bias once per expert would be off by (E - 1) * b_down
    assert not torch.allclose(total + 3 * ffn.down_bias, ffn(x), atol=1e-3)


def test_upcycle_copies_and_noise():
    ffn = dense_ffn(gated=True)
    clean = upcycle(ffn, 4, 0.0, _gen())
    for name in ("up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias"):
        stacked = getattr(clean, name)
        assert stacked.shape[0] == 4
        assert all(torch.equal(stacked[e], getattr(ffn, name)) for e in range(4)), name
    assert clean.output_bias is None

    noisy = upcycle(ffn, 4, 0.1, _gen())
    for name in ("up_weight", "gate_weight", "down_weight"):
        stacked, dense = getattr(noisy, name), getattr(ffn, name)
        assert not torch.equal(stacked[0], stacked[1]), name
        diff = stacked - dense
        assert 0.05 < float(diff.std() / dense.std()) < 0.2, name  # noise std = 0.1 * std(W)
    assert torch.equal(noisy.up_bias[0], ffn.up_bias)  # biases are copied as they are
    assert not torch.equal(noisy.up_weight, upcycle(ffn, 4, 0.1, _gen(1)).up_weight)
    assert torch.equal(noisy.up_weight, upcycle(ffn, 4, 0.1, _gen()).up_weight)


def test_experts_do_not_alias_the_dense_weights():
    ffn = dense_ffn()
    for experts in (upcycle(ffn, 2, 0.0, _gen()), split(ffn, 2, "contiguous", _gen())):
        before = ffn.up_weight.clone()
        with torch.no_grad():
            experts.up_weight.add_(1.0)
        assert torch.equal(ffn.up_weight, before)


def test_centroid_router_init():
    ffn = dense_ffn(gated=True)
    config = MoEConfig(num_experts=4, experts="split", split_strategy="random")
    experts = build_experts(ffn, config, _gen())
    weight = init_router_weight(ffn, experts, config, _gen())
    rows = F.normalize(ffn.gate_weight, dim=1)  # gate rows for gated FFNs
    for e, group in enumerate(experts.neuron_groups):
        assert torch.allclose(weight[e], F.normalize(rows[group].mean(0), dim=0), atol=1e-6)


def test_random_router_init_is_small_and_seeded():
    ffn = dense_ffn()
    config = MoEConfig(num_experts=4)
    experts = build_experts(ffn, config, _gen())
    w = init_router_weight(ffn, experts, config, _gen(0))
    assert w.shape == (4, 16) and 0.01 < float(w.std()) < 0.04
    assert torch.equal(w, init_router_weight(ffn, experts, config, _gen(0)))
    assert not torch.equal(w, init_router_weight(ffn, experts, config, _gen(1)))


CONFIGS = [MoEConfig(num_experts=4, upcycle_noise=0.1), MoEConfig(num_experts=4, experts="split"),
           MoEConfig(num_experts=4, experts="split", split_strategy="random", routing="switch")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.experts}-{c.routing}")
@pytest.mark.parametrize("gated", [False, True])
def test_layer_keeps_dtype_and_device(dtype, config, gated):
    ffn = dense_ffn(gated=gated, dtype=dtype)
    layer = build_moe_layer(ffn, config, seed=0)
    assert {p.dtype for p in layer.parameters()} == {dtype}
    assert {p.device for p in layer.parameters()} == {ffn.up_weight.device}
    y = layer(torch.randn(2, 5, 16, dtype=dtype))
    assert y.dtype == dtype and y.shape == (2, 5, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.experts}-{c.routing}")
def test_layer_keeps_cuda_device(config):  # the seeded generators are CPU ones; their draws must move
    ffn = dense_ffn(gated=True)
    ffn = DenseFFN(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(ffn).items()})
    layer = build_moe_layer(ffn, config, seed=0)
    assert {p.device.type for p in layer.parameters()} == {"cuda"}
    assert layer(torch.randn(2, 5, 16, device="cuda")).device.type == "cuda"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.experts}-{c.routing}")
def test_build_is_deterministic_per_seed(config):
    ffn = dense_ffn(d_ff=64, gated=True)
    a, b, c = (build_moe_layer(ffn, config, seed=s).state_dict() for s in (5, 5, 6))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
