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
from dataclasses import dataclass, field
from typing import Any, Optional, Union

ROUTINGS = ("switch", "token_choice", "expert_choice")
EXPERT_BUILDERS = ("upcycle", "split")
SPLIT_STRATEGIES = ("kmeans", "random", "contiguous", "coactivation")
ROUTER_INITS = ("random", "centroid", "calibrated")
NEEDS_CALIBRATION = {"split_strategy": "coactivation", "router_init": "calibrated"}
CALIBRATED_DISTILL_STEPS = 200
COMBINES = ("weighted", "unweighted")

_DATA_DEFAULTS = ("split_strategy", "router_init", "shared_experts", "compensate", "distill_steps")
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
    so k = E gives back the dense FFN) and "weighted" for upcycled ones. The data-dependent fields left unset
    (split_strategy, router_init, shared_experts, compensate, distill_steps) take other defaults when convert
    is given calibration data (`with_calibration`).
    """

    num_experts: int = 8
    top_k: Optional[int] = None
    routing: str = "token_choice"
    experts: str = "upcycle"
    split_strategy: Optional[str] = None
    router_init: Optional[str] = None
    shared_experts: Optional[Union[int, str]] = None  # split: neuron groups (of E) always on, out of the k active
    #                                                    per token; "auto": chosen on the calibration data
    compensate: Optional[bool] = None  # split: a skipped expert adds its mean output on calibration data
    distill_steps: Optional[int] = None  # optimiser steps per layer fitting experts to the dense FFN output
    calibration_tokens: int = 8192  # token rows recorded per FFN site from the calibration data
    capacity_factor: Optional[float] = None
    normalize: Optional[bool] = None
    combine: Optional[str] = None
    expert_choice_group: Union[str, int] = "sequence"
    router_jitter: float = 0.0
    upcycle_noise: float = 0.0
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    seed: int = 0
    unset: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.unset = frozenset(name for name in _DATA_DEFAULTS if getattr(self, name) is None)
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 2:
            _fail("num_experts", f"got {self.num_experts!r}, an MoE needs an integer >= 2", "Use num_experts=8, say.")
        if self.routing not in ROUTINGS:
            _fail("routing", f"unknown routing {self.routing!r}", f"Choose one of {', '.join(ROUTINGS)}.")
        if self.experts not in EXPERT_BUILDERS:
            _fail("experts", f"unknown expert builder {self.experts!r}", f"Choose one of {', '.join(EXPERT_BUILDERS)}.")
        if self.split_strategy is None:
            self.split_strategy = "kmeans"
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
        if self.router_init in ("centroid", "calibrated") and self.experts != "split":
            _fail("router_init", f"{self.router_init} initialisation needs split experts (upcycled experts are "
                  "identical, so their centroids and activation masses are too)",
                  "Use router_init='random' with experts='upcycle'.")

        if self.combine is None:
            self.combine = "unweighted" if self.experts == "split" else "weighted"
        if self.combine not in COMBINES:
            _fail("combine", f"unknown combine {self.combine!r}", f"Choose one of {', '.join(COMBINES)}.")

        self._check_split_options()

        group = self.expert_choice_group
        if not (group == "sequence" or (isinstance(group, int) and not isinstance(group, bool) and group > 0)):
            _fail("expert_choice_group", f"got {group!r}", "Use 'sequence' or a positive number of tokens.")
        for name in ("router_jitter", "upcycle_noise", "load_balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail(name, f"got {getattr(self, name)!r}, it must be >= 0", f"Use {name}=0 to turn it off.")

    def _check_split_options(self) -> None:
        for name, default in (("shared_experts", 0), ("compensate", False), ("distill_steps", 0)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        split_only = {"shared_experts": self.shared_experts != 0, "compensate": self.compensate,
                      "distill_steps": self.distill_steps != 0, "split_strategy": self.split_strategy == "coactivation"}
        for name, used in split_only.items():
            if used and self.experts != "split":
                _fail(name, f"{name}={getattr(self, name)!r} applies to split experts, not {self.experts}",
                      f"Use experts='split', or leave {name} unset.")
        shared = self.shared_experts
        if shared == "auto" and self.experts != "split":
            _fail("shared_experts", f"shared_experts='auto' applies to split experts, not {self.experts}",
                  "Use experts='split', or leave shared_experts unset.")
        if shared != "auto" and (not isinstance(shared, int) or isinstance(shared, bool) or shared < 0):
            _fail("shared_experts", f"got {shared!r}, it must be an integer >= 0 or 'auto'",
                  "Use 0 (no shared neurons), 1, or 'auto' (chosen on calibration data).")
        if shared != "auto" and shared and shared >= self.top_k:
            _fail("shared_experts", f"{shared} shared groups leave no routed expert among the top_k={self.top_k} "
                  "active per token", f"Use shared_experts <= {self.top_k - 1}, or raise top_k.")
        if self.compensate and self.combine != "unweighted":
            _fail("compensate", "compensation adds the mean output of each skipped expert, which is exact only when "
                  "expert outputs are summed unweighted", "Use combine='unweighted' (the split default).")
        if self.compensate and self.routing == "expert_choice":
            _fail("compensate", "expert_choice may leave a token with no expert, where the compensation offsets no "
                  "longer cancel", "Use routing='token_choice'.")
        steps = self.distill_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            _fail("distill_steps", f"got {steps!r}, it must be an integer >= 0", "Use 0 (off) or e.g. 200.")
        if not isinstance(self.calibration_tokens, int) or self.calibration_tokens < 64:
            _fail("calibration_tokens", f"got {self.calibration_tokens!r}, it must be an integer >= 64",
                  "Use 8192, say.")

    @property
    def routed_experts(self) -> int:
        """Experts the router chooses among (split: E minus the neuron groups in the shared expert)."""
        if self.shared_experts == "auto":
            raise ValueError("MoEConfig.routed_experts: shared_experts='auto' is chosen by convert on calibration "
                             "data; read the resolved config of the converted model (model.moe_report.config).")
        return self.num_experts - self.shared_experts

    @property
    def shared_choices(self) -> list[int]:
        """The shared group counts 'auto' tries: 0, k/4, k/2 and 3k/4 of the k active groups (rounded, < k)."""
        return sorted({round(self.top_k * q / 4) for q in range(4)} - {self.top_k})

    def with_calibration(self) -> "MoEConfig":
        """This config with its unset data-dependent fields at their calibrated defaults (split experts only)."""
        if self.experts != "split" or not self.unset:
            return self
        defaults = {"split_strategy": "coactivation", "router_init": "calibrated",
                    "shared_experts": "auto" if self.top_k > 1 else 0,
                    "compensate": self.combine == "unweighted" and self.routing != "expert_choice",
                    "distill_steps": CALIBRATED_DISTILL_STEPS}
        return dataclasses.replace(self, **{name: defaults[name] for name in self.unset})

    def check_calibration(self, has_data: bool) -> None:
        """Fail when a field needs calibration data that convert was not given, or data was given to experts that
        have nothing to fit."""
        if has_data:
            if self.experts != "split":
                _fail("experts", f"calibration builds split experts from activations, and experts={self.experts!r} "
                      "copies the whole FFN into each expert, so there is nothing to fit",
                      "Use MoEConfig(experts='split', ...), or drop calibration_data.")
            return
        for name, value in NEEDS_CALIBRATION.items():
            if getattr(self, name) == value:
                _fail(name, f"{name}={value!r} is computed from activations", "Pass calibration_data=... to "
                      "convert (batches of token ids), or use a data-free choice (split_strategy='kmeans', "
                      "router_init='centroid').")
        for name, used in (("shared_experts", self.shared_experts), ("compensate", self.compensate),
                           ("distill_steps", self.distill_steps)):
            if used:
                _fail(name, f"{name}={getattr(self, name)!r} is computed from activations",
                      f"Pass calibration_data=... to convert (batches of token ids), or leave {name} unset.")

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
