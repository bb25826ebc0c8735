"""optimize: choose per FFN site whether it stays dense and which split (E, k) it gets, for a budget.

Each site s stays dense (active share a = 1) or takes one candidate c (split experts, a_s(c) = k/E with shared
neurons counted); w_s is the site's dense FFN FLOPs per token, L the mean next-token cross-entropy on held-out
windows.

    1. candidates   convert the model once per candidate, calibrated, every site; keep only its MoE layers
    2. reference    convert it once more with split k = E experts and no calibration: the sum of every expert is
                    the dense FFN, so this model is the dense one, with an MoE layer wherever a candidate has one
    3. sensitivity  d_s(c) = L(reference with site s's layer taken from candidate c) - L(reference)
    4. plan         min sum_s d_s(c_s)  subject to  sum_s w_s a_s(c_s) <= budget * sum_s w_s, solved exactly by
                    dynamic programming over the cost in FLOPs (divided by their greatest common divisor; rounded
                    to MAX_UNITS of the total where that leaves more); or, for a quality budget, the least cost
                    whose predicted perplexity exp(L(reference) + sum_s d_s) is within `quality` x the reference
    5. build        convert with the plan as layer_configs and copy each site's fitted layer from its candidate,
                    then measure it: a plan predicted from single-site swaps meets the interactions of them all

The result is an ordinary converted model (save, load, export); OptimizeReport holds the plan, predicted against
measured, the uniform conversions measured in the same run, and the frontier searched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import MoEConfig
from .errors import MoECompileError
from .example_text import score
from .model_io import Inputs
from .passes import convert
from .stats import model_stats, site_stats
from .table import format_table

DEFAULT_TOP_K = (1, 2, 4, 6)  # of 8 experts: 12.5%, 25%, 50%, 75% active
MAX_UNITS = 100_000  # cost units of the whole FFN in the dynamic programme, at most


@dataclass
class SitePlan:
    site: str
    choice: str  # "dense" or "k/E"
    active: float  # share of the site's FFN each token runs
    predicted_increase: float  # d_s of the choice, in nats of held-out loss (0 for dense)
    increases: dict[str, float] = field(default_factory=dict)  # d_s of every candidate


@dataclass
class OptimizeReport:
    budget: Optional[float]  # active FFN share asked for, or None for a quality budget
    quality: Optional[float]  # perplexity ratio asked for, or None
    dense_perplexity: float
    reference_perplexity: float  # split k = E, which should equal dense
    plan: list[SitePlan]
    predicted_perplexity: float
    perplexity: float  # the built plan, measured
    active: float  # the built plan's active FFN share (model_stats)
    uniform: list[dict[str, Any]]  # every candidate on every site: choice, active, perplexity (measured)
    frontier: list[tuple[float, float]]  # (active share, predicted perplexity) of the best plan at each cost
    seconds: float

    def table(self) -> str:
        ratio = self.dense_perplexity
        rows = [("site", "plan", "active FFN", "predicted loss increase", "candidates' loss increase")]
        rows += [(p.site, p.choice, f"{p.active:.1%}", f"{p.predicted_increase:+.4f}",
                  "  ".join(f"{c} {d:+.4f}" for c, d in p.increases.items())) for p in self.plan]
        summary = [("model", "active FFN", "perplexity", "vs dense")]
        summary.append(("dense", "100.0%", f"{self.dense_perplexity:.3f}", "1.000x"))
        summary += [(f"uniform {u['choice']}", f"{u['active']:.1%}", f"{u['perplexity']:.3f}",
                     f"{u['perplexity'] / ratio:.3f}x") for u in self.uniform]
        summary.append(("plan (predicted)", f"{self.active:.1%}", f"{self.predicted_perplexity:.3f}",
                        f"{self.predicted_perplexity / ratio:.3f}x"))
        summary.append(("plan (measured)", f"{self.active:.1%}", f"{self.perplexity:.3f}",
                        f"{self.perplexity / ratio:.3f}x"))
        return f"{format_table(rows)}\n\n{format_table(summary)}"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "quality": self.quality, "dense_perplexity": self.dense_perplexity,
                "reference_perplexity": self.reference_perplexity,
                "plan": [vars(p) for p in self.plan], "predicted_perplexity": self.predicted_perplexity,
                "perplexity": self.perplexity, "active": self.active, "uniform": self.uniform,
                "frontier": self.frontier, "seconds": self.seconds}

    def plot(self, path: str | Path) -> Path:
        """The frontier searched (predicted), the uniform conversions and the plan (measured), as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        active, predicted = zip(*self.frontier)
        axes.plot([100 * a for a in active], [p / self.dense_perplexity for p in predicted], color="0.5",
                  label="best plan per cost (predicted)")
        axes.plot([100 * u["active"] for u in self.uniform],
                  [u["perplexity"] / self.dense_perplexity for u in self.uniform], "s", label="uniform (measured)")
        axes.plot([100 * self.active], [self.perplexity / self.dense_perplexity], "*", markersize=12,
                  label="plan (measured)")
        axes.set_xlabel("active FFN (%)")
        axes.set_ylabel("perplexity / dense")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return Path(path)


