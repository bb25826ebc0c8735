"""Routers: capacity arithmetic, the sorted dispatch of switch / token-choice / expert-choice against
straightforward loop implementations, the auxiliary losses against their formulas, and jitter."""

from __future__ import annotations

import math

import pytest
import torch

from moe_compile.config import MoEConfig
from moe_compile.moe.dispatch import sort_by_expert
from moe_compile.moe.routers import (
    ExpertChoiceRouter,
    SwitchRouter,
    TokenChoiceRouter,
    build_router,
    capacity,
    top_k,
)


def _probs(tokens: int, experts: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(tokens, experts, generator=g) * scale, dim=-1)


def _filled(dispatch, tokens: int) -> dict[tuple[int, int], float]:
    """{(expert, token): gate} of the rows each expert computes, after checking the layout: segments are
    contiguous, in expert order, and within the token range."""
    out = {}
    starts, counts = dispatch.starts.tolist(), dispatch.counts.tolist()
    assert starts == sorted(starts) and starts[0] == 0
    ends = starts[1:] + [dispatch.token.shape[0]]
    for e, (start, count, end) in enumerate(zip(starts, counts, ends)):
        assert 0 <= count <= end - start
        for t, w in zip(dispatch.token[start:start + count].tolist(), dispatch.weight[start:start + count].tolist()):
            assert 0 <= t < tokens
            out.setdefault((e, t), 0.0)
            out[(e, t)] += w
    return out


@pytest.mark.parametrize("tokens", [1, 7, 16, 37, 100, 513])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 2.0, 0.3])
@pytest.mark.parametrize("k, experts", [(1, 4), (2, 8), (1, 3)])
def test_capacity_is_ceil(tokens, factor, k, experts):
    assert capacity(tokens, factor, k, experts) == min(math.ceil(factor * tokens * k / experts), tokens)


def test_switch_capacity_and_drops_match_loop():
    tokens, experts, factor = 24, 4, 1.0
    probs = _probs(tokens, experts, seed=0)
    probs[:, 0] += 0.5  # skew towards expert 0 so that it overflows
    probs = probs / probs.sum(-1, keepdim=True)
    router = SwitchRouter(8, experts, factor)
    dispatch = router.route(probs, torch.Size([2, 12]))
    cap = math.ceil(factor * tokens / experts)
    assert max(dispatch.counts.tolist()) <= cap

    expected, count = {}, [0] * experts
    for t in range(tokens):  # token order is priority order
        e = int(probs[t].argmax())
        if count[e] < cap:
            expected[(e, t)] = float(probs[t, e])  # gate = softmax probability, not renormalised
            count[e] += 1
    dropped = tokens - len(expected)
    assert dropped > 0, "the case must overflow an expert to test dropping"
    got = _filled(dispatch, tokens)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-7)
    assert int(dispatch.counts.sum()) == len(expected) and dispatch.token.shape == (tokens,)


def test_token_choice_priority_first_choices_before_second():
    # T=4, E=2, k=2, cf=0.5 -> C = ceil(0.5 * 4 * 2 / 2) = 2.
    # First choices: t0, t1, t2 -> e0, t3 -> e1. e0 keeps t0, t1 and drops t2's first choice.
    # Second choices in token order: t0 -> e1 (kept, e1 now full: t3, t0), t1 and t2 -> e1 dropped.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    router = TokenChoiceRouter(8, 2, 2, capacity_factor=0.5, normalize=False)
    dispatch = router.route(probs, torch.Size([4]))
    assert dispatch.counts.tolist() == [2, 2] and dispatch.starts.tolist() == [0, 4]
    # expert 0's segment: t0, t1 kept, then t2 (first choice), t3 (second choice) dropped; expert 1: t3, t0 kept
    assert dispatch.token.tolist() == [0, 1, 2, 3, 3, 0, 1, 2]
    assert torch.allclose(dispatch.weight[[0, 1, 4, 5]], torch.tensor([0.9, 0.8, 0.6, 0.1]))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("factor", [None, 0.5, 1.0, 1.5])
