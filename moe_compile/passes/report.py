"""What a pass did: one SiteReport per FFN site it found, one ModuleNote per traced module without a site."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..config import MoEConfig
from ..table import format_table


@dataclass
class SiteReport:
    name: str  # qualified name of the FFN: the module it replaced, or "<block>:<up node>..<down node>" inline
    module: str  # qualified name of the traced module whose graph holds the site
    pattern: str  # e.g. "Linear -> gelu -> Linear -> Dropout"
    d_model: int
    d_ff: int
    bias: bool
    gated: bool
    action: str  # "found" | "converted" | "kept dense" | "skipped"
    reason: str = ""  # what was done, or why it was skipped
    layer: str = ""  # qualified name of its MoELayer in the converted model
    calibration: dict[str, float] = field(default_factory=dict)  # fit figures (router recall, distillation ...)


@dataclass
class ModuleNote:
    module: str
    outcome: str  # "no FFN pattern" or "not traceable: ..."


@dataclass
class ConversionReport:
    sites: list[SiteReport] = field(default_factory=list)
    notes: list[ModuleNote] = field(default_factory=list)
    config: Optional[MoEConfig] = None
    layer_configs: dict[str, Optional[MoEConfig]] = field(default_factory=dict)  # per-site settings (None: dense)
    example_inputs: Optional[list[dict[str, Any]]] = None  # shapes and dtypes convert searched with, if any

    @property
    def converted(self) -> list[SiteReport]:
        return [s for s in self.sites if s.action == "converted"]

    def config_of(self, site: str) -> Optional[MoEConfig]:
        """The MoEConfig a site was converted with (None: kept dense)."""
        return self.layer_configs.get(site, self.config)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict() if self.config else None, "example_inputs": self.example_inputs,
                "layer_configs": {name: c and c.to_dict() for name, c in self.layer_configs.items()},
                "sites": [asdict(s) for s in self.sites], "notes": [asdict(n) for n in self.notes]}

    def table(self) -> str:
        rows = [("site", "pattern", "d_model", "d_ff", "action", "detail")]
        rows += [(s.name or "<root>", s.pattern, str(s.d_model), str(s.d_ff), s.action, s.reason) for s in self.sites]
        rows += [(n.module or "<root>", "-", "-", "-", "searched", n.outcome) for n in self.notes]
        return format_table(rows)

    def __str__(self) -> str:
        return self.table()
