"""optimize: choose per FFN site whether it stays dense and which split (E, k) it gets, for a budget.

Each site s stays dense or takes one candidate c (split experts). Its cost t_s(c) is, with cost="flops", its FFN
FLOPs per token (k/E of the dense w_s, shared neurons counted); with cost="latency", the seconds its layer takes
on `latency_tokens` tokens in ONNX Runtime (exported for `target`, `threads` threads), measured once per layer
shape and choice. On held-out windows, L is a model's mean next-token cross-entropy and D its mean divergence from
the dense model, KL(dense || model) over the dense model's TOP_TOKENS likeliest tokens per position (the rest as
one): D compares whole distributions at every position where L samples one token, so it tells layers apart with
far less noise.

    1. candidates   convert the model once per candidate, calibrated, every site; keep only its MoE layers
    2. reference    convert it once more with split k = E experts and no calibration: the sum of every expert is
                    the dense FFN, so this model is the dense one, with an MoE layer wherever a candidate has one
    3. uniform      each candidate on every site, measured; the anchor a is the best of them within the budget
                    (for a quality budget: the cheapest within it), or all dense if none is
    4. sensitivity  d_s(c) = D(a with site s's choice c) - D(a): each site's choices in the context of the others
                    as they will be, errors of earlier layers included (0 for a's own choice)
    5. plan         min sum_s d_s(c_s)  subject to  sum_s t_s(c_s) <= budget * sum_s t_s(dense), solved exactly
                    by dynamic programming over integer costs (FLOPs over their greatest common divisor; otherwise
                    rounded to MAX_UNITS of the dense total); or, for a quality budget, the least cost whose
                    predicted loss L(a) + sum_s d_s(c_s) (a change of D taken as the same change of L) is within
                    log(quality) of the reference's
    6. cross-fit    the plan chosen on the even windows, its predicted change on the odd ones, and the other way
                    round: where their mean is no gain over the anchor (for a quality budget: not within it), the
                    plan's gain is noise in its windows, and the anchor's plan is the plan
    7. build        convert with the plan as layer_configs and copy each site's fitted layer from its candidate,
                    then measure it: a plan predicted from single-site changes meets the interactions of them all

The result is an ordinary converted model (save, load, export); OptimizeReport holds the plan, predicted against
measured, the uniform conversions measured in the same run, and the frontier searched.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import MoEConfig
from .errors import MoECompileError
from .example_text import scored_windows, window_logits
from .export import export
from .model_io import Inputs
from .moe import MoELayer, activation_name
from .moe.ffn import DenseFFN
from .passes import SiteReport, convert
from .stats import model_stats, site_stats
from .table import format_table
from .timing import ort_session, time_round_robin

DEFAULT_TOP_K = (1, 2, 4, 6)  # of 8 experts: 12.5%, 25%, 50%, 75% active
TOP_TOKENS = 256  # the dense model's likeliest next tokens the divergence D is measured over, per position
MAX_UNITS = 100_000  # cost units of the whole FFN in the dynamic programme, at most
COSTS = ("flops", "latency")
LATENCY_TARGETS = ("portable", "ort")  # runnable in ONNX Runtime here; tensorrt's plugin nodes need TensorRT


@dataclass
class SitePlan:
    site: str
    choice: str  # "dense" or "k/E"
    active: float  # share of the site's FFN each token runs
    cost: float  # the choice's cost as a share of the site's dense cost (FLOPs: = active; or latency)
    predicted_change: float  # d_s of the choice: D's change from the anchor's choice at this site, in nats
    changes: dict[str, float] = field(default_factory=dict)  # d_s of every choice, dense first
    errors: dict[str, float] = field(default_factory=dict)  # standard error of each d_s over the windows


@dataclass
class OptimizeReport:
    cost: str  # "flops" or "latency": what the budget is a share of
    budget: Optional[float]  # share of the dense FFN cost asked for, or None for a quality budget
    budget_of: Optional[str]  # the candidate ("k/E") whose uniform cost, measured in this run, set the budget
    quality: Optional[float]  # perplexity ratio asked for, or None
    anchor: str  # "uniform k/E" or "dense": the plan the sensitivities were measured around
    cross_fitted_change: float  # plans chosen on half the windows, their predicted change on the other (nats)
    anchor_kept: bool  # the cross-fitted plans did not beat the anchor (or meet the quality): the plan is the anchor
    dense_perplexity: float
    reference_perplexity: float  # split k = E, which should equal dense
    plan: list[SitePlan]
    predicted_perplexity: float
    perplexity: float  # the built plan, measured
    divergence: float  # the built plan's D, measured (nats per token)
    active: float  # the built plan's active FFN share (model_stats)
    predicted_cost: float  # the plan's cost as a share of the dense FFN cost (= active with cost="flops")
    uniform: list[dict[str, Any]]  # each candidate on every site: choice, active, cost, perplexity, divergence
    frontier: list[tuple[float, float]]  # (cost share, predicted perplexity) of the best plan at each cost
    latency_ms: dict[str, dict[str, float]]  # cost="latency": layer shape -> choice ("dense", "k/E, s shared") -> ms
    seconds: float

    def table(self) -> str:
        ratio, latency = self.dense_perplexity, self.cost == "latency"
        rows = [("site", "plan", "active FFN", *(("FFN latency",) * latency), "change from anchor",
                 "every choice's change from anchor ± its error")]
        rows += [(p.site, p.choice, f"{p.active:.1%}", *((f"{p.cost:.1%}",) * latency), f"{p.predicted_change:+.4f}",
                  "  ".join(f"{c} {d:+.4f}±{p.errors[c]:.4f}" for c, d in p.changes.items())) for p in self.plan]
        summary = [("model", "active FFN", *(("FFN latency",) * latency), "divergence", "perplexity", "vs dense")]
        summary.append(("dense", "100.0%", *(("100.0%",) * latency), "0", f"{self.dense_perplexity:.3f}", "1.000x"))
        summary += [(f"uniform {u['choice']}", f"{u['active']:.1%}", *((f"{u['cost']:.1%}",) * latency),
                     f"{u['divergence']:.4f}", f"{u['perplexity']:.3f}", f"{u['perplexity'] / ratio:.3f}x")
                    for u in self.uniform]
        summary += [(f"plan ({label})", f"{self.active:.1%}", *((f"{self.predicted_cost:.1%}",) * latency),
                     divergence, f"{perplexity:.3f}", f"{perplexity / ratio:.3f}x")
                    for label, divergence, perplexity in (("predicted", "", self.predicted_perplexity),
                                                          ("measured", f"{self.divergence:.4f}", self.perplexity))]
        held = (f"plans chosen on half the windows, on the other half: {self.cross_fitted_change:+.4f} nats from the "
                "anchor" + (" (no gain: the plan is the anchor)" if self.anchor_kept else ""))
        tables = [f"sensitivities measured around: {self.anchor}\n{held}", format_table(rows), format_table(summary)]
        if latency:
            tables.append(format_table([("layer shape", "choice", "ms")] + [
                (shape, choice, f"{t:.3f}") for shape, ms in self.latency_ms.items() for choice, t in ms.items()]))
        return "\n\n".join(tables)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"cost": self.cost, "budget": self.budget, "budget_of": self.budget_of, "quality": self.quality,
                "anchor": self.anchor, "cross_fitted_change": self.cross_fitted_change,
                "anchor_kept": self.anchor_kept, "dense_perplexity": self.dense_perplexity,
                "reference_perplexity": self.reference_perplexity, "plan": [vars(p) for p in self.plan],
                "predicted_perplexity": self.predicted_perplexity, "perplexity": self.perplexity,
                "divergence": self.divergence, "active": self.active, "predicted_cost": self.predicted_cost,
                "uniform": self.uniform, "frontier": self.frontier, "latency_ms": self.latency_ms,
                "seconds": self.seconds}

    def plot(self, path: str | Path) -> Path:
        """The frontier searched (predicted), the uniform conversions and the plan (measured), as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        active, predicted = zip(*self.frontier)
        axes.plot([100 * a for a in active], [p / self.dense_perplexity for p in predicted], color="0.5",
                  label=f"best plan per cost (predicted around {self.anchor})")
        axes.plot([100 * u["cost"] for u in self.uniform],
                  [u["perplexity"] / self.dense_perplexity for u in self.uniform], "s", label="uniform (measured)")
        axes.plot([100 * self.predicted_cost], [self.perplexity / self.dense_perplexity], "*", markersize=12,
                  label="plan (measured)")
        axes.set_xlabel("FFN latency (% of dense)" if self.cost == "latency" else "active FFN (%)")
        axes.set_ylabel("perplexity / dense")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return Path(path)


