"""MoEConfig: every knob of a dense-to-MoE conversion, validated once, at construction.

Routings (E experts, T tokens, k experts per token):
  switch         each token takes its top-1 expert; gate = softmax probability; an expert keeps at most
                 C = ceil(capacity_factor * T / E) tokens, the rest are dropped (their FFN output is zero).
  token_choice   each token takes its top-k experts (softmax, then top-k, optionally renormalised to sum to 1);
                 dropless unless capacity_factor is set, then C = ceil(capacity_factor * T * k / E).
  expert_choice  each expert takes its top-C tokens of a routing group by softmax score,
                 C = ceil(capacity_factor * T_group * k / E); not causal.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

ROUTINGS = ("switch", "token_choice", "expert_choice")
EXPERT_BUILDERS = ("upcycle", "split")
SPLIT_STRATEGIES = ("kmeans", "random", "contiguous")
ROUTER_INITS = ("random", "centroid")
COMBINES = ("weighted", "unweighted")

_DEFAULT_CAPACITY = {"switch": 1.25, "token_choice": None, "expert_choice": 1.0}


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise ValueError(f"MoEConfig.{field_name}: {problem}. {fix}")


@dataclass
class MoEConfig:
    """What to build in place of each dense FFN.

    Fields left as None take the routing's or expert builder's default, resolved in __post_init__:
    top_k 1 for switch and 2 otherwise; capacity_factor 1.25 (switch), None = dropless (token_choice),
    1.0 (expert_choice); normalize True for token_choice; router_init "centroid" for split experts and
    "random" for upcycled ones; combine "unweighted" for split experts (each expert is a slice of one sum,
    so k = E gives back the dense FFN) and "weighted" for upcycled ones.
    """

    num_experts: int = 8
    top_k: Optional[int] = None
    routing: str = "token_choice"
    experts: str = "upcycle"
    split_strategy: str = "kmeans"
    router_init: Optional[str] = None
    capacity_factor: Optional[float] = None
    normalize: Optional[bool] = None
    combine: Optional[str] = None
    expert_choice_group: Union[str, int] = "sequence"
    router_jitter: float = 0.0
    upcycle_noise: float = 0.0
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 2:
            _fail("num_experts", f"got {self.num_experts!r}, an MoE needs an integer >= 2", "Use num_experts=8, say.")
        if self.routing not in ROUTINGS:
            _fail("routing", f"unknown routing {self.routing!r}", f"Choose one of {', '.join(ROUTINGS)}.")
        if self.experts not in EXPERT_BUILDERS:
            _fail("experts", f"unknown expert builder {self.experts!r}", f"Choose one of {', '.join(EXPERT_BUILDERS)}.")
        if self.split_strategy not in SPLIT_STRATEGIES:
            _fail("split_strategy", f"unknown split strategy {self.split_strategy!r}",
                  f"Choose one of {', '.join(SPLIT_STRATEGIES)}.")

        if self.top_k is None:
            self.top_k = 1 if self.routing == "switch" else 2
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            _fail("top_k", f"got {self.top_k!r}, it must be a positive integer", "Use top_k=1 or 2.")
        if self.top_k > self.num_experts:
            _fail("top_k", f"top_k={self.top_k} is more than num_experts={self.num_experts}",
                  "Lower top_k or raise num_experts.")
        if self.routing == "switch" and self.top_k != 1:
            _fail("top_k", f"switch routing sends each token to exactly 1 expert, got top_k={self.top_k}",
                  "Use routing='token_choice' for top-k with k > 1.")

        if self.capacity_factor is None:
            self.capacity_factor = _DEFAULT_CAPACITY[self.routing]
        if self.capacity_factor is not None and not (
                isinstance(self.capacity_factor, (int, float)) and not isinstance(self.capacity_factor, bool)
                and 0 < self.capacity_factor < math.inf):
            _fail("capacity_factor", f"got {self.capacity_factor!r}, a capacity must be a finite number > 0",
                  "Use 1.0 to 2.0, or None (token_choice) for dropless routing.")
        if self.routing == "expert_choice" and self.capacity_factor is None:
            _fail("capacity_factor", "expert_choice needs a capacity", "Use capacity_factor=1.0.")

        if self.normalize is None:
            self.normalize = self.routing == "token_choice"
        if self.normalize and self.routing != "token_choice":
            _fail("normalize", f"renormalising top-k gates applies to token_choice, not {self.routing}",
                  "Leave normalize unset, or use routing='token_choice'.")

        if self.router_init is None:
            self.router_init = "centroid" if self.experts == "split" else "random"
        if self.router_init not in ROUTER_INITS:
            _fail("router_init", f"unknown router initialisation {self.router_init!r}",
                  f"Choose one of {', '.join(ROUTER_INITS)}.")
        if self.router_init == "centroid" and self.experts != "split":
            _fail("router_init", "centroid initialisation needs split experts (upcycled experts are identical, "
                  "so their centroids are too)", "Use router_init='random' with experts='upcycle'.")

        if self.combine is None:
            self.combine = "unweighted" if self.experts == "split" else "weighted"
        if self.combine not in COMBINES:
            _fail("combine", f"unknown combine {self.combine!r}", f"Choose one of {', '.join(COMBINES)}.")

        group = self.expert_choice_group
        if not (group == "sequence" or (isinstance(group, int) and not isinstance(group, bool) and group > 0)):
            _fail("expert_choice_group", f"got {group!r}", "Use 'sequence' or a positive number of tokens.")
        for name in ("router_jitter", "upcycle_noise", "load_balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail(name, f"got {getattr(self, name)!r}, it must be >= 0", f"Use {name}=0 to turn it off.")

    def check_ffn_width(self, d_ff: int, site: str) -> None:
        """Split experts need d_ff divisible by num_experts."""
        if self.experts == "split" and d_ff % self.num_experts:
            _fail("num_experts", f"split experts partition the {d_ff} FFN neurons of {site} into equal groups, "
                  f"and {d_ff} is not divisible by {self.num_experts}",
                  f"Pick num_experts among the divisors of {d_ff}, or use experts='upcycle'.")

    def to_dict(self) -> dict[str, Any]:
        """The resolved fields, as given to MoEConfig(**d) to rebuild the same config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown fields {unknown}. Known fields: {sorted(known)}.")
        return cls(**data)
