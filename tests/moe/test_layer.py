"""MoELayer: each routing's output against a hand-written loop over tokens and experts, routing statistics,
equality with transformers' MixtralSparseMoeBlock, and (non-)causality."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moe_compile.config import MoEConfig
from moe_compile.moe import MoELayer
from moe_compile.moe.activations import ACTIVATIONS
from moe_compile.moe.experts import ExpertWeights
from moe_compile.moe.routers import build_router

D, M = 8, 12


def random_layer(config: MoEConfig, gated: bool = False, bias: bool = True, output_bias: bool = False,
                 activation: str = "gelu", router_scale: float = 1.0, seed: int = 0) -> MoELayer:
    """An MoE layer whose experts are all different (random weights) and whose router is sharp."""
    g = torch.Generator().manual_seed(seed)
    E = config.num_experts
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    experts = ExpertWeights(up_weight=r(E, M, D), up_bias=r(E, M) if bias else None, down_weight=r(E, D, M),
                            down_bias=None if output_bias or not bias else r(E, D),
                            gate_weight=r(E, M, D) if gated else None,
                            gate_bias=r(E, M) if gated and bias else None,
                            output_bias=r(D) if output_bias else None)
    router = build_router(config, D)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=g) * router_scale)
    return MoELayer(experts, router, activation, config.combine).eval()


def expert_ffn(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of `layer` on rows x, written out with F.linear (no batched dispatch)."""
    act = ACTIVATIONS[layer.activation]
    b = lambda t: None if t is None else t[e]  # noqa: E731
    h = F.linear(x, layer.up_weight[e], b(layer.up_bias))
    h = act(F.linear(x, layer.gate_weight[e], b(layer.gate_bias))) * h if layer.gated else act(h)
    return F.linear(h, layer.down_weight[e], b(layer.down_bias))