def optimize(model: nn.Module, calibration_data: Iterable[Any], held_out: torch.Tensor, *,
             budget: Optional[float] = None, quality: Optional[float] = None,
             candidates: Optional[Sequence[MoEConfig]] = None, length: int = 128, windows: int = 16,
             bos: Optional[int] = None, example_inputs: Optional[Inputs] = None,
             progress: bool = True) -> tuple[nn.Module, OptimizeReport]:
    """The converted model whose per-site settings meet `budget` (mean active FFN share, FLOP-weighted, 0 to 1)
    at the least predicted loss, or `quality` (perplexity at most this multiple of dense) at the least cost; and
    the report. Give exactly one of the two.

    calibration_data: batches, as for convert. held_out: token ids [n], scored in `windows` windows of `length`
    (each led by `bos` when given), apart from the calibration text. candidates: split MoEConfigs a site may take
    (default k of 8 experts for k in 1, 2, 4, 6, calibrated defaults); a site may always stay dense.
    """
    start = time.perf_counter()
    candidates = _checked(budget, quality, candidates)
    batches = list(calibration_data)
    evaluate = _Scorer(held_out, length, windows, bos)
    converted = []
    for config in tqdm(candidates, desc="converting candidates", unit="candidate", disable=not progress):
        converted.append(_Candidate.of(convert(model, config, calibration_data=batches,
                                               example_inputs=example_inputs, progress=False)))
    reference_config = MoEConfig(experts="split", num_experts=candidates[0].num_experts,
                                 top_k=candidates[0].num_experts, split_strategy="contiguous")
    reference = convert(model, reference_config, example_inputs=example_inputs, progress=False).eval()
    sites = reference.moe_report.converted
    layers = {site.name: site.layer for site in sites}
    dense_loss, reference_loss = evaluate(model), evaluate(reference)

    increases = np.zeros((len(sites), len(converted)))
    uniform = []
    steps = tqdm(total=len(sites) * len(converted) + len(converted), desc="measuring sensitivity", unit="eval",
                 disable=not progress)
    for j, candidate in enumerate(converted):
        for i, site in enumerate(sites):
            with _swapped(reference, {layers[site.name]: candidate.layers[site.name]}):
                increases[i, j] = evaluate(reference) - reference_loss
            steps.update()
        with _swapped(reference, {layers[s.name]: candidate.layers[s.name] for s in sites}):
            uniform.append({"choice": candidate.label, "active": candidate.active,
                            "perplexity": math.exp(evaluate(reference))})
        steps.update()
    steps.close()

    weights = np.array([site_stats(site, None).dense_flops for site in sites], dtype=float)
    shares = np.array([[site_stats(site, c.config).active_fraction for c in converted] for site in sites])
    choices, best = _plan(increases, shares, weights, budget, quality)
    choice_of = {site.name: j for site, j in zip(sites, choices)}
    plan_configs = {name: None if j < 0 else converted[j].config for name, j in choice_of.items()}
    base = converted[max(set(choices) - {-1}, key=choices.count)].config  # the report's config: the most chosen
    built = convert(model, base, layer_configs=plan_configs, example_inputs=example_inputs, weights_follow=True,
                    progress=False).eval()
    for site in built.moe_report.converted:
        source = converted[choice_of[site.name]]
        built.get_submodule(site.layer).load_state_dict(source.layers[site.name].state_dict())
        site.calibration = dict(source.calibration[site.name])

    labels = [c.label for c in converted]
    plan = [SitePlan(site.name, "dense" if j < 0 else labels[j], 1.0 if j < 0 else float(shares[i, j]),
                     0.0 if j < 0 else float(increases[i, j]), dict(zip(labels, map(float, increases[i]))))
            for i, (site, j) in enumerate(zip(sites, choices))]
    report = OptimizeReport(
        budget=budget, quality=quality, dense_perplexity=math.exp(dense_loss),
        reference_perplexity=math.exp(reference_loss), plan=plan,
        predicted_perplexity=math.exp(reference_loss + sum(p.predicted_increase for p in plan)),
        perplexity=math.exp(evaluate(built)), active=model_stats(built).active_fraction, uniform=uniform,
        frontier=_frontier(best, reference_loss),
        seconds=time.perf_counter() - start)
    return built, report


