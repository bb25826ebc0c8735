"""Capture: which modules to trace, and their torch.fx graphs with every direct child left opaque.

A module is a candidate when at least two of its direct children are projections (a module that computes
x W^T + b). Candidates are visited children first, so an FFN is found in the smallest module that holds it,
and a module that does not trace costs nothing but its own line in the report: its children are candidates of
their own. Projections are recognised by what they compute, not by class or attribute name, so nn.Linear and
transformers' Conv1D (weight stored [in, out]) are both found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn


@dataclass
class Projection:
    """y = x W^T + b with W in nn.Linear layout [out, in], whatever the module stores."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    kind: str  # the module's class name, for reports

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def as_projection(module: nn.Module) -> Optional[Projection]:
    """The projection `module` computes, or None: a childless module with one 2-D weight and at most one 1-D
    bias whose output on a probe equals x W^T + b for W or its transpose."""
    if next(module.children(), None) is not None:
        return None
    params = dict(module.named_parameters(recurse=False))
    matrices = [p for p in params.values() if p.dim() == 2]
    vectors = [p for p in params.values() if p.dim() == 1]
    if len(matrices) != 1 or len(vectors) > 1 or len(params) != len(matrices) + len(vectors):
        return None
    stored, bias = matrices[0], (vectors[0] if vectors else None)
    for weight in (stored, stored.t()):
        if bias is not None and bias.shape[0] != weight.shape[0]:
            continue
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(3, weight.shape[1], generator=generator).to(stored.device, stored.dtype)
        try:
            with torch.no_grad():
                out = module(probe)
        except Exception:
            continue
        expected = nn.functional.linear(probe, weight, bias)
        tol = 1e-4 if stored.dtype == torch.float32 else 1e-2
        if isinstance(out, torch.Tensor) and out.shape == expected.shape and \
                torch.allclose(out, expected, rtol=tol, atol=tol):
            return Projection(weight, bias, type(module).__name__)
    return None


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every module with >= 2 projection children, children before parents.

    A module used at several places (shared across layers) is yielded once, under its first name."""
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module):
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in module.named_children():
            yield from visit(f"{prefix}.{name}" if prefix else name, child)
        if sum(as_projection(child) is not None for child in module.children()) >= 2:
            yield prefix, module

    yield from visit("", model)


class _ChildrenAsLeaves(fx.Tracer):
    """Trace one module's own forward; every submodule call stays a single call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace(module: nn.Module) -> fx.Graph:
    """The module's fx graph; raises whatever torch.fx raises when its forward does not trace."""
    return _ChildrenAsLeaves().trace(module)