def optimize(model: nn.Module, calibration_data: Iterable[Any], held_out: torch.Tensor, *,
             budget: Union[float, str, None] = None, quality: Optional[float] = None,
             candidates: Optional[Sequence[MoEConfig]] = None, length: int = 128, windows: int = 16,
             bos: Optional[int] = None, example_inputs: Optional[Inputs] = None, cost: str = "flops",
             target: str = "portable", threads: int = 1, latency_tokens: int = 512,
             progress: bool = True) -> tuple[nn.Module, OptimizeReport]:
    """The converted model whose per-site settings meet `budget` (share of the dense FFN cost, 0 to 1: FLOPs, or
    ONNX Runtime latency with cost="latency"; or a candidate's "k/E": the cost of that candidate on every site, as
    measured in this run) at the least predicted loss, or `quality` (perplexity at most this multiple of dense) at
    the least cost; and the report. Give exactly one of the two.

    calibration_data: batches, as for convert. held_out: token ids [n], scored in `windows` windows of `length`
    spread evenly over it (each led by `bos` when given), apart from the calibration text. candidates: split
    MoEConfigs a site may take (default k of 8 experts for k in 1, 2, 4, 6, calibrated defaults); a site may
    always stay dense.
    """
    start = time.perf_counter()
    candidates = _checked(budget, quality, candidates, cost, target, threads, latency_tokens)
    evaluate = _Scorer(model, held_out, length, windows, bos)
    if len(evaluate.targets) < 2:
        raise ValueError(f"optimize: one window of {length} tokens to measure on (windows={windows}, held_out of "
                         f"{len(held_out)} tokens); the plan is chosen on half the windows and checked on the other "
                         f"half: give windows >= 2 and at least {2 * length + 1} tokens of held_out.")
    batches = list(calibration_data)
    converted = []
    for config in tqdm(candidates, desc="converting candidates", unit="candidate", disable=not progress):
        converted.append(_Candidate.of(convert(model, config, calibration_data=batches,
                                               example_inputs=example_inputs, progress=False)))
    reference_config = MoEConfig(experts="split", num_experts=candidates[0].num_experts,
                                 top_k=candidates[0].num_experts, split_strategy="contiguous")
    reference = convert(model, reference_config, example_inputs=example_inputs, progress=False).eval()
    sites = reference.moe_report.converted
    dense_score, reference_score = evaluate(model), evaluate(reference)

    def measured(choices: Sequence[int]) -> _Score:  # the reference with site i's choice choices[i] (-1 dense)
        with _swapped(reference, {site.layer: converted[j].layers[site.name]
                                  for site, j in zip(sites, choices) if j >= 0}):
            return evaluate(reference)

    shares = np.array([[site_stats(site, c.configs[site.name]).active_fraction for c in converted] for site in sites])
    if cost == "flops":
        dense_flops = np.array([[site_stats(site, None).dense_flops] for site in sites], dtype=float)
        costs, latency_ms = dense_flops * np.concatenate([np.ones((len(sites), 1)), shares], axis=1), {}
    else:
        costs, latency_ms = _latencies(sites, reference, converted, target, threads, latency_tokens, progress)
    labels = [c.label for c in converted]
    units = _units(costs)  # costs are compared in these integer units: shares of the dense cost are shares of them
    uniform_cost = units.sum(0) / units[:, 0].sum()  # each choice on every site, as a share of all dense
    budget_of = budget if isinstance(budget, str) else None
    if budget_of is not None:  # that candidate on every site, so it fits exactly
        budget = float(uniform_cost[1 + labels.index(budget_of)])

    steps = tqdm(total=len(converted) + len(sites) * len(converted), desc="measuring sensitivity", unit="eval",
                 disable=not progress)
    uniform_scores = []
    for j in range(len(converted)):
        uniform_scores.append(measured([j] * len(sites)))
        steps.update()
    uniform = [{"choice": c.label, "active": c.active, "cost": float(uniform_cost[j + 1]),
                "perplexity": math.exp(s.loss), "divergence": s.divergence}
               for j, (c, s) in enumerate(zip(converted, uniform_scores))]
    anchor = _anchor(units, [s.loss for s in uniform_scores], reference_score.loss, budget, quality)
    anchored = reference_score if anchor < 0 else uniform_scores[anchor]
    window_changes = np.zeros((len(sites), 1 + len(converted), len(anchored.windows)))  # d_s(c) per window
    for i in range(len(sites)):
        for j in range(-1, len(converted)):
            if j != anchor:
                choices = [anchor] * len(sites)
                choices[i] = j
                window_changes[i, j + 1] = measured(choices).windows - anchored.windows
                steps.update()
    steps.close()
    changes = window_changes.mean(-1)  # dense, then each candidate
    errors = window_changes.std(-1, ddof=1) / math.sqrt(window_changes.shape[-1])

    allowance = None if quality is None else reference_score.loss + math.log(quality) - anchored.loss
    choices, frontier = _plan(changes, costs, budget, allowance)
    cross_fitted = _cross_fitted(window_changes, costs, budget, allowance)
    anchor_kept = anchor >= 0 and choices != [anchor] * len(sites) and not cross_fitted < (allowance or 0.0)
    if anchor_kept:  # plans chosen on half the windows do not hold on the other half: the gain is noise
        choices = [anchor] * len(sites)
    choice_of = {site.name: j for site, j in zip(sites, choices)}
    plan_configs = {name: None if j < 0 else converted[j].configs[name] for name, j in choice_of.items()}
    base = converted[max(set(choices) - {-1}, key=choices.count)].config  # the report's config: the most chosen
    built = convert(model, base, layer_configs=plan_configs, example_inputs=example_inputs, weights_follow=True,
                    progress=False).eval()
    for site in built.moe_report.converted:
        source = converted[choice_of[site.name]]
        built.get_submodule(site.layer).load_state_dict(source.layers[site.name].state_dict())
        site.calibration = dict(source.calibration[site.name])
    result = evaluate(built)

    plan = [SitePlan(site.name, "dense" if j < 0 else labels[j], 1.0 if j < 0 else float(shares[i, j]),
                     float(costs[i, j + 1] / costs[i, 0]), float(changes[i, j + 1]),
                     dict(zip(["dense", *labels], map(float, changes[i]))),
                     dict(zip(["dense", *labels], map(float, errors[i]))))
            for i, (site, j) in enumerate(zip(sites, choices))]
    report = OptimizeReport(
        cost=cost, budget=budget, budget_of=budget_of, quality=quality,
        anchor="dense" if anchor < 0 else f"uniform {labels[anchor]}", cross_fitted_change=cross_fitted,
        anchor_kept=anchor_kept, dense_perplexity=math.exp(dense_score.loss),
        reference_perplexity=math.exp(reference_score.loss), plan=plan,
        predicted_perplexity=math.exp(anchored.loss + sum(p.predicted_change for p in plan)),
        perplexity=math.exp(result.loss), divergence=result.divergence, active=model_stats(built).active_fraction,
        predicted_cost=float(sum(units[i, j + 1] for i, j in enumerate(choices)) / units[:, 0].sum()),
        uniform=uniform, frontier=[(share, math.exp(anchored.loss + change)) for share, change in frontier],
        latency_ms=latency_ms, seconds=time.perf_counter() - start)
    return built, report


