"""Capture: which modules to trace, and their graphs.

    trace           a candidate's torch.fx graph, every direct child left opaque (call_module nodes)
    record_calls    the arguments each of some modules receives in one forward of the whole model
    export_module   a module torch.fx cannot trace, as its torch.export (ATen) graph on one call's arguments:
                    a GraphModule holding the module's own parameters, dynamic in every axis its code does not fix
                    (batch, sequence), its dropouts nn.Dropout modules so that they follow train() / eval();
                    captured.py keeps one such graph per kind of call a rewritten block receives

A module is a candidate when at least two of its direct children are projections (a module that computes
x W^T + b). Candidates are visited children first, so an FFN is found in the smallest module that holds it,
and a module that does not trace costs nothing but its own line in the report: its children are candidates of
their own. Projections are recognised by what they compute, not by class or attribute name, so nn.Linear and
transformers' Conv1D (weight stored [in, out]) are both found.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map, tree_structure

from ..errors import MoECompileError
from ..model_io import ModelCall, ModelInputs

Call = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs)


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


def trace(module: nn.Module, optional_as_none: bool = False) -> Optional[fx.Graph]:
    """The module's fx graph; raises whatever torch.fx raises when its forward does not trace.

    optional_as_none: trace the arguments that default to None as None, so that `if layer_idx is None` takes the
    branch the model's usual call takes (the graph asserts that they stay None, and keeps their names, so that a
    call passing one by keyword reaches the assertion); None when the forward has no such argument."""
    if not optional_as_none:
        return _ChildrenAsLeaves().trace(module)
    optional = {name for name, p in inspect.signature(module.forward).parameters.items()
                if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not optional:
        return None
    graph = _ChildrenAsLeaves().trace(module, concrete_args=dict.fromkeys(optional))
    for node in graph.nodes:  # fx names them `mask_1`, which a keyword call `mask=` would not reach
        if node.op == "placeholder" and node.target.rpartition("_")[0] in optional:
            node.target = node.target.rpartition("_")[0]
    return graph


def record_calls(model: nn.Module, inputs: ModelInputs, modules: dict[str, nn.Module]) -> dict[str, Call]:
    """(args, kwargs) of the first call of each of `modules` (by name) in one forward of `model` on `inputs`."""
    calls: dict[str, Call] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, tree_map(lambda value: value, (args, kwargs)))  # containers as they came in
        return record

    hooks = [module.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, module in modules.items()]
    try:
        with torch.no_grad():
            ModelCall(model)(*inputs.args, **inputs.kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def keyword_constants(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments without tensors that reach the forward's **kwargs (transformers passes flags such as
    use_cache so): torch.export takes them bound to the forward, not as inputs of the graph."""
    named = {name for name, p in inspect.signature(module.forward).parameters.items() if p.kind != p.VAR_KEYWORD}
    return {k: v for k, v in kwargs.items()
            if k not in named and not any(isinstance(t, torch.Tensor) for t in tree_leaves(v))}


def export_module(module: nn.Module, call: Call) -> fx.GraphModule:
    """`module`'s torch.export graph on the call (exported in eval mode; raises what torch.export raises), taking
    the call's arguments less its keyword_constants, which the graph computes with. A forward that grows a list or
    dict it was given (appends its present key/values to one, say) is refused: a graph returns tensors and would
    drop that change silently."""
    grown = _grown_arguments(module, call)
    if grown:
        raise MoECompileError(f"{type(module).__name__}.forward grows {', '.join(grown)} in place (a list or dict it "
                              "was given), which a torch.export graph would drop silently; return those values instead")
    # views as examples would make torch.export guard on their base tensors, which a later call's need not have
    args, kwargs = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) and v._base is not None else v, call)
    constants = keyword_constants(module, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}

    def any_size(value: Any) -> Optional[dict]:  # every axis of a tensor, as torch.export finds it; others fixed
        return {axis: torch.export.Dim.AUTO for axis in range(value.dim())} if isinstance(value, torch.Tensor) else None

    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    dynamic_shapes = {name: tree_map(any_size, value) for name, value in bound.items()}
    was_training = module.training
    module.forward = functools.partial(module.forward, **constants)
    logger, level = logging.getLogger("torch._export"), logging.getLogger("torch._export").level
    logger.setLevel(logging.ERROR)  # silence its notes on axes of size 1 kept static, which are as intended
    try:
        program = torch.export.export(module.eval(), args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        del module.forward
        module.train(was_training)
        logger.setLevel(level)
    graph_module = program.module()
    _dropouts_as_modules(graph_module)
    return fx.GraphModule(graph_module, graph_module.graph, class_name=type(module).__name__).train(was_training)


def _grown_arguments(module: nn.Module, call: Call) -> list[str]:
    """The arguments whose pytree structure the module's eager forward changes (a list it appends to), run once on
    copies of the call's tensors and objects so that nothing the caller holds changes."""
    args, kwargs = tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v), call)
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    before = {name: tree_structure(value) for name, value in bound.items()}
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(*args, **kwargs)
    finally:
        module.train(was_training)
    return [name for name, value in bound.items() if tree_structure(value) != before[name]]


def _dropouts_as_modules(graph_module: fx.GraphModule) -> None:
    """aten.dropout(x, p, train=False), recorded in eval mode, -> a call to nn.Dropout(p), which follows train()."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            name = f"dropout_{node.name}"
            graph_module.add_submodule(name, nn.Dropout(node.args[1]))
            with graph_module.graph.inserting_before(node):
                replacement = graph_module.graph.call_module(name, (node.args[0],))
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            graph_module.graph.erase_node(node)
    graph_module.recompile()
