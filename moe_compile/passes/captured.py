"""A rewritten block that torch.fx cannot trace: torch.export graphs for every kind of call its forward takes.

A torch.export graph serves one kind of call: the pytree structure of the arguments with the values of those that
are not tensors (`use_cache=False` and no past is one kind; a tuple of past key/value tensors with `use_cache=True`
is another), and the axes of size 0 or 1 in the call it was exported on, which it fixes (every other axis stays
dynamic). A CapturedBlock keeps the graphs it has. The first is the one convert captured (on widened inputs, so
batch and sequence are dynamic). A call that no graph serves exports the dense source block's forward again on that
call (capture.export_module) and rewrites it the same way: each FFN, found again by the modules its up/gate/down
steps ran in, calls the same MoE layer. All graphs hold the same parameter objects, so they train together, and the
block's state dict is the first graph's.

A call that cannot be served raises MoECompileError naming the block and the arguments that differ from convert's
call: one that does not export (a forward that grows a list or dict it was given among them: see export_module),
one whose graph no longer holds the FFN, and one made while a whole model is being traced (call the model eagerly in
that way first).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Hashable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_flatten, tree_leaves

from ..errors import MoECompileError, first_line
from .capture import Call, export_module, keyword_constants
from .patterns import FFNMatch, match_ffns, module_path
from .rewrite import rewrite_inline

Steps = dict[str, str]  # role (up, gate, down) -> the module it ran in, relative to the block
Kind = tuple[tuple[str, Hashable], ...]  # (argument name, its structure and non-tensor values) per bound argument
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def find_by_steps(graph_module: fx.GraphModule, steps: Steps) -> Optional[FFNMatch]:
    """The FFN match in a block's torch.export graph whose steps ran in the modules `steps` names, or None."""
    return next((m for m in match_ffns(graph_module, graph_module.graph)
                 if {role: module_path(getattr(m, role))[0] for role in steps} == steps), None)


@dataclass
class _Graph:
    module: fx.GraphModule
    fixed: tuple[tuple[int, int, int], ...]  # (tensor number, axis, size): the axes of size 0 or 1 it was exported on

    def serves(self, tensors: list[torch.Tensor]) -> bool:
        return all(statically_known_true(tensors[i].shape[axis] == size) for i, axis, size in self.fixed)


class CapturedBlock(nn.Module):
    """The block, rewritten: forward(*args, **kwargs) runs a graph that serves the call, captured when first needed."""

    def __init__(self, source: nn.Module, name: str, call: Call, captured: fx.GraphModule,
                 sites: list[tuple[Steps, nn.Module]]):
        super().__init__()
        self.__dict__["source"] = source  # the dense block, outside the module tree: it is only exported again
        self.block_name = name or "<root>"
        self.steps = [steps for steps, _ in sites]
        self.layers = [layer for _, layer in sites]
        first = rewrite_inline(captured, captured.graph, [(find_by_steps(captured, s), layer) for s, layer in sites])
        for child_name, child in first.named_children():
            self.add_module(child_name, child)
        for param_name, param in first.named_parameters(recurse=False):
            self.register_parameter(param_name, param)
        for buffer_name, buffer in first.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer, persistent=buffer_name not in first._non_persistent_buffers_set)
        self.__dict__["graphs"] = {self._kind(call): [_Graph(first, _fixed_axes(call))]}
        self.train(source.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kind, tensors = self._kind((args, kwargs)), _tensors((args, kwargs))
        graph = next((g.module for g in self.graphs.get(kind, ()) if g.serves(tensors)), None)
        if graph is None:
            graph = self._capture((args, kwargs), kind)
            self.graphs.setdefault(kind, []).append(_Graph(graph, _fixed_axes((args, kwargs))))
        if graph.training != self.training:
            graph.train(self.training)
        constants = keyword_constants(self.source, kwargs)
        return graph(*args, **{k: v for k, v in kwargs.items() if k not in constants})

    def extra_repr(self) -> str:
        count = sum(map(len, self.graphs.values()))
        return f"{type(self.source).__name__}, {count} graph{'s' * (count != 1)} captured"

    def _kind(self, call: Call) -> Kind:
        args, kwargs = call
        bound = inspect.signature(self.source.forward).bind(*args, **kwargs).arguments
        return tuple((name, _value_kind(value)) for name, value in bound.items())

    def _capture(self, call: Call, kind: Kind) -> fx.GraphModule:
        what = (f"{self.block_name} was captured with torch.export and has no graph yet for a call with "
                f"{self._new_arguments(kind)}")
        if torch.compiler.is_compiling():
            raise MoECompileError(f"{what}, and cannot capture one while the whole model is being traced. Call the "
                                  "model once eagerly in the same way first (the block keeps that graph).")
        try:
            graph = export_module(self.source, call)
        except Exception as error:  # torch.export raises many kinds; each means "this call did not export"
            raise MoECompileError(f"{what}, and capturing one failed ({first_line(error, 300)}). Call "
                                  f"{self.block_name} as convert's example inputs did, or give its FFN a module of "
                                  "its own.") from None
        matches = [find_by_steps(graph, steps) for steps in self.steps]
        if any(match is None for match in matches):
            raise MoECompileError(f"{what}, and its FFN is not in the graph of that call, so it cannot be rewritten. "
                                  f"Call {self.block_name} as convert's example inputs did.")
        return rewrite_inline(graph, graph.graph, list(zip(matches, self.layers))).train(self.training)

    def _new_arguments(self, kind: Kind) -> str:
        """The arguments in which `kind` differs from the call convert captured, for an error message."""
        recorded, asked = dict(next(iter(self.graphs))), dict(kind)
        names = [name for name in {**recorded, **asked} if recorded.get(name) != asked.get(name)]
        return "other " + ", ".join(names) if names else "other sizes of 0 or 1"


def _value_kind(value: Any) -> Hashable:
    """A value's pytree structure with its non-tensor leaves: plain constants by value, other objects by identity."""
    leaves, spec = tree_flatten(value)
    return str(spec), tuple("tensor" if isinstance(leaf, torch.Tensor) else
                       leaf if isinstance(leaf, _CONSTANTS) else (type(leaf).__name__, id(leaf)) for leaf in leaves)


def _tensors(call: Call) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(call) if isinstance(leaf, torch.Tensor)]


def _fixed_axes(call: Call) -> tuple[tuple[int, int, int], ...]:
    """The axes torch.export fixes when it exports on `call`: those of size 0 or 1."""
    return tuple((i, axis, size) for i, tensor in enumerate(_tensors(call))
                 for axis, size in enumerate(tensor.shape) if size in (0, 1))