@dataclass
class _Candidate:
    """One candidate conversion, reduced to its MoE layers by site."""

    config: MoEConfig  # resolved (calibrated defaults filled in), the model-wide one
    configs: dict[str, MoEConfig]  # each site's own (shared_experts='auto' resolves per site)
    layers: dict[str, nn.Module]
    calibration: dict[str, dict[str, float]]
    active: float

    @classmethod
    def of(cls, moe: nn.Module) -> "_Candidate":
        report = moe.moe_report
        return cls(report.config, {s.name: report.config_of(s.name) for s in report.converted},
                   {s.name: moe.get_submodule(s.layer) for s in report.converted},
                   {s.name: s.calibration for s in report.converted}, model_stats(moe).active_fraction)

    @property
    def label(self) -> str:
        return _label(self.config)


def _label(config: MoEConfig) -> str:
    return f"{config.top_k}/{config.num_experts}"


class _Score(NamedTuple):
    loss: float  # L: mean next-token cross-entropy, nats
    divergence: float  # D: mean KL(dense || model) over the dense model's TOP_TOKENS likeliest tokens, nats
    windows: np.ndarray  # D of each window [windows] (D is their mean)


class _Scorer:
    """L and D of a model on the held-out windows, spread evenly over the held-out text; the dense model's top
    tokens and their log-probabilities per position computed once, when it is made."""

    def __init__(self, dense: nn.Module, data: torch.Tensor, length: int, windows: int, bos: Optional[int]):
        self.inputs, self.targets = scored_windows(data, length, windows, bos, spread=True)
        self.bos = bos is not None
        self.top = [F.log_softmax(logits.float(), -1).topk(min(TOP_TOKENS, logits.shape[-1]), -1)
                    for logits, _ in window_logits(dense, self.inputs, self.targets, self.bos)]

    def __call__(self, model: nn.Module) -> _Score:
        loss, windows = 0.0, []
        for (logits, targets), (log_p, tokens) in zip(window_logits(model, self.inputs, self.targets, self.bos),
                                                      self.top):
            log_q = F.log_softmax(logits.float(), -1)
            loss -= float(log_q.gather(-1, targets[..., None]).sum())
            windows.append(_coarse_kl(log_p, log_q.gather(-1, tokens)).mean(-1))
        divergences = torch.cat(windows).double().numpy()
        return _Score(loss / self.targets.numel(), float(divergences.mean()), divergences)