def test_token_choice_matches_loop(normalize, factor):
    tokens, experts, k = 30, 6, 2
    probs = _probs(tokens, experts, seed=1)
    router = TokenChoiceRouter(8, experts, k, capacity_factor=factor, normalize=normalize)
    dispatch = router.route(probs, torch.Size([tokens]))

    top = [sorted(range(experts), key=lambda e: -float(probs[t, e]))[:k] for t in range(tokens)]
    if factor is None:
        cap = max(sum(e in choice for choice in top) for e in range(experts))  # dropless
    else:
        cap = math.ceil(factor * tokens * k / experts)
    assert max(dispatch.counts.tolist()) <= cap
    expected, count = {}, [0] * experts
    for rank in range(k):
        for t in range(tokens):
            e = top[t][rank]
            gate = float(probs[t, e])
            if normalize:
                gate /= sum(float(probs[t, j]) for j in top[t])
            if count[e] < cap:
                expected[(e, t)] = gate
                count[e] += 1
    if factor is None:
        assert len(expected) == tokens * k
    got = _filled(dispatch, tokens)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6)


@pytest.mark.parametrize("group, factor, k", [("sequence", 1.0, 1), ("sequence", 1.0, 2), (4, 1.5, 2),
                                              ("sequence", 0.5, 1), (6, 2.0, 3)])
def test_expert_choice_picks_top_c_tokens_per_group(group, factor, k):
    batch, seq, experts = 2, 12, 4
    tokens = batch * seq
    probs = _probs(tokens, experts, seed=2)
    router = ExpertChoiceRouter(8, experts, k, factor, group=group)
    dispatch = router.route(probs, torch.Size([batch, seq]))

    size = seq if group == "sequence" else group
    cap = min(math.ceil(factor * size * k / experts), size)
    expected = {}
    for start in range(0, tokens, size):
        members = list(range(start, start + size))
        for e in range(experts):
            ranked = sorted(members, key=lambda t: -float(probs[t, e]))
            for t in ranked[:cap]:
                expected[(e, t)] = float(probs[t, e])
    got = _filled(dispatch, tokens)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-7)
    assert dispatch.counts.tolist() == [cap * tokens // size] * experts


def test_expert_choice_refuses_ragged_groups():
    router = ExpertChoiceRouter(8, 4, 1, 1.0, group=5)
    with pytest.raises(ValueError, match="not a multiple of 5"):
        router.route(_probs(12, 4, seed=0), torch.Size([12]))


def test_sort_by_expert_drops_past_capacity():
    ids = torch.tensor([[0], [0], [0], [1]])
    gates = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    dispatch = sort_by_expert(ids, gates, num_experts=2, capacity=2)
    assert dispatch.token.tolist() == [0, 1, 2, 3] and dispatch.weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert dispatch.starts.tolist() == [0, 3] and dispatch.counts.tolist() == [2, 1]  # t2 is past capacity
    assert dispatch.expert_fraction.tolist() == [0.75, 0.25]
    assert not dispatch.packed


def test_sort_by_expert_is_stable_and_handles_empty_experts():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 gets nothing
    gates = torch.arange(6.0).view(3, 2)
    dispatch = sort_by_expert(ids, gates, num_experts=4)
    assert dispatch.counts.tolist() == [2, 0, 3, 1] and dispatch.starts.tolist() == [0, 2, 2, 5]
    # within an expert: first choices in token order, then second choices
    assert dispatch.token.tolist() == [2, 0, 0, 1, 2, 1]
    assert dispatch.weight.tolist() == [4.0, 1.0, 0.0, 2.0, 5.0, 3.0]
    assert dispatch.packed


def _router_with_weight(config: MoEConfig, d: int, seed: int):
    router = build_router(config, d)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return router


@pytest.mark.parametrize("config", [MoEConfig(num_experts=4, routing="switch"),
                                    MoEConfig(num_experts=4, routing="token_choice", top_k=2),
                                    MoEConfig(num_experts=4, routing="token_choice", top_k=3, normalize=False),
                                    MoEConfig(num_experts=4, routing="expert_choice", top_k=1)],
                         ids=lambda c: f"{c.routing}-k{c.top_k}")
def test_aux_losses_match_formulas(config):
    d, tokens = 8, 20
    router = _router_with_weight(config, d, seed=3)
    x = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(4))
    out = router(x)
    losses = {k: v.detach() for k, v in out.aux_losses().items()}

    logits = x[0] @ router.weight.detach().t()
    assert torch.allclose(out.logits, logits, atol=1e-6)
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    E = config.num_experts
    if config.routing == "expert_choice":
        fraction = [1.0 / E] * E  # balanced by construction
    else:
        chosen = [sorted(range(E), key=lambda e: -float(probs[t, e]))[:config.top_k] for t in range(tokens)]
        fraction = [sum(e in c for c in chosen) / (tokens * config.top_k) for e in range(E)]
    mean_prob = [float(probs[:, e].mean()) for e in range(E)]
    balance = E * sum(f * p for f, p in zip(fraction, mean_prob))
    z = float((torch.log(torch.exp(logits).sum(-1)) ** 2).mean())
    assert float(losses["load_balancing"]) == pytest.approx(balance, rel=1e-5)
    assert float(losses["z_loss"]) == pytest.approx(z, rel=1e-5)