def router_probs(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    logits = x.reshape(-1, D) @ layer.router.weight.detach().t()
    return torch.softmax(logits, dim=-1)


def _inputs(batch=2, seq=12, seed=1):
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("output_bias", [False, True])  # True: split experts' shared bias, added once if kept
def test_switch_drops_overflow_to_exact_zero(output_bias):
    config = MoEConfig(num_experts=4, routing="switch", capacity_factor=1.0)
    layer = random_layer(config, router_scale=2.0, output_bias=output_bias)
    with torch.no_grad():
        layer.router.weight[0, 0] += 3.0  # crowd expert 0: every token has a positive first coordinate
    x = _inputs()
    x[..., 0] = x[..., 0].abs() + 0.5
    y = layer(x).reshape(-1, D)
    probs = router_probs(layer, x)
    T, E = probs.shape
    cap = math.ceil(1.0 * T / E)
    flat = x.reshape(-1, D)
    expected = torch.zeros_like(flat)
    count, kept = [0] * E, []
    for t in range(T):
        e = int(probs[t].argmax())
        if count[e] < cap:
            expected[t] = probs[t, e] * expert_ffn(layer, e, flat[t:t + 1])[0]
            if output_bias:
                expected[t] += layer.output_bias
            count[e] += 1
            kept.append(t)
    dropped = [t for t in range(T) if t not in kept]
    assert dropped, "the case must overflow an expert"
    assert torch.all(y[dropped] == 0)  # exactly zero, not merely small
    assert torch.allclose(y, expected, atol=1e-5)
    stats = layer.routing_stats
    assert stats.tokens_per_expert.tolist() == count
    assert stats.dropped_fraction == pytest.approx(len(dropped) / T)


@pytest.mark.parametrize("factor", [None, 0.75, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gated", [False, True])
def test_token_choice_matches_loop(factor, normalize, gated):
    config = MoEConfig(num_experts=4, top_k=2, capacity_factor=factor, normalize=normalize)
    layer = random_layer(config, gated=gated, router_scale=2.0)
    x = _inputs()
    y = layer(x).reshape(-1, D)
    probs = router_probs(layer, x)
    T, E = probs.shape
    flat = x.reshape(-1, D)
    top = probs.topk(2, dim=-1).indices.tolist()
    cap = T if factor is None else math.ceil(factor * T * 2 / E)
    expected, count, processed = torch.zeros_like(flat), [0] * E, set()
    for rank in range(2):  # every token's first choice before any second choice
        for t in range(T):
            e = top[t][rank]
            if count[e] >= cap:
                continue
            count[e] += 1
            processed.add(t)
            gate = probs[t, e] / (probs[t, top[t]].sum() if normalize else 1.0)
            expected[t] += gate * expert_ffn(layer, e, flat[t:t + 1])[0]
    if factor == 0.75:
        assert sum(count) < 2 * T, "the case must drop some choices"
    assert torch.allclose(y, expected, atol=1e-5)
    assert layer.routing_stats.tokens_per_expert.tolist() == count
    assert layer.routing_stats.dropped_fraction == pytest.approx(1 - len(processed) / T)


@pytest.mark.parametrize("k, factor, group", [(1, 1.0, "sequence"), (2, 1.0, "sequence"), (1, 0.5, 6),
                                              (2, 2.0, 4)])
def test_expert_choice_matches_loop(k, factor, group):
    config = MoEConfig(num_experts=4, routing="expert_choice", top_k=k, capacity_factor=factor,
                       expert_choice_group=group)
    layer = random_layer(config, router_scale=2.0)
    x = _inputs()
    y = layer(x).reshape(-1, D)
    probs = router_probs(layer, x)
    T, E = probs.shape
    size = 12 if group == "sequence" else group
    cap = min(math.ceil(factor * size * k / E), size)
    flat = x.reshape(-1, D)
    expected, count, processed = torch.zeros_like(flat), [0] * E, set()
    for start in range(0, T, size):
        for e in range(E):
            ranked = sorted(range(start, start + size), key=lambda t: -float(probs[t, e]))
            for t in ranked[:cap]:
                expected[t] += probs[t, e] * expert_ffn(layer, e, flat[t:t + 1])[0]
                count[e] += 1
                processed.add(t)
    assert torch.allclose(y, expected, atol=1e-5)
    assert layer.routing_stats.tokens_per_expert.tolist() == count
    assert layer.routing_stats.dropped_fraction == pytest.approx(1 - len(processed) / T)
    unpicked = sorted(set(range(T)) - processed)
    if unpicked:
        assert torch.all(y[unpicked] == 0)


def test_unweighted_combine_with_shared_output_bias():
    config = MoEConfig(num_experts=4, top_k=2, experts="split", combine="unweighted")
    layer = random_layer(config, output_bias=True, router_scale=2.0)
    x = _inputs()
    y = layer(x).reshape(-1, D)
    probs = router_probs(layer, x)
    flat = x.reshape(-1, D)
    for t, experts in enumerate(probs.topk(2, dim=-1).indices.tolist()):
        expected = layer.output_bias + sum(expert_ffn(layer, e, flat[t:t + 1])[0] for e in experts)
        assert torch.allclose(y[t], expected, atol=1e-5)


def test_unweighted_router_learns_straight_through_without_changing_the_output():
    config = MoEConfig(num_experts=4, top_k=2, experts="split", combine="unweighted")
    layer = random_layer(config, output_bias=True, router_scale=2.0)
    x = _inputs()
    with torch.no_grad():
        expected = layer(x)
    y = layer(x)
    assert torch.equal(y, expected)  # 1 + p - sg(p) is exactly 1
    direction = torch.randn_like(y)
    (y * direction).sum().backward()
    # dL/dp_{t,e} = <dL/dy_t, FFN_e(x_t)> for the chosen (t, e), 0 elsewhere; through the softmax into W_r
    flat, d_out = x.reshape(-1, D), direction.reshape(-1, D)
    weight = layer.router.weight.detach().clone().requires_grad_()
    probs = torch.softmax(flat @ weight.T, dim=-1)
    chosen = torch.zeros_like(probs).scatter_(1, router_probs(layer, x).topk(2, dim=-1).indices, 1.0)
    with torch.no_grad():
        outputs = torch.stack([expert_ffn(layer, e, flat) for e in range(4)], 1)  # [T, E, d]
        d_probs = chosen * (outputs * d_out.unsqueeze(1)).sum(-1)
    (probs * d_probs).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert torch.allclose(layer.router.weight.grad, weight.grad, atol=1e-5)


def test_dropout_only_in_training():
    config = MoEConfig(num_experts=4)
    layer = random_layer(config)
    layer.dropout.p = 0.5
    x = _inputs()
    eval_out = layer(x)
    layer.train()
    torch.manual_seed(0)
    train_out = layer(x)
    zeroed = train_out == 0
    assert 0.3 < zeroed.float().mean() < 0.7
    assert torch.allclose(train_out[~zeroed], 2 * eval_out[~zeroed], atol=1e-5)


def test_layer_runs_on_2d_input_and_empty_stats_before_forward():
    layer = random_layer(MoEConfig(num_experts=4))
    assert layer.routing_stats is None and layer.aux_losses == {}
    y = layer(torch.randn(5, D))
    assert y.shape == (5, D)
    assert int(layer.routing_stats.tokens_per_expert.sum()) == 10  # dropless top-2
    assert layer.routing_stats.dropped_fraction == 0.0


# ---------------------------------------------------------------- transformers' Mixtral block, same weights

def _mixtral_block(E=8, d=32, inter=48, k=2):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig
    config = MixtralConfig(hidden_size=d, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=k,
                           hidden_act="silu", router_jitter_noise=0.0, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=16)
    return mixtral.MixtralSparseMoeBlock(config).eval()


def _ours_like(block) -> MoELayer:
    E, two_i, d = block.experts.gate_up_proj.shape
    config = MoEConfig(num_experts=E, top_k=block.top_k, routing="token_choice", normalize=True)
    experts = ExpertWeights(up_weight=torch.zeros(E, two_i // 2, d), up_bias=None,
                            down_weight=torch.zeros(E, d, two_i // 2), down_bias=None,
                            gate_weight=torch.zeros(E, two_i // 2, d))
    return MoELayer(experts, build_router(config, d), "silu", config.combine).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_token_choice_top2_equals_mixtral_weights_copied_into_ours(dtype, tol):
    block = _mixtral_block()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g))
        block.experts.gate_up_proj.copy_(torch.randn(block.experts.gate_up_proj.shape, generator=g) * 0.2)
        block.experts.down_proj.copy_(torch.randn(block.experts.down_proj.shape, generator=g) * 0.2)
    ours = _ours_like(block)
    inter = block.experts.down_proj.shape[-1]
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        ours.gate_weight.copy_(block.experts.gate_up_proj[:, :inter])  # gate rows first
        ours.up_weight.copy_(block.experts.gate_up_proj[:, inter:])
        ours.down_weight.copy_(block.experts.down_proj)
    block, ours = block.to(dtype), ours.to(dtype)
    x = torch.randn(3, 10, 32, generator=g, dtype=dtype)
    with torch.no_grad():
        expected = block(x.clone())
        got = ours(x)
    assert got.dtype == dtype
    assert (got - expected).abs().max().item() <= tol
    assert expected.abs().max().item() > 0.1  # a non-trivial output


def test_token_choice_top2_equals_mixtral_ours_copied_into_mixtral():
    from moe_compile.moe import DenseFFN, build_moe_layer
    g = torch.Generator().manual_seed(1)
    d, inter = 32, 48
    ffn = DenseFFN(up_weight=torch.randn(inter, d, generator=g) * 0.2, up_bias=None,
                   down_weight=torch.randn(d, inter, generator=g) * 0.2, down_bias=None, activation="silu",
                   gate_weight=torch.randn(inter, d, generator=g) * 0.2)
    ours = build_moe_layer(ffn, MoEConfig(num_experts=8, top_k=2, upcycle_noise=0.5), seed=0).eval()
    with torch.no_grad():
        ours.router.weight.mul_(50)  # a sharp router, so that the top-2 choice matters
    block = _mixtral_block(E=8, d=d, inter=inter)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ours.gate_weight, ours.up_weight], dim=1))
        block.experts.down_proj.copy_(ours.down_weight)
    x = torch.randn(2, 16, d, generator=g)
    with torch.no_grad():
        assert (ours(x) - block(x.clone())).abs().max().item() <= 1e-5
        # the experts differ enough that a wrong routing or gate would show
        other = ours.router.weight.flip(0)
        ours.router.weight.copy_(other)
        assert (ours(x) - block(x.clone())).abs().max().item() > 1e-3


# ---------------------------------------------------------------- causality

def test_expert_choice_is_not_causal_token_choice_is():
    # E = 2 experts, k = 1, cf = 1, a group of S = 2 tokens: C = 1 slot per expert. Router logits (x_0, 0), so
    # p_0(t) = sigmoid(x_t[0]). Token 0 has x_0[0] = 0.5. If token 1 has x_1[0] = -1, expert 0 prefers token 0;
    # if x_1[0] = 2, expert 0 takes token 1 and expert 1 (p_1 = 0.38 vs 0.12) takes token 0 instead.
    # Token 0's output changes when only the later token 1 changes.
    def layer_for(routing):
        config = MoEConfig(num_experts=2, top_k=1, routing=routing,
                           **({"capacity_factor": 1.0} if routing == "expert_choice" else {}))
        layer = random_layer(config, seed=3)
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0, 0] = 1.0
        return layer

    first = torch.randn(D, generator=torch.Generator().manual_seed(4))
    first[0] = 0.5
    later_a, later_b = torch.randn(D), torch.randn(D)
    later_a[0], later_b[0] = -1.0, 2.0
    seq_a, seq_b = torch.stack([first, later_a])[None], torch.stack([first, later_b])[None]

    ec = layer_for("expert_choice")
    out_a = ec(seq_a)
    assert ec.router(seq_a).dispatch.token.tolist() == [0, 1]
    out_b = ec(seq_b)
    assert ec.router(seq_b).dispatch.token.tolist() == [1, 0]
    assert (out_a[0, 0] - out_b[0, 0]).abs().max() > 1e-2
    p = torch.sigmoid(torch.tensor(0.5))
    assert torch.allclose(out_a[0, 0], p * expert_ffn(ec, 0, first[None])[0], atol=1e-6)
    assert torch.allclose(out_b[0, 0], (1 - p) * expert_ffn(ec, 1, first[None])[0], atol=1e-6)

    for routing in ("token_choice", "switch"):
        tc = layer_for(routing)
        # equal up to rounding: the expert's matmul runs on 1 or 2 rows, which BLAS may sum in another order
        torch.testing.assert_close(tc(seq_a)[0, 0], tc(seq_b)[0, 0], rtol=1e-6, atol=1e-5, msg=routing)


def test_deepcopy_after_a_training_forward():
    """The aux losses of the last forward hold an autograd graph; copies (EMA models, export) leave them out."""
    layer = random_layer(MoEConfig(num_experts=4)).train()
    layer(_inputs())
    copied = copy.deepcopy(layer)
    assert copied.aux_losses == {} and copied.routing_stats is None
    assert set(layer.aux_losses) == {"load_balancing", "z_loss"}  # the original keeps its own
    torch.testing.assert_close(copied.eval()(_inputs()), layer.eval()(_inputs()))


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_compiles_without_graph_breaks(routing):
    """The loop's segment bounds are data-dependent sizes: with capture_scalar_outputs, dynamo traces the whole
    layer as one graph (fullgraph=True fails on any break); the eager backend keeps the test fast. (A capacity
    also compiles, but its symbolic clamp makes dynamo take minutes, too slow for the suite.)"""
    config = MoEConfig(num_experts=4, routing=routing, **({"top_k": 2} if routing != "switch" else {}))
    layer = random_layer(config).eval()
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=True)
        for shape in ((2, 12), (3, 12)):
            x = torch.randn(*shape, D)
            torch.testing.assert_close(compiled(x), layer(x))
