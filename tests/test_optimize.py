"""optimize: per-site settings chosen for a budget (moe_compile.optimize, moe-compile optimize)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import moe_compile as mc
from moe_compile.cli import main
from moe_compile.example_text import calibration_batches
from moe_compile.optimize import _plan, optimize

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


def brute_force(increases, shares, weights, budget=None, quality=None):
    """(least loss increase, cost) over every plan, by enumeration; choice -1 is dense."""
    plans = []
    for choice in itertools.product(range(-1, shares.shape[1]), repeat=len(weights)):
        cost = sum(w * (1.0 if j < 0 else shares[s, j]) for s, (j, w) in enumerate(zip(choice, weights)))
        loss = sum(0.0 if j < 0 else increases[s, j] for s, j in enumerate(choice))
        plans.append((cost / weights.sum(), loss))
    if budget is not None:
        return min((loss, cost) for cost, loss in plans if cost <= budget + 1e-12)
    return min((cost, loss) for cost, loss in plans if loss <= math.log(quality))[::-1]


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_is_the_best_of_every_plan(seed):
    generator = np.random.default_rng(seed)
    increases = generator.normal(0.05, 0.05, (4, 3))  # a few negative: a conversion may help on held-out text
    shares = np.array([[1 / 8, 1 / 4, 1 / 2]] * 4)
    weights = generator.choice([1.0, 2.0, 3.0], 4) * (2 * 3 * 64 * 256)  # dense FLOPs per token of gated FFNs
    for budget, quality in ((0.3, None), (0.5, None), (0.75, None), (None, math.exp(0.1)), (None, math.exp(0.2))):
        choices, _ = _plan(increases, shares, weights, budget, quality)
        spent = sum(w * (1.0 if j < 0 else shares[s, j]) for s, (j, w) in enumerate(zip(choices, weights)))
        loss = sum(0.0 if j < 0 else increases[s, j] for s, j in enumerate(choices))
        expected_loss, expected_cost = brute_force(increases, shares, weights, budget, quality)
        assert loss == pytest.approx(expected_loss)
        if budget is not None:
            assert spent / weights.sum() <= budget + 1e-12
        else:
            assert spent / weights.sum() == pytest.approx(expected_cost)


def test_optimize_meets_its_budget_with_an_ordinary_converted_model(optimized, nanogpt, text, tmp_path):
    model, report = optimized
    assert mc.model_stats(model).active_fraction == pytest.approx(report.active)
    assert report.active <= 0.5
    assert [p.site for p in report.plan] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert {p.choice for p in report.plan} <= {"dense", "1/4", "2/4"}
    assert report.reference_perplexity == pytest.approx(report.dense_perplexity, rel=1e-5)  # split k = E is dense
    assert [u["choice"] for u in report.uniform] == ["1/4", "2/4"]
    ratios = [p for _, p in report.frontier]
    assert ratios == sorted(ratios, reverse=True)  # more active FFN, less loss
    assert "plan (measured)" in report.table()
    ids = text[None, :20]
    mc.save(model, tmp_path)
    assert torch.equal(logits_of(mc.load(tmp_path), ids), logits_of(model, ids))
    chosen = {p.site: p.choice for p in report.plan}
    layers = dict(mc.moe.iter_moe_layers(model))
    for site in model.moe_report.converted:
        assert f"{layers[site.layer].router.top_k}/4" == chosen[site.name]
        assert site.calibration  # the candidate's fit figures came with its layer


def test_the_report_plots_and_serialises(optimized, tmp_path):
    pytest.importorskip("matplotlib")
    _, report = optimized
    assert report.plot(tmp_path / "frontier.png").stat().st_size > 1000
    assert set(report.to_dict()) >= {"plan", "frontier", "uniform", "perplexity", "predicted_perplexity"}


@pytest.mark.parametrize("settings, error, message", [
    ({"budget": 0.5, "quality": 1.5}, ValueError, "exactly one of"),
    ({}, ValueError, "exactly one of"),
    ({"budget": 1.5}, ValueError, "not an active FFN share"),
    ({"quality": 0.5}, ValueError, "not a perplexity ratio"),
    ({"budget": 0.5, "candidates": [mc.MoEConfig()]}, ValueError, "experts='split'"),
    ({"budget": 0.1, "candidates": CANDIDATES[1:]}, mc.MoECompileError, "no plan meets budget=0.1"),
])
def test_bad_budgets_and_candidates_name_the_problem(nanogpt, text, settings, error, message):
    batches = calibration_batches(length=16, count=4, batch_size=4, data=text[:2000])
    with pytest.raises(error, match=message):
        optimize(nanogpt, batches, text[2000:], length=16, windows=2, progress=False, **settings)


def test_a_quality_no_candidate_meets_is_refused():
    increases = np.full((3, 2), 0.01)  # every conversion costs loss: within quality 1.0 every site stays dense
    with pytest.raises(mc.MoECompileError, match="every layer stays dense"):
        _plan(increases, np.array([[0.25, 0.5]] * 3), np.ones(3), None, 1.0)


def test_the_cli_saves_the_plan(tmp_path, capsys):
    code = main(["optimize", "--example", "nanogpt", "--budget", "0.5", "--num-experts", "4", "--top-k", "1", "2",
                 "--distill-steps", "2", "--calibration-windows", "4", "--windows", "2", "--length", "16",
                 "--out", str(tmp_path / "plan"), "--json", str(tmp_path / "plan.json")])
    assert code == 0
    assert "plan (measured)" in capsys.readouterr().out
    assert mc.model_stats(mc.load(tmp_path / "plan")).active_fraction <= 0.5
    assert (tmp_path / "plan.json").is_file()
