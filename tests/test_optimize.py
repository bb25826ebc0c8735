"""optimize: per-site settings chosen for a budget (moe_compile.optimize, moe-compile optimize)."""

from __future__ import annotations

import importlib
import itertools
import math

import json

import numpy as np
import pytest
import torch

import moe_compile as mc
from moe_compile.cli import main
from moe_compile.example_text import calibration_batches, score
from moe_compile.optimize import _anchor, _coarse_kl, _cross_fitted, _Dense, _plan, _Scorer, optimize

from .conftest import VOCAB, logits_of

CANDIDATES = [mc.MoEConfig(experts="split", num_experts=4, top_k=k, distill_steps=5) for k in (1, 2)]


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def optimized(nanogpt, text):
    batches = calibration_batches(length=16, count=8, batch_size=4, data=text[:2000])
    return optimize(nanogpt, batches, text[2000:], budget=0.5, candidates=CANDIDATES, length=16, windows=8,
                    progress=False)


def brute_force(changes, costs, budget=None, allowance=None):
    """(least loss change, cost share) over every plan, by enumeration; column 0 of both is dense."""
    plans = []
    for choice in itertools.product(range(costs.shape[1]), repeat=len(costs)):
        cost = sum(costs[s, j] for s, j in enumerate(choice)) / costs[:, 0].sum()
        plans.append((cost, sum(changes[s, j] for s, j in enumerate(choice))))
    if budget is not None:
        return min((loss, cost) for cost, loss in plans if cost <= budget + 1e-12)
    return min((cost, loss) for cost, loss in plans if loss <= allowance)[::-1]


def flop_costs(generator):
    """Dense FLOPs per token of gated FFNs of a few widths, then 1/8, 1/4 and 1/2 of them: whole numbers."""
    weights = generator.choice([1.0, 2.0, 3.0], 4) * (2 * 3 * 64 * 256)
    return weights[:, None] * np.array([1, 1 / 8, 1 / 4, 1 / 2])


