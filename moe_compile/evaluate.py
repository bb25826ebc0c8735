"""What split experts cost in quality: validation perplexity of a conversion against its dense model, at a given
active FFN fraction.

    top_k       = fraction * E experts per token (shared neuron groups included), so every token runs
                  `fraction` of each FFN's neurons
    perplexity  = exp(mean over predicted tokens of -log p(next token)), on consecutive validation windows

`moe-compile eval` and examples/eval_split_experts.py both measure through `evaluate_split`.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .config import MoEConfig
from .example_text import score
from .passes import convert
from .stats import model_stats
from .table import format_table


def top_k_at(num_experts: int, fraction: float) -> int:
    """The k of E experts that makes `fraction` of the FFN active; fails unless fraction * E is a whole number >= 1."""
    top_k = round(num_experts * fraction)
    if not 0 < fraction <= 1 or top_k < 1 or abs(top_k - num_experts * fraction) > 1e-6:
        raise ValueError(f"active fraction {fraction}: {num_experts} experts cannot run exactly that share of the FFN "
                         f"(top_k = {num_experts} * {fraction} must be a whole number >= 1). Pick fractions that are "
                         f"multiples of 1/{num_experts}, or another number of experts.")
    return top_k


def evaluate_split(dense: nn.Module, fields: dict[str, Any], fraction: float, validation: torch.Tensor,
                   calibration: Optional[Sequence[Any]] = None, length: int = 128, max_windows: int = 128,
                   bos: Optional[int] = None, dense_predictions: Optional[torch.Tensor] = None) -> dict:
    """Convert `dense` with split experts (MoEConfig(**fields), top_k for `fraction`), calibrated on `calibration`
    when given, and measure it on `validation` (token ids [n]; windows led by `bos` when given). Returns the row:
    experts, top_k, shared_experts (the model's; shared_per_site, each site's), active (from model_stats),
    perplexity, convert_seconds, router_recall_held_out
    (mean over sites, or None), top1_agreement (the share of next-token predictions equal to `dense_predictions`,
    the dense model's from example_text.score on the same windows; None without them) and the resolved config."""
    fields = {"experts": "split", **fields}
    fields["top_k"] = top_k_at(fields.get("num_experts", MoEConfig.num_experts), fraction)
    config = MoEConfig(**fields)
    if config.experts != "split":
        raise ValueError(f"evaluate_split: experts={config.experts!r} runs k whole copies of the FFN, not a share of "
                         "it. Use experts='split'.")
    start = time.perf_counter()
    moe = convert(dense, config, calibration_data=calibration, progress=False)
    seconds = time.perf_counter() - start
    recalls = [site.calibration["router_recall_held_out"] for site in moe.moe_report.converted
               if "router_recall_held_out" in site.calibration]
    resolved, report = moe.moe_report.config, moe.moe_report
    ppl, predictions = score(moe, validation, length=length, max_windows=max_windows, bos=bos)
    agreement = None if dense_predictions is None else float((predictions == dense_predictions).float().mean())
    return {"experts": resolved.num_experts, "top_k": resolved.top_k, "shared_experts": resolved.shared_experts,
            "shared_per_site": [report.config_of(site.name).shared_experts for site in report.converted],
            "active": model_stats(moe).active_fraction,
            "perplexity": ppl, "top1_agreement": agreement,
            "convert_seconds": seconds,
            "router_recall_held_out": sum(recalls) / len(recalls) if recalls else None,
            "config": resolved.to_dict()}


def shared_label(row: dict) -> str:
    """A row's shared neuron groups: "s", or "a-b" when its sites chose counts from a to b."""
    counts = sorted(set(row.get("shared_per_site", [row.get("shared_experts")])))
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def evaluation_table(dense_perplexity: float, rows: Sequence[dict]) -> str:
    """Dense and each row: active share, k of E (shared groups), perplexity, change against dense, top-1 agreement
    with dense, time, recall."""
    lines = [("model", "active FFN", "experts", "perplexity", "vs dense", "top-1 = dense", "convert", "router recall"),
             ("dense", "100%", "-", f"{dense_perplexity:.3f}", "-", "-", "-", "-")]
    for row in rows:
        recall, agreement = row["router_recall_held_out"], row.get("top1_agreement")
        experts = f"{row['top_k']} of {row['experts']} ({shared_label(row)} shared)"
        lines.append(("MoE", f"{row['active']:.1%}", experts,
                      f"{row['perplexity']:.3f}", f"{row['perplexity'] / dense_perplexity - 1:+.1%}",
                      "-" if agreement is None else f"{agreement:.1%}",
                      f"{row['convert_seconds']:.1f} s", "-" if recall is None else f"{recall:.2f}"))
    return format_table(lines)