@dataclass
class _Candidate:
    """One candidate conversion, reduced to its MoE layers by site."""

    config: MoEConfig  # resolved (calibrated defaults filled in)
    layers: dict[str, nn.Module]
    calibration: dict[str, dict[str, float]]
    active: float

    @classmethod
    def of(cls, moe: nn.Module) -> "_Candidate":
        report = moe.moe_report
        return cls(report.config, {s.name: moe.get_submodule(s.layer) for s in report.converted},
                   {s.name: s.calibration for s in report.converted}, model_stats(moe).active_fraction)

    @property
    def label(self) -> str:
        return f"{self.config.top_k}/{self.config.num_experts}"


class _Scorer:
    """Mean next-token cross-entropy of a model on the held-out windows."""

    def __init__(self, data: torch.Tensor, length: int, windows: int, bos: Optional[int]):
        self.data, self.length, self.windows, self.bos = data, length, windows, bos

    def __call__(self, model: nn.Module) -> float:
        return math.log(score(model, self.data, self.length, max_windows=self.windows, bos=self.bos)[0])


class _swapped:
    """Within the block, the given submodules (qualified name -> module) stand in for the model's own."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]):
        self.model, self.modules = model, modules

    def __enter__(self) -> None:
        self.saved = {name: self.model.get_submodule(name) for name in self.modules}
        for name, module in self.modules.items():
            self.model.set_submodule(name, module)

    def __exit__(self, *exc) -> None:
        for name, module in self.saved.items():
            self.model.set_submodule(name, module)


def _checked(budget: Optional[float], quality: Optional[float],
             candidates: Optional[Sequence[MoEConfig]]) -> list[MoEConfig]:
    if (budget is None) == (quality is None):
        raise ValueError("optimize: give exactly one of budget= (the active FFN share, e.g. 0.5) and quality= (the "
                         "perplexity allowed as a multiple of dense, e.g. 1.5).")
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"optimize: budget={budget!r} is not an active FFN share; use a number in (0, 1], "
                         "e.g. 0.5 for half the FFN FLOPs.")
    if quality is not None and not quality >= 1:
        raise ValueError(f"optimize: quality={quality!r} is not a perplexity ratio to dense; use a number >= 1, "
                         "e.g. 1.5.")
    candidates = list(candidates) if candidates is not None else [
        MoEConfig(experts="split", num_experts=8, top_k=k) for k in DEFAULT_TOP_K]
    if not candidates:
        raise ValueError("optimize: candidates is empty; give split MoEConfigs, e.g. "
                         "[MoEConfig(experts='split', num_experts=8, top_k=k) for k in (2, 4)].")
    for config in candidates:
        if not isinstance(config, MoEConfig) or config.experts != "split":
            raise ValueError(f"optimize: every candidate must be a MoEConfig with experts='split' (a share of the "
                             f"FFN per token), got {config!r}.")
    return candidates


def _plan(increases: np.ndarray, shares: np.ndarray, weights: np.ndarray, budget: Optional[float],
          quality: Optional[float]) -> tuple[list[int], np.ndarray]:
    """Each site's choice in the plan (-1 dense, else a candidate's column), and the best loss at every cost."""
    best, choose, cost = _plans(increases, shares, weights)
    choices = _backtrack(choose, cost, _chosen_cost(best, budget, quality))
    if all(j < 0 for j in choices):
        raise MoECompileError(f"optimize: within quality={quality} every layer stays dense (each candidate alone "
                              "costs more). Allow more, e.g. quality=1.5, or give candidates with more experts active.")
    return choices, best


def _plans(increases: np.ndarray, shares: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic programme over sites: best[u], the least sum of increases of a plan costing exactly u units (inf if
    none does; u = len(best) - 1 is the whole FFN); choose[s, u], site s's choice in it (-1 dense, else a
    candidate's column); cost[s, j], the units of site s with choice j (column 0 dense, then the candidates)."""
    cost = _units(np.concatenate([np.ones((len(weights), 1)), shares], axis=1), weights)
    gain = np.concatenate([np.zeros((len(weights), 1)), increases], axis=1)
    size = int(cost[:, 0].sum()) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    choose = np.full((len(weights), size), -1, dtype=np.int8)
    for s in range(len(weights)):
        new = np.full(size, np.inf)
        for j in range(cost.shape[1]):
            shifted = np.full(size, np.inf)
            shifted[cost[s, j]:] = best[:size - cost[s, j]] + gain[s, j]
            better = shifted < new
            new[better], choose[s, better] = shifted[better], j - 1
        best = new
    return best, choose, cost