def latency_costs(generator):
    """Seconds: noisy, not proportional to k, the widest candidate at times slower than dense."""
    dense = generator.uniform(1e-3, 3e-3, (4, 1))
    return dense * np.concatenate([np.ones((4, 1)), generator.uniform([0.15, 0.4, 0.7], [0.3, 0.8, 1.2], (4, 3))], 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("costs_of", [flop_costs, latency_costs])
def test_the_plan_is_the_best_of_every_plan(seed, costs_of):
    generator = np.random.default_rng(seed)
    changes = generator.normal(0.05, 0.05, (4, 4))  # around an anchor: some choices help, some hurt
    changes[np.arange(4), generator.integers(0, 4, 4)] = 0.0  # the anchor's own choice at each site
    costs = costs_of(generator)
    exact = costs_of is flop_costs  # latency costs are rounded to MAX_UNITS of the dense total
    for budget, allowance in ((0.4, None), (0.5, None), (0.75, None), (None, 0.1), (None, 0.2)):
        choices, frontier = _plan(changes, costs, budget, allowance)
        spent = sum(costs[s, j + 1] for s, j in enumerate(choices)) / costs[:, 0].sum()
        loss = sum(changes[s, j + 1] for s, j in enumerate(choices))
        expected_loss, expected_cost = brute_force(changes, costs, budget, allowance)
        if budget is not None:
            assert loss == pytest.approx(expected_loss, abs=0 if exact else 0.02)
            assert spent <= budget + (1e-12 if exact else 1e-4)
        else:
            assert loss <= allowance + 1e-12
            assert spent == pytest.approx(expected_cost, abs=1e-12 if exact else 1e-4)
        assert [c for c, _ in frontier] == sorted(c for c, _ in frontier)


@pytest.mark.parametrize("budget, quality, anchor", [
    (0.5, None, 1),  # 1/4 and 2/4 fit 50%: the one of less loss
    (0.3, None, 0),  # only 1/4 fits
    (0.1, None, -1),  # none fits: all dense
    (None, math.exp(0.3), 1),  # 2/4 is the only one within quality
    (None, math.exp(0.6), 0),  # both are: the cheaper
    (None, math.exp(0.1), -1),  # none is
])
def test_the_anchor_is_the_best_uniform_plan_within_the_budget(budget, quality, anchor):
    units = np.array([[8, 2, 4], [8, 2, 4]])  # dense, 1/4, 2/4 at two sites
    assert _anchor(units, [0.5, 0.2], 0.0, budget, quality) == anchor


def test_optimize_meets_its_budget_with_an_ordinary_converted_model(optimized, nanogpt, text, tmp_path):
    model, report = optimized
    assert mc.model_stats(model).active_fraction == pytest.approx(report.active)
    assert report.active <= 0.5
    assert [p.site for p in report.plan] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert {p.choice for p in report.plan} <= {"dense", "1/4", "2/4"}
    assert report.reference_perplexity == pytest.approx(report.dense_perplexity, rel=1e-5)  # split k = E is dense
    assert [u["choice"] for u in report.uniform] == ["1/4", "2/4"]
    fits = [u for u in report.uniform if u["cost"] <= 0.5]  # both: the anchor is the better of them
    assert report.anchor == "uniform " + min(fits, key=lambda u: u["perplexity"])["choice"]
    anchor_choice = report.anchor.split()[1]
    assert all(p.changes[anchor_choice] == 0 and list(p.changes) == ["dense", "1/4", "2/4"] for p in report.plan)
    assert all(p.errors[anchor_choice] == 0 and list(p.errors) == list(p.changes) and min(p.errors.values()) >= 0
               for p in report.plan)
    assert any(error > 0 for p in report.plan for error in p.errors.values())  # the windows differ
    if report.anchor_kept:  # plans chosen on half the windows did not beat the anchor on the other half
        assert report.cross_fitted_change >= 0 and all(p.choice == anchor_choice for p in report.plan)
    assert report.divergence >= 0
    ratios = [p for _, p in report.frontier]
    assert ratios == sorted(ratios, reverse=True)  # more active FFN, less loss
    assert "plan (measured)" in report.table()
    ids = text[None, :20]
    mc.save(model, tmp_path)
    assert torch.equal(logits_of(mc.load(tmp_path), ids), logits_of(model, ids))
    chosen = {p.site: p.choice for p in report.plan}
    layers = dict(mc.moe.iter_moe_layers(model))
    for site in model.moe_report.converted:
        layer = layers[site.layer]
        shared = 0 if layer.shared is None else layer.shared.width // layer.expert_width  # groups always on
        assert f"{layer.router.top_k + shared}/4" == chosen[site.name]
        assert site.calibration  # the candidate's fit figures came with its layer


def test_the_divergence_is_the_kl_over_the_top_tokens_and_the_rest_as_one():
    generator = torch.Generator().manual_seed(5)
    log_p, log_q = (torch.randn(3, 50, generator=generator).log_softmax(-1) for _ in range(2))
    whole = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(_coarse_kl(log_p, log_q), whole)  # every token: exact
    top, tokens = log_p.topk(10, -1)
    coarse = _coarse_kl(top, log_q.gather(-1, tokens))
    p_rest, q_rest = 1 - top.exp().sum(-1), 1 - log_q.gather(-1, tokens).exp().sum(-1)
    expected = (top.exp() * (top - log_q.gather(-1, tokens))).sum(-1) + p_rest * (p_rest / q_rest).log()
    torch.testing.assert_close(coarse, expected)
    assert (coarse <= whole + 1e-6).all() and (coarse >= 0).all()  # the KL of the coarser distributions
    assert _coarse_kl(top, top).abs().max() < 1e-6


def test_the_scorer_measures_cross_entropy_and_divergence_from_dense(nanogpt, text):
    scorer = _Scorer(nanogpt, text, length=16, windows=4, bos=None)
    dense = scorer(nanogpt)
    assert dense.divergence == pytest.approx(0, abs=1e-6) and dense.windows.shape == (4,)
    assert math.exp(dense.loss) == pytest.approx(score(nanogpt, text, 16, max_windows=4, spread=True)[0], rel=1e-5)
    moe = mc.convert(nanogpt, mc.MoEConfig(experts="split", num_experts=4, top_k=1), progress=False).eval()
    with torch.no_grad():  # a vocabulary of VOCAB < TOP_TOKENS: the divergence is the whole KL
        log_p, log_q = (m(scorer.inputs).log_softmax(-1) for m in (nanogpt, moe))
    whole = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    measured = scorer(moe)
    assert measured.divergence == pytest.approx(whole, abs=1e-6) and whole > 0
    assert measured.windows.mean() == pytest.approx(measured.divergence)


def test_the_report_plots_and_serialises(optimized, tmp_path):
    pytest.importorskip("matplotlib")
    _, report = optimized
    assert report.plot(tmp_path / "frontier.png").stat().st_size > 1000
    assert set(report.to_dict()) >= {"plan", "frontier", "uniform", "perplexity", "predicted_perplexity"}


@pytest.mark.parametrize("name", ["nanogpt", "hf-llama"])
def test_the_dense_ffn_timed_is_the_reference_layers_neurons_side_by_side(dense_models, name):
    dense = dense_models[name]
    config = mc.MoEConfig(experts="split", num_experts=4, top_k=4, split_strategy="contiguous")
    reference = mc.convert(dense, config, progress=False)
    site = reference.moe_report.converted[0]
    x = torch.randn(2, 5, site.d_model, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_Dense(reference.get_submodule(site.layer))(x), dense.get_submodule(site.name)(x))


def wide_gpt2() -> torch.nn.Module:
    """FFNs wide enough (256 -> 4096) that their GEMMs, not the dispatch, take the time."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=256, n_inner=4096, n_head=4, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_latency_budget_is_met_in_onnx_runtime_time(text):
    dense = wide_gpt2()
    batches = calibration_batches(length=16, count=4, batch_size=4, data=text[:2000])
    candidates = [mc.MoEConfig(experts="split", num_experts=4, top_k=k, distill_steps=2) for k in (1, 2)]
    model, report = optimize(dense, batches, text[2000:], budget="2/4", candidates=candidates, length=16, windows=2,
                             cost="latency", latency_tokens=256, progress=False)
    uniform = {u["choice"]: u["cost"] for u in report.uniform}
    assert report.cost == "latency" and report.budget_of == "2/4"
    assert report.budget == uniform["2/4"]  # the same integer cost units
    assert report.predicted_cost <= report.budget + 1e-4  # at most the latency of split 2/4 on every layer
    (shape, ms), = report.latency_ms.items()  # both sites have one shape: timed once per choice
    assert shape == "d 256, d_ff 4096, gelu_tanh, bias" and {"dense", "1/4, 0 shared"} < set(ms)
    assert all(t > 0 for t in ms.values())
    for plan in report.plan:  # a choice is timed with the shared group count it has at that site
        shared = None if plan.choice == "dense" else model.moe_report.config_of(plan.site).shared_experts
        timed = ms["dense"] if shared is None else ms[f"{plan.choice}, {shared} shared"]
        assert plan.cost == pytest.approx(timed / ms["dense"])
    assert mc.model_stats(model).active_fraction == pytest.approx(report.active)
    assert "FFN latency" in report.table() and "layer shape" in report.table()


@pytest.mark.parametrize("settings, error, message", [
    ({"budget": 0.5, "quality": 1.5}, ValueError, "exactly one of"),
    ({}, ValueError, "exactly one of"),
    ({"budget": 1.5}, ValueError, "not an active FFN share"),
    ({"quality": 0.5}, ValueError, "not a perplexity ratio"),
    ({"budget": 0.5, "candidates": [mc.MoEConfig()]}, ValueError, "experts='split'"),
    ({"budget": 0.1, "candidates": CANDIDATES[1:]}, mc.MoECompileError, "no plan meets budget=0.1"),
    ({"budget": 0.5, "cost": "time"}, ValueError, "cost='time' is unknown"),
    ({"budget": "3/8"}, ValueError, "budget='3/8' names no candidate"),
    ({"budget": 0.5, "cost": "latency", "target": "tensorrt"}, ValueError, "not 'tensorrt'"),
    ({"budget": 0.5, "windows": 1}, ValueError, "give windows >= 2"),
])
def test_bad_budgets_and_candidates_name_the_problem(nanogpt, text, settings, error, message):
    batches = calibration_batches(length=16, count=4, batch_size=4, data=text[:2000])
    with pytest.raises(error, match=message):
        optimize(nanogpt, batches, text[2000:], **{"length": 16, "windows": 2, "progress": False, **settings})


@pytest.mark.parametrize("dense_change, expected", [
    ([-0.1] * 4, -0.08),  # site 0 dense gains in every window: the trade holds on either half
    ([-0.3, 0.2] * 2, 0.11),  # it gains only in the even windows: chosen there, it loses on the odd ones
])
def test_a_plan_is_cross_fitted_on_the_half_of_the_windows_it_was_not_chosen_on(dense_change, expected):
    costs = np.array([[3.0, 1.0, 2.0]] * 2)  # dense, a cheaper and the anchor's choice at two sites
    window_changes = np.zeros((2, 3, 4))  # [site, choice, window]
    window_changes[0, 0] = dense_change  # site 0 dense,
    window_changes[1, 1] = 0.02  # paid for by site 1 on the cheaper choice, at the anchor's cost (4 of 6)
    window_changes[[0, 1], [1, 0]] = 1.0  # the other trade is bad everywhere
    assert _plan(window_changes.mean(-1), costs, 4 / 6, None)[0] == [-1, 0]  # all windows: the trade looks good
    assert _cross_fitted(window_changes, costs, 4 / 6, None) == pytest.approx(expected)


@pytest.mark.parametrize("cross_fitted, kept", [(1.0, True), (-1.0, False)])
def test_a_plan_that_does_not_hold_on_the_other_half_gives_way_to_the_anchor(nanogpt, text, monkeypatch,
                                                                              cross_fitted, kept):
    optimize_module = importlib.import_module("moe_compile.optimize")  # the package's `optimize` is the function
    def mixed(changes, costs, budget, allowance):  # site 0 on the first candidate, site 1 on the second: not uniform
        return [0, 1], _plan(changes, costs, budget, allowance)[1]

    monkeypatch.setattr(optimize_module, "_plan", mixed)
    monkeypatch.setattr(optimize_module, "_cross_fitted", lambda *args: cross_fitted)
    batches = calibration_batches(length=16, count=4, batch_size=4, data=text[:2000])
    model, report = optimize(nanogpt, batches, text[2000:], budget=0.5, candidates=CANDIDATES, length=16, windows=4,
                             progress=False)
    anchor_choice = report.anchor.split()[1]
    assert report.anchor_kept is kept and report.cross_fitted_change == cross_fitted
    expected = [anchor_choice] * 2 if kept else ["1/4", "2/4"]
    assert [p.choice for p in report.plan] == expected
    assert [f"{layer.router.top_k + (0 if layer.shared is None else layer.shared.width // layer.expert_width)}/4"
            for _, layer in mc.moe.iter_moe_layers(model)] == expected  # the model built is the plan reported


def test_candidates_of_different_expert_counts_mix_in_one_plan(nanogpt, text, monkeypatch, tmp_path):
    optimize_module = importlib.import_module("moe_compile.optimize")
    monkeypatch.setattr(optimize_module, "_plan", lambda changes, costs, budget, allowance:
                        ([0, 1], _plan(changes, costs, budget, allowance)[1]))  # site 0: 2 of 4, site 1: 4 of 8
    monkeypatch.setattr(optimize_module, "_cross_fitted", lambda *args: -1.0)
    candidates = [mc.MoEConfig(experts="split", num_experts=e, top_k=k, distill_steps=5) for e, k in ((4, 2), (8, 4))]
    batches = calibration_batches(length=16, count=4, batch_size=4, data=text[:2000])
    model, report = optimize(nanogpt, batches, text[2000:], budget=0.5, candidates=candidates, length=16, windows=4,
                             progress=False)
    assert [p.choice for p in report.plan] == ["2/4", "4/8"]
    assert [model.moe_report.config_of(p.site).num_experts for p in report.plan] == [4, 8]
    assert [layer.expert_width for _, layer in mc.moe.iter_moe_layers(model)] == [256 // 4, 256 // 8]
    ids = text[:16][None]
    reloaded = mc.load(mc.save(model, tmp_path / "plan"))
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids))


def test_a_quality_no_candidate_meets_is_refused():
    changes = np.array([[0.0, 0.01, 0.01]] * 3)  # around dense every conversion costs loss: none is allowed
    with pytest.raises(mc.MoECompileError, match="keeps every layer dense"):
        _plan(changes, np.array([[1.0, 0.25, 0.5]] * 3), None, 0.0)


@pytest.mark.parametrize("budget", ["0.5", "2/4"])
def test_the_cli_saves_the_plan(budget, tmp_path, capsys):
    code = main(["optimize", "--example", "nanogpt", "--budget", budget, "--num-experts", "4", "--top-k", "1", "2",
                 "--distill-steps", "2", "--calibration-windows", "4", "--windows", "2", "--length", "16",
                 "--out", str(tmp_path / "plan"), "--json", str(tmp_path / "plan.json")])
    assert code == 0
    assert "plan (measured)" in capsys.readouterr().out
    assert mc.model_stats(mc.load(tmp_path / "plan")).active_fraction <= 0.5 + 1e-9
    assert json.loads((tmp_path / "plan.json").read_text())["budget_of"] == (None if budget == "0.5" else budget)


def test_the_cli_takes_candidates_of_different_expert_counts(tmp_path, capsys):
    code = main(["optimize", "--example", "nanogpt", "--budget", "0.5", "--candidates", "1/4", "2/8",
                 "--distill-steps", "2", "--calibration-windows", "4", "--windows", "2", "--length", "16",
                 "--out", str(tmp_path / "plan"), "--json", str(tmp_path / "plan.json")])
    assert code == 0
    assert [u["choice"] for u in json.loads((tmp_path / "plan.json").read_text())["uniform"]] == ["1/4", "2/8"]
    assert main(["optimize", "--example", "nanogpt", "--budget", "0.5", "--candidates", "1/4", "--num-experts", "8",
                 "--out", str(tmp_path / "other")]) == 2
    assert "--candidates name each candidate's expert count (k/E); drop --num-experts" in capsys.readouterr().err
    assert main(["optimize", "--example", "nanogpt", "--budget", "0.5", "--candidates", "half", "--out", "plan"]) == 2
    assert "'half' is not a candidate: give k/E" in capsys.readouterr().err


def test_the_cli_refuses_a_budget_that_is_neither_a_share_nor_a_candidate(capsys):
    assert main(["optimize", "--example", "nanogpt", "--budget", "half", "--out", "plan"]) == 2
    assert "'half' is not a budget: give a share of the dense FFN cost (e.g. 0.5) or a candidate's k/E" in \
        capsys.readouterr().err