def test_load_balancing_loss_is_one_when_uniform():
    router = TokenChoiceRouter(8, 4, 1, None, normalize=False)  # zero weights -> uniform probabilities
    x = torch.randn(4, 8)
    # P_e = 1/4 for every e and sum_e f_e = 1, so L = 4 * sum_e f_e / 4 = 1 whichever experts win the ties
    losses = {k: float(v.detach()) for k, v in router(x).aux_losses().items()}
    assert losses["load_balancing"] == pytest.approx(1.0)
    assert losses["z_loss"] == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_router_jitter_only_in_training():
    router = _router_with_weight(MoEConfig(num_experts=4, router_jitter=0.5), 8, seed=5)
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(6))
    clean = x.reshape(-1, 8) @ router.weight.detach().t()
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    assert torch.allclose(router(x).logits, clean, atol=1e-6)
    router.train()
    torch.manual_seed(0)
    first, second = router(x).logits, router(x).logits
    assert not torch.allclose(first, clean, atol=1e-3)
    assert not torch.allclose(first, second, atol=1e-3)
    # jitter scales each input coordinate by U(1 - eps, 1 + eps), so logits stay within that envelope
    bound = 0.5 * (x.reshape(-1, 8).abs() @ router.weight.detach().abs().t())
    assert torch.all((first - clean).abs() <= bound + 1e-5)


def test_no_jitter_is_deterministic_in_training():
    router = _router_with_weight(MoEConfig(num_experts=4), 8, seed=5).train()
    x = torch.randn(2, 10, 8)
    assert torch.equal(router(x).logits, router(x).logits)


def _reference_top_k(row: list[float], k: int) -> list[int]:
    """The k largest, by (score desc, index asc): the tie rule every runtime must follow."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


@pytest.mark.parametrize("n, k", [(2, 1), (8, 2), (8, 8), (37, 5), (64, 16)])
def test_top_k_breaks_ties_to_the_lower_index(n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, 3, (50, n), generator=g).float() / 3  # few distinct values: ties everywhere
    ordered, unordered = top_k(scores, k), top_k(scores, k, ordered=False)
    for row, got, got_set in zip(scores.tolist(), ordered.tolist(), unordered.tolist()):
        expected = _reference_top_k(row, k)
        assert got == expected
        assert sorted(got_set) == sorted(expected)


def test_token_choice_ties_go_to_the_lower_expert():
    probs = torch.full((5, 8), 1 / 8)
    probs[1, 6] = probs[1, 3] = 0.2  # a tie above the rest
    gates, ids = TokenChoiceRouter(8, 8, 2, None, normalize=False).select(probs)
    assert ids[0].tolist() == [0, 1] and ids[1].tolist() == [3, 6]
    assert gates[0].tolist() == [0.125, 0.125]


def test_switch_ties_go_to_the_lower_expert():
    dispatch = SwitchRouter(8, 4, capacity_factor=4.0).route(torch.full((6, 4), 0.25), torch.Size([1, 6]))
    assert dispatch.counts.tolist() == [6, 0, 0, 0]


def test_expert_choice_ties_go_to_the_earlier_token():
    probs = torch.full((8, 2), 0.5)
    probs[5] = torch.tensor([0.9, 0.1])
    dispatch = ExpertChoiceRouter(8, 2, 1, capacity_factor=1.0).route(probs, torch.Size([1, 8]))  # C = 4
    tokens = dispatch.token.view(2, 4).tolist()
    assert tokens[0] == [5, 0, 1, 2] and tokens[1] == [0, 1, 2, 3]  # above the C-th score first, then ties by position