def _chosen_cost(best: np.ndarray, budget: Optional[float], quality: Optional[float]) -> int:
    """The cost (units) of the plan: the best within the budget, or the cheapest within the quality."""
    whole = len(best) - 1
    if budget is not None:
        within = best[:int(budget * whole + 1e-9) + 1]
        if not np.isfinite(within).any():
            cheapest = int(np.argmax(np.isfinite(best)))
            raise MoECompileError(f"optimize: no plan meets budget={budget}: the cheapest, every site on its "
                                  f"cheapest candidate, runs {cheapest / whole:.1%} of the FFN. Raise the budget or "
                                  "add a candidate with fewer active experts.")
        return int(np.argmin(within))
    return int(np.argmax(best <= math.log(quality)))  # the all-dense plan (increase 0) always qualifies


def _backtrack(choose: np.ndarray, cost: np.ndarray, units: int) -> list[int]:
    choices = []
    for s in reversed(range(len(choose))):
        j = int(choose[s, units])
        choices.append(j)
        units -= cost[s, j + 1]
    return choices[::-1]


def _frontier(best: np.ndarray, reference_loss: float) -> list[tuple[float, float]]:
    """(active share, predicted perplexity) where the best plan within a cost improves."""
    points, lowest = [], math.inf
    for u in np.flatnonzero(np.isfinite(best)):
        if best[u] < lowest:
            lowest = float(best[u])
            points.append((u / (len(best) - 1), math.exp(reference_loss + lowest)))
    return points


def _units(shares: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each share of a site's FFN as integer cost units: FLOPs over their greatest common divisor, or rounded to
    MAX_UNITS of the whole FFN when the divisor leaves more."""
    flops = np.maximum(np.rint(shares * weights[:, None]).astype(np.int64), 1)
    exact = flops // np.gcd.reduce(flops.ravel())
    if exact[:, 0].sum() <= MAX_UNITS:
        return exact
    return np.maximum(np.rint(flops / flops[:, 0].sum() * MAX_UNITS).astype(np.int64), 1)