def _coarse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the given tokens [..., K] and the rest as one token r: sum_i p_i log(p_i / q_i) +
    p_r log(p_r / q_r), p_r = 1 - sum_i p_i (a lower bound of the whole KL, exact when the tokens are all)."""
    def rest(log: torch.Tensor) -> torch.Tensor:  # log(1 - sum_i exp(log_i)), kept finite
        return torch.log(-torch.expm1(torch.logsumexp(log, -1).clamp(max=-1e-7)))

    log_p_rest, log_q_rest = rest(log_p), rest(log_q)
    return (log_p.exp() * (log_p - log_q)).sum(-1) + log_p_rest.exp() * (log_p_rest - log_q_rest)


class _Dense(nn.Module):
    """The dense FFN a split layer holds, its experts' neurons side by side: for the split k = E contiguous
    reference, exactly the site's dense FFN, timed as the cost of keeping the site dense."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        experts, width, d_model = layer.up_weight.shape

        def joined(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:  # [E, m, ...] -> [E m, ...]
            return None if t is None else nn.Parameter(t.detach().reshape(experts * width, *t.shape[2:]))

        self.up_weight, self.up_bias = joined(layer.up_weight), joined(layer.up_bias)
        self.gate_weight, self.gate_bias = joined(layer.gate_weight), joined(layer.gate_bias)
        self.down_weight = nn.Parameter(layer.down_weight.detach().permute(1, 0, 2).reshape(d_model, -1))
        self.down_bias = None if layer.output_bias is None else nn.Parameter(layer.output_bias.detach())
        self.activation = layer.activation
        self.hidden_norm = layer.hidden_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DenseFFN(self.up_weight, self.up_bias, self.down_weight, self.down_bias, self.activation,
                        self.gate_weight, self.gate_bias, hidden_norm=self.hidden_norm)(x)


def _latencies(sites: list[SiteReport], reference: nn.Module, candidates: list[_Candidate], target: str,
               threads: int, tokens: int, progress: bool) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """costs[s]: seconds of site s's layer dense, then with each candidate, on `tokens` tokens in ONNX Runtime;
    and the milliseconds by layer shape and choice. Each layer shape is exported for `target` dense and with every
    choice its sites take (a candidate's shared group count can differ between sites), and timed once, side by side
    in round-robin blocks."""
    def choice(j: int, site: SiteReport) -> str:
        return f"{candidates[j].label}, {candidates[j].configs[site.name].shared_experts} shared"

    shape_of = {}
    for site in sites:
        layer = reference.get_submodule(site.layer)
        shape_of[site.name] = (f"d {site.d_model}, d_ff {site.d_ff}, {'gated ' if site.gated else ''}"
                               f"{activation_name(layer.activation)}{', bias' if site.bias else ''}")
    modules: dict[str, dict[str, nn.Module]] = {}  # shape -> choice -> a layer of that shape and choice
    for site in sites:
        timed = modules.setdefault(shape_of[site.name], {"dense": _Dense(reference.get_submodule(site.layer))})
        for j, candidate in enumerate(candidates):
            timed.setdefault(choice(j, site), candidate.layers[site.name])
    latency_ms = {}
    with tempfile.TemporaryDirectory() as workdir:
        for i, (shape, timed) in enumerate(tqdm(modules.items(), desc="timing layers", unit="shape",
                                                disable=not progress)):
            site = next(s for s in sites if shape_of[s.name] == shape)
            x = torch.randn(1, tokens, site.d_model, generator=torch.Generator().manual_seed(0))
            calls = {}
            for j, (label, module) in enumerate(timed.items()):
                path = Path(workdir) / f"{i}-{j}.onnx"
                export(module, x, path, target=target)
                session = ort_session(path, threads)
                calls[label] = lambda session=session, feed={session.get_inputs()[0].name: x.numpy()}: \
                    session.run(None, feed)
            latency_ms[shape] = {label: 1e3 * t for label, t in time_round_robin(calls, blocks=5, per_block=3).items()}
    costs = [[latency_ms[shape_of[site.name]]["dense"]] + [latency_ms[shape_of[site.name]][choice(j, site)]
                                                           for j in range(len(candidates))] for site in sites]
    return np.array(costs) / 1e3, latency_ms


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


def _checked(budget: Union[float, str, None], quality: Optional[float], candidates: Optional[Sequence[MoEConfig]],
             cost: str, target: str, threads: int, latency_tokens: int) -> list[MoEConfig]:
    if cost not in COSTS:
        raise ValueError(f"optimize: cost={cost!r} is unknown; use 'flops' (the FFN FLOPs per token) or 'latency' "
                         "(each layer timed in ONNX Runtime).")
    if cost == "latency" and target not in LATENCY_TARGETS:
        raise ValueError(f"optimize: cost='latency' times layers in ONNX Runtime, which runs target 'portable' or "
                         f"'ort', not {target!r} (TensorRT plugin nodes need TensorRT). Time with target='portable'.")
    if cost == "latency" and (threads < 1 or latency_tokens < 1):
        raise ValueError(f"optimize: threads={threads} and latency_tokens={latency_tokens} must be positive.")
    if (budget is None) == (quality is None):
        raise ValueError("optimize: give exactly one of budget= (the active FFN share, e.g. 0.5) and quality= (the "
                         "perplexity allowed as a multiple of dense, e.g. 1.5).")
    if budget is not None and not isinstance(budget, str) and not 0 < budget <= 1:
        raise ValueError(f"optimize: budget={budget!r} is not an active FFN share; use a number in (0, 1], "
                         "e.g. 0.5 for half the FFN FLOPs, or a candidate's 'k/E'.")
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
    labels = [_label(c) for c in candidates]
    if isinstance(budget, str) and budget not in labels:
        raise ValueError(f"optimize: budget={budget!r} names no candidate; a budget is a share of the dense FFN "
                         f"cost (e.g. 0.5) or one of the candidates {', '.join(labels)} (its cost on every site).")
    return candidates


def _anchor(units: np.ndarray, losses: Sequence[float], reference_loss: float, budget: Optional[float],
            quality: Optional[float]) -> int:
    """The candidate whose uniform plan the sensitivities are measured around, or -1 (all dense): within a budget the
    least loss of those that fit it; within a quality the least cost of those that meet it."""
    whole = units[:, 0].sum()
    if budget is not None:
        fits = [j for j in range(len(losses)) if units[:, j + 1].sum() <= budget * whole + 1e-9]
        return min(fits, key=lambda j: losses[j], default=-1)
    meets = [j for j in range(len(losses)) if losses[j] <= reference_loss + math.log(quality)]
    return min(meets, key=lambda j: units[:, j + 1].sum(), default=-1)


def _plan(changes: np.ndarray, costs: np.ndarray, budget: Optional[float],
          allowance: Optional[float]) -> tuple[list[int], list[tuple[float, float]]]:
    """Each site's choice in the plan (-1 dense, else a candidate's column), and the frontier searched.
    changes[s]: the predicted loss change of each choice at site s, costs[s] its cost, both dense first, then each
    candidate; the plan's predicted change within `allowance` for a quality budget."""
    choices, best = _best(changes, costs, budget, allowance)
    if all(j < 0 for j in choices):
        goal = f"budget={budget}" if budget is not None else "the quality asked for"
        raise MoECompileError(f"optimize: the best plan for {goal} keeps every layer dense (no candidate is cheaper "
                              "and good enough). Allow more loss, e.g. quality=1.5, give candidates with more "
                              "experts active, or, with cost='latency', time more tokens (latency_tokens).")
    return choices, _frontier(best, int(_units(costs)[:, 0].sum()))


def _best(changes: np.ndarray, costs: np.ndarray, budget: Optional[float],
          allowance: Optional[float]) -> tuple[list[int], np.ndarray]:
    """Each site's choice in the best plan for the goal, and `best` of the dynamic programme it came from."""
    best, choose, cost = _plans(changes, costs)
    return _backtrack(choose, cost, _chosen_cost(best, int(cost[:, 0].sum()), budget, allowance)), best


def _plans(changes: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic programme over sites: best[u], the least sum of changes of a plan costing exactly u units (inf if
    none does; u = len(best) - 1 is the whole FFN dense); choose[s, u], site s's choice in it (-1 dense, else a
    candidate's column); cost[s, j], the units of site s with choice j (column 0 dense, then the candidates)."""
    cost = _units(costs)
    size = max(int(cost[:, 0].sum()), int(cost.max(axis=1).sum())) + 1  # a candidate may be slower than dense
    best = np.full(size, np.inf)
    best[0] = 0.0
    choose = np.full((len(costs), size), -1, dtype=np.int8)
    for s in range(len(costs)):
        new = np.full(size, np.inf)
        for j in range(cost.shape[1]):
            shifted = np.full(size, np.inf)
            shifted[cost[s, j]:] = best[:size - cost[s, j]] + changes[s, j]
            better = shifted < new
            new[better], choose[s, better] = shifted[better], j - 1
        best = new
    return best, choose, cost


def _cross_fitted(window_changes: np.ndarray, costs: np.ndarray, budget: Optional[float],
                  allowance: Optional[float]) -> float:
    """The predicted change of a plan chosen on half the windows (even or odd; window_changes [sites, choices,
    windows]), measured on the other half: the mean of both ways. A plan whose gain is noise in its windows scores
    about 0 or worse here, where the plan chosen on all of them looks better than it is."""
    halves = window_changes[..., 0::2].mean(-1), window_changes[..., 1::2].mean(-1)
    held = []
    for chosen_on, other in (halves, halves[::-1]):
        choices = _best(chosen_on, costs, budget, allowance)[0]
        held.append(sum(other[s, j + 1] for s, j in enumerate(choices)))
    return float(np.mean(held))


def _chosen_cost(best: np.ndarray, whole: int, budget: Optional[float], allowance: Optional[float]) -> int:
    """The cost (units) of the plan: the best within the budget (a share of `whole`, the all-dense cost), or the
    cheapest whose change is within the allowance."""
    if budget is not None:
        within = best[:int(budget * whole + 1e-9) + 1]
        if not np.isfinite(within).any():
            cheapest = int(np.argmax(np.isfinite(best)))
            raise MoECompileError(f"optimize: no plan meets budget={budget}: the cheapest, every site on its "
                                  f"cheapest choice, costs {cheapest / whole:.1%} of the dense FFN. Raise the budget "
                                  "or add a candidate with fewer active experts.")
        return int(np.argmin(within))
    return int(np.argmax(best <= allowance))  # the anchor's own plan (change 0) always qualifies


def _backtrack(choose: np.ndarray, cost: np.ndarray, units: int) -> list[int]:
    choices = []
    for s in reversed(range(len(choose))):
        j = int(choose[s, units])
        choices.append(j)
        units -= cost[s, j + 1]
    return choices[::-1]


def _frontier(best: np.ndarray, whole: int) -> list[tuple[float, float]]:
    """(cost share of dense, least loss change) where the best plan within a cost improves."""
    points, lowest = [], math.inf
    for u in np.flatnonzero(np.isfinite(best)):
        if best[u] < lowest:
            lowest = float(best[u])
            points.append((u / whole, lowest))
    return points


def _units(costs: np.ndarray) -> np.ndarray:
    """Costs as integer units: whole numbers (FLOPs) over their greatest common divisor, or rounded to MAX_UNITS
    of the all-dense total when they are not whole or the divisor leaves more."""
    whole = np.array_equal(costs, np.rint(costs))
    exact = np.maximum(np.rint(costs).astype(np.int64), 1)
    exact //= np.gcd.reduce(exact.ravel())
    if whole and exact[:, 0].sum() <= MAX_UNITS:
        return exact
    return np.maximum(np.rint(costs / costs[:, 0].sum() * MAX_UNITS).astype(np.int64), 1)
