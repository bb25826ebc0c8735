"""Parameter and FLOP counts of a model's FFN sites, dense vs MoE (multiply-adds count 2 FLOPs).

Per site, with d = d_model, f = d_ff, g = 3 projections for gated FFNs and 2 otherwise, E experts of width m
(m = f for upcycled experts, f / E for split ones), s of them shared (always on, split only), E_r = E - s
routed, and k_avg expert widths per token (shared included):
    dense params   g*d*f + biases
    MoE params     E * (g*d*m + input biases) + per-expert output biases + shared output bias + router d*E_r
    dense FLOPs    2*g*d*f per token
    MoE FLOPs      2*d*E_r (router) + k_avg * 2*g*d*m per token (active experts only)
    active FFN     k_avg * m / f, the share of the dense FFN's neurons each token runs
k_avg is top_k for switch and token_choice (an upper bound when a capacity drops tokens) and
min(capacity_factor * top_k, E) for expert_choice, where each expert takes C = capacity_factor * T * k / E tokens.
Per-expert output biases: d per expert for upcycled experts, d per routed expert for compensated split ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch.nn as nn

from .config import MoEConfig
from .model_io import Inputs
from .passes import SiteReport, find_ffn_blocks
from .table import format_table


@dataclass
class SiteStats:
    name: str
    d_model: int
    d_ff: int
    gated: bool
    dense_params: int
    moe_params: int
    dense_flops: int
    moe_flops: float
    active_fraction: float  # share of the dense FFN's neurons each token runs (shared neurons included)


@dataclass
class ModelStats:
    sites: list[SiteStats]
    dense_total_params: int  # the whole model, dense
    moe_total_params: int  # the whole model, converted

    @property
    def dense_flops(self) -> int:
        return sum(s.dense_flops for s in self.sites)

    @property
    def moe_flops(self) -> float:
        return sum(s.moe_flops for s in self.sites)

    @property
    def active_fraction(self) -> float:
        """Active share of all FFN neurons, weighted by each site's dense FLOPs."""
        return sum(s.active_fraction * s.dense_flops for s in self.sites) / max(self.dense_flops, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [asdict(s) for s in self.sites], "dense_total_params": self.dense_total_params,
                "moe_total_params": self.moe_total_params, "dense_ffn_flops_per_token": self.dense_flops,
                "moe_ffn_flops_per_token": self.moe_flops, "active_ffn_fraction": self.active_fraction}

    def table(self) -> str:
        rows = [("site", "d_model", "d_ff", "dense params", "MoE params", "dense FLOPs/tok", "MoE FLOPs/tok",
                 "active FFN")]
        rows += [(s.name or "<root>", str(s.d_model), str(s.d_ff), f"{s.dense_params:,}", f"{s.moe_params:,}",
                  f"{s.dense_flops:,}", f"{s.moe_flops:,.0f}", f"{s.active_fraction:.1%}") for s in self.sites]
        rows.append(("FFN total", "", "", f"{sum(s.dense_params for s in self.sites):,}",
                     f"{sum(s.moe_params for s in self.sites):,}", f"{self.dense_flops:,}", f"{self.moe_flops:,.0f}",
                     f"{self.active_fraction:.1%}"))
        rows.append(("model total", "", "", f"{self.dense_total_params:,}", f"{self.moe_total_params:,}", "", "", ""))
        return format_table(rows)

    def __str__(self) -> str:
        return self.table()


def site_stats(site: SiteReport, config: Optional[MoEConfig]) -> SiteStats:
    """Counts for one FFN site converted with `config` (None: kept dense)."""
    d, f = site.d_model, site.d_ff
    projections = 3 if site.gated else 2
    in_bias = (2 if site.gated else 1) if site.bias else 0  # bias vectors of width d_ff (up, and gate)
    out_bias = d if site.bias else 0
    dense_params, dense_flops = projections * d * f + in_bias * f + out_bias, 2 * projections * d * f
    if config is None:
        return SiteStats(name=site.name, d_model=d, d_ff=f, gated=site.gated, dense_params=dense_params,
                         moe_params=dense_params, dense_flops=dense_flops, moe_flops=dense_flops, active_fraction=1.0)
    experts = config.num_experts
    routed = experts - config.shared_experts
    if config.experts == "upcycle":
        width, expert_out_bias, shared_out_bias = f, experts * out_bias, 0
    else:
        width, expert_out_bias = f // experts, routed * d if config.compensate else 0
        shared_out_bias = d if site.bias or config.compensate else 0
    if config.routing == "expert_choice":
        k_avg = min(config.capacity_factor * config.top_k, experts)
    else:
        k_avg = config.top_k
    expert_flops = 2 * projections * d * width
    return SiteStats(
        name=site.name, d_model=d, d_ff=f, gated=site.gated,
        dense_params=dense_params,
        moe_params=(experts * (projections * d * width + in_bias * width) + expert_out_bias + shared_out_bias
                    + d * routed),
        dense_flops=dense_flops,
        moe_flops=2 * d * routed + k_avg * expert_flops,
        active_fraction=k_avg * width / f,
    )


def model_stats(model: nn.Module, config: Optional[MoEConfig] = None,
                example_inputs: Optional[Inputs] = None) -> ModelStats:
    """Counts for every FFN site of `model`, dense vs MoE.

    A converted model is counted with its own sites and MoEConfig; a dense one with the sites `convert`
    would change and `config` (default MoEConfig()), which is checked against each site as convert does;
    `example_inputs` as for convert.
    """
    report = getattr(model, "moe_report", None)
    converted = report is not None
    if converted:
        stats = [site_stats(site, report.config_of(site.name)) for site in report.sites
                 if site.action in ("converted", "kept dense")]
    else:
        config = config if config is not None else MoEConfig()
        sites = [s for s in find_ffn_blocks(model, example_inputs).sites if s.action == "found"]
        for site in sites:
            config.check_ffn_width(site.d_ff, site.name)
        stats = [site_stats(site, config) for site in sites]
    dense_ffn, moe_ffn = sum(s.dense_params for s in stats), sum(s.moe_params for s in stats)
    total = sum(p.numel() for p in model.parameters())
    other = total - (moe_ffn if converted else dense_ffn)
    return ModelStats(stats, dense_total_params=other + dense_ffn, moe_total_params=other + moe_ffn)
